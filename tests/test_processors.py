"""Preprocessing front ends: golden parity, independent references (transformers' Whisper feature extractor and
Qwen2-VL image processor, a direct-definition resampler), resampling, and bad inputs."""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pytest

from ming_jax.parity import numerics, run as parity
from ming_jax.config.base import ConfigError
from ming_jax.processors import audio, image
from ming_jax.processors import (AudioError, ImageError, ProcessorConfig, WhisperFrontendConfig, process_audios,
                                 process_images)

GOLDEN = pathlib.Path(os.environ.get("MING_GOLDEN_DIR",
                                     pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"))


def _tone(n: int, sr: int, seed: int, freqs=(440.0, 1234.0)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = sum(0.3 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs)
    return (x + 0.01 * rng.standard_normal(n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Golden parity


def test_golden_preprocessing_case():
    case = GOLDEN / "preprocessing"
    if not case.is_dir():
        pytest.fail(f"golden case not found at {case} (set MING_GOLDEN_DIR)")
    rows = parity.run_case(str(case))
    assert {r.name for r in rows} >= {"whisper_log_mel", "whisper_log_mel_len", "image_pixel_values",
                                      "image_grid_thw"}
    assert numerics.all_ok(rows), numerics.report(rows)


# ---------------------------------------------------------------------------------------------------------------
# Audio: log-mel against transformers' WhisperFeatureExtractor (an independent implementation of whisper's front end)


@pytest.mark.parametrize("n_mels", [128, 80])
@pytest.mark.parametrize("n_samples", [201, 319, 1600, 20800, 33333])
def test_log_mel_matches_transformers_whisper(n_mels, n_samples):
    from transformers import WhisperFeatureExtractor

    wav = _tone(n_samples, audio.SAMPLE_RATE, seed=n_samples)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    ref = extractor(wav, sampling_rate=audio.SAMPLE_RATE, padding="longest",
                    return_tensors="np").input_features[0].T  # [T, n_mels]
    feats, lens = audio.whisper_frontend(wav, n_mels)
    assert feats.shape == (1, n_samples // audio.HOP_LENGTH, n_mels) and feats.dtype == np.float32
    assert lens.dtype == np.int64 and lens.tolist() == [n_samples // audio.HOP_LENGTH]
    numerics.assert_close("log_mel", feats[0], ref)


# sha256 of the float32 bytes of librosa.filters.mel(sr=16000, n_fft=400, n_mels=n) (librosa 0.11.0): the filters
# whisper ships. Pinned so the check stands without librosa installed.
MEL_SHA256 = {80: "4f2701b1d287d74a0dc9871026e9519d98cb76426615f2539b0d151a0ae4ec2e",
              128: "2a5f9822897750e047c85dea37cc268d3be0ecfd23c28a5f10da129d99d05afe"}


@pytest.mark.parametrize("n_mels", [128, 80])
def test_mel_filterbank_bits_are_whispers(n_mels):
    import hashlib

    fb = audio.mel_filterbank(n_mels)
    assert fb.shape == (n_mels, audio.N_FFT // 2 + 1) and fb.dtype == np.float32
    assert hashlib.sha256(np.ascontiguousarray(fb).tobytes()).hexdigest() == MEL_SHA256[n_mels]


@pytest.mark.parametrize("n_mels", [128, 80])
def test_mel_filterbank_is_librosas_slaney(n_mels):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels, htk=False, norm="slaney", dtype=np.float32)
    np.testing.assert_array_equal(audio.mel_filterbank(n_mels), ref)


def test_silence_hits_the_floor():
    mel = audio.log_mel_spectrogram(np.zeros(4000, np.float32))
    np.testing.assert_array_equal(mel, np.full((25, 128), -1.5, np.float32))  # (log10(1e-10) + 4) / 4


# ---------------------------------------------------------------------------------------------------------------
# Audio: resampling


def _resample_by_definition(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited interpolation straight from its definition: y(t) = sum_i x[i] h(t - i / orig_sr) with h a sinc
    at cut-off 0.99 * min(orig, new) / 2 Hz, Hann-tapered to 6 zero crossings, evaluated at t = j / new_sr
    (torchaudio's `sinc_interp_hann`, which the official processor uses). O(N*M), float64."""
    cutoff = 0.99 * min(orig_sr, new_sr)  # in Hz, = twice the cut-off frequency
    n_out = math.ceil(len(x) * new_sr / orig_sr)
    t = np.arange(n_out)[:, None] / new_sr - np.arange(len(x))[None, :] / orig_sr  # [M, N] seconds
    u = np.clip(t * cutoff, -6, 6)  # in zero crossings
    h = np.sinc(u) * np.cos(u * np.pi / 12) ** 2 * cutoff / orig_sr
    return h @ x.astype(np.float64)


@pytest.mark.parametrize("orig_sr", [44100, 8000, 22050, 48000])
def test_resample_matches_definition(orig_sr):
    x = _tone(orig_sr // 10 + 3, orig_sr, seed=orig_sr, freqs=(300.0, 2500.0))
    y = audio.resample(x, orig_sr, 16000)
    assert y.dtype == np.float32 and y.shape == (math.ceil(len(x) * 16000 / orig_sr),)
    numerics.assert_close(f"resample_{orig_sr}", y, _resample_by_definition(x, orig_sr, 16000))


@pytest.mark.parametrize("orig_sr, n", [(44100, 1), (44100, 441), (44100, 44101), (8000, 1), (8000, 999),
                                        (11025, 12345)])
def test_resample_length(orig_sr, n):
    y = audio.resample(np.ones(n, np.float32), orig_sr, 16000)
    assert y.shape == (math.ceil(n * 16000 / orig_sr),)


def test_resample_identity_at_16k():
    x = _tone(1000, 16000, seed=1)
    np.testing.assert_array_equal(audio.resample(x, 16000, 16000), x)


@pytest.mark.parametrize("orig_sr", [44100, 8000])
def test_wrong_rate_is_resampled_not_rejected(orig_sr):
    seconds = 0.5
    wav = _tone(int(orig_sr * seconds), orig_sr, seed=3)
    out = process_audios([(wav, orig_sr)])
    frames = int(16000 * seconds) // audio.HOP_LENGTH
    assert out["audio_feats"].shape == (1, frames, 128)
    expected = audio.log_mel_spectrogram(audio.resample(wav, orig_sr, 16000))
    numerics.assert_close("feats", out["audio_feats"][0], expected)


def test_pcm_scaling_and_channel_zero():
    """Official normalize_audio_tensor: int16 / 2**15, and the FIRST channel of a [C, T] array (no averaging)."""
    rng = np.random.default_rng(0)
    stereo = rng.integers(-20000, 20000, size=(2, 3000)).astype(np.int16)
    mono = audio.to_mono_float32(stereo)
    np.testing.assert_array_equal(mono, stereo[0].astype(np.float32) / 32768.0)
    np.testing.assert_array_equal(audio.to_mono_float32(stereo[0].astype(np.int32) << 16), mono)


def test_load_audio_file_44k_stereo(tmp_path):
    import soundfile

    rng = np.random.default_rng(5)
    pcm = (rng.uniform(-0.5, 0.5, size=(22050, 2)) * 32767).astype(np.int16)  # 0.5 s, [T, C] as soundfile writes
    path = tmp_path / "clip.wav"
    soundfile.write(path, pcm, 44100, subtype="PCM_16")
    wav, sr = audio.load_audio(path)
    assert sr == 44100 and wav.shape == (2, 22050)
    np.testing.assert_array_equal(wav[0], pcm[:, 0].astype(np.float32) / 32768.0)
    ready = audio.prepare_waveform(wav, sr)
    np.testing.assert_array_equal(ready, audio.resample(pcm[:, 0].astype(np.float32) / 32768.0, 44100, 16000))
    assert ready.shape == (8000,)


def test_process_audios_wraps_clips_and_counts_tokens():
    clips = [(_tone(16000, 16000, seed=1), 16000), (_tone(8000 * 3 // 4, 8000, seed=2), 8000)]
    out = process_audios(clips, WhisperFrontendConfig(n_mels=128))
    assert out["audio_feats_lengths"].tolist() == [[100, 75]]
    assert out["audio_feats"].shape == (1, 175, 128)
    # official: ((L - 3 + 2) // 2 + 1 - 3 + 2) // 2 + 1
    assert out["encoder_feats_lengths"].tolist() == [[25, 19]]
    assert audio.encoder_output_length(46) == 12  # the full_mm_forward golden: 46 mel frames -> 12 tokens


def test_max_duration_truncates_after_resampling():
    wav = _tone(44100, 44100, seed=4)  # 1 s
    assert audio.prepare_waveform(wav, 44100, max_duration_s=0.25).shape == (4000,)


@pytest.mark.parametrize("bad, match", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros((2, 0), np.float32), "empty"),
    (np.zeros(200, np.float32), "at least 201"),
    (np.array([0.0, np.nan] * 300, np.float32), "NaN"),
    (np.zeros(1000, np.uint8), "dtype"),
    (np.zeros(1000, np.complex64), "dtype"),
    (np.float32(0.5), "scalar"),
])
def test_bad_waveforms(bad, match):
    with pytest.raises(AudioError, match=match):
        process_audios([(bad, 16000)])


def test_bad_audio_files(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        audio.load_audio(tmp_path / "missing.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match="cannot decode"):
        audio.load_audio(garbage)
    import soundfile

    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0,), np.int16), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match="no samples|cannot decode"):
        audio.load_audio(empty)


def test_bad_rates_and_mels():
    with pytest.raises(AudioError, match="positive integers"):
        audio.resample(np.ones(10, np.float32), 0, 16000)
    with pytest.raises(AudioError, match="positive integers"):
        audio.resample(np.ones(10, np.float32), 22050.5, 16000)
    with pytest.raises(AudioError, match="n_mels"):
        audio.log_mel_spectrogram(np.ones(1000, np.float32), n_mels=64)
    with pytest.raises(ConfigError, match="n_mels"):
        WhisperFrontendConfig(n_mels=100)
    with pytest.raises(ConfigError, match="unknown"):
        WhisperFrontendConfig.from_official({"n_mels": 128, "hop": 160})


@pytest.mark.parametrize("orig_sr", [44100, 22050, 48000, 8000])
def test_resample_sounds_like_librosa(orig_sr):
    """librosa (soxr) is a different filter, so only close: 2e-3 relative max-abs when downsampling and 1e-2 when
    upsampling 8 kHz (soxr's steeper transition band moves the 2.5 kHz tone, at 0.63 of the 4 kHz Nyquist, most),
    away from the first / last 400 output samples where the two treat the clip's edges differently. Exactness is
    `test_resample_matches_definition`'s job (torchaudio's sinc_interp_hann, what the official processor runs)."""
    librosa = pytest.importorskip("librosa")
    x = _sine(orig_sr // 2, orig_sr, 300.0, 0.3) + _sine(orig_sr // 2, orig_sr, 2500.0, 0.3)  # no noise above
    ours = audio.resample(x, orig_sr, 16000)  # the cut-off: there the filters differ by design
    ref = librosa.resample(x, orig_sr=orig_sr, target_sr=16000, res_type="soxr_hq")
    assert ours.shape == ref.shape
    tol = 1e-2 if orig_sr < 16000 else 2e-3
    numerics.assert_close(f"resample_{orig_sr}_vs_soxr", ours[400:-400], ref[400:-400], tol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Audio files through PyAV: AAC / M4A and the audio track of a video (what librosa 1.0 no longer reads)


def _sine(n: int, sr: int, freq: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def _write_av(path, *, container: str, codec: str, sr: int, channels: list[np.ndarray], fmt: str = "fltp",
              video: bool = False, audio_track: bool = True):
    """Encode `channels` (float32 [T] each) with PyAV into `path`; `video` adds a 10 fps 32x32 mpeg4 track."""
    import av

    layout = {1: "mono", 2: "stereo"}[len(channels)]
    with av.open(str(path), "w", format=container) as out:
        vs = None
        if video:
            vs = out.add_stream("mpeg4", rate=10)
            vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        if audio_track:
            st = out.add_stream(codec, rate=sr, layout=layout)
            data = np.stack(channels)  # planar [C, T]
            if fmt == "s16":  # packed, interleaved int16 [1, T * C]
                data = np.round(data.T * 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
            frame.sample_rate = sr
            for packet in [*st.encode(frame), *st.encode(None)]:
                out.mux(packet)
        if vs is not None:
            for i in range(5):
                img = np.full((32, 32, 3), 40 * i, np.uint8)
                for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in vs.encode(None):
                out.mux(packet)
    return data if audio_track else None


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


@pytest.mark.parametrize("name, container, with_video", [("clip.m4a", "ipod", False), ("clip.aac", "adts", False),
                                                          ("movie.mp4", "mp4", True), ("movie.mkv", "matroska", True)])
def test_load_aac_and_video_audio_track(tmp_path, name, container, with_video):
    """AAC in M4A / raw ADTS, and the AAC track of MP4 / MKV videos (a video stream first), at 44.1 kHz stereo with
    a different tone per channel: the rate, the channel order, the tones and the length survive, and the clip goes
    through the processor (resampled to 16 kHz)."""
    sr, n = 44100, 22050
    left, right = _sine(n, sr, 440.0), _sine(n, sr, 1000.0, amp=0.25)
    path = tmp_path / name
    _write_av(path, container=container, codec="aac", sr=sr, channels=[left, right], video=with_video)
    wav, got_sr = audio.load_audio(path)
    assert got_sr == sr and wav.dtype == np.float32 and wav.shape[0] == 2
    assert n <= wav.shape[1] <= n + 3 * 1024  # AAC codes whole 1024-sample frames, plus the encoder's priming
    body = slice(2048, n - 1024)  # clear of the priming / tail transients
    assert abs(_peak_hz(wav[0, body], sr) - 440.0) < 5 and abs(_peak_hz(wav[1, body], sr) - 1000.0) < 5
    assert 0.45 < np.abs(wav[0, body]).max() < 0.55 and 0.2 < np.abs(wav[1, body]).max() < 0.3  # lossy, not wrong
    out = process_audios([(wav, got_sr)])  # channel 0, resampled 44.1 -> 16 kHz
    assert out["audio_feats"].shape == (1, math.ceil(wav.shape[1] * 16000 / sr) // audio.HOP_LENGTH, 128)


def test_load_pcm_in_a_video_container_is_exact(tmp_path):
    """Packed int16 PCM in Matroska (which libsndfile cannot open, so PyAV decodes it): de-interleaved channel by
    channel and scaled by 1 / 2**15 exactly as soundfile scales a WAV; 22.05 kHz is kept, not assumed 16 kHz."""
    sr, n = 22050, 5000
    rng = np.random.default_rng(7)
    chans = [rng.uniform(-0.9, 0.9, n).astype(np.float32), _sine(n, sr, 300.0)]
    packed = _write_av(tmp_path / "pcm.mkv", container="matroska", codec="pcm_s16le", sr=sr, channels=chans,
                       fmt="s16")
    wav, got_sr = audio.load_audio(tmp_path / "pcm.mkv")
    pcm = packed.reshape(-1, 2).T  # [2, T] int16
    assert got_sr == sr and wav.shape == (2, n)
    np.testing.assert_array_equal(wav, pcm.astype(np.float32) / 32768.0)
    ready = audio.prepare_waveform(wav, got_sr)
    np.testing.assert_array_equal(ready, audio.resample(pcm[0].astype(np.float32) / 32768.0, sr, 16000))


def test_bad_av_files(tmp_path):
    good = tmp_path / "clip.m4a"
    _write_av(good, container="ipod", codec="aac", sr=16000, channels=[_sine(8000, 16000, 440.0)])
    data = good.read_bytes()
    truncated = tmp_path / "truncated.m4a"
    truncated.write_bytes(data[: len(data) // 2])
    zeroed = tmp_path / "zeroed.m4a"
    zeroed.write_bytes(data[:64] + bytes(len(data) - 64))
    for bad in (truncated, zeroed):
        with pytest.raises(AudioError, match=f"cannot decode audio file {bad}.*soundfile.*PyAV"):
            audio.load_audio(bad)
    silent = tmp_path / "silent.mp4"
    _write_av(silent, container="mp4", codec="aac", sr=16000, channels=[np.zeros(1)], video=True, audio_track=False)
    with pytest.raises(AudioError, match="no audio stream.*video"):
        audio.load_audio(silent)


def test_stream_changing_rate_or_channels_is_refused():
    """One waveform has one rate: a stream whose decoded frames change rate (or channel count) midway is an error
    naming the change, not a clip silently played at the wrong speed."""
    a = np.zeros((2, 1024), np.float32)
    wav, sr = audio.join_chunks([(a, 44100), (a, 44100)], "x.aac")
    assert wav.shape == (2, 2048) and sr == 44100
    with pytest.raises(AudioError, match="x.aac: sample rate changes from 44100 to 48000 Hz at decoded frame 1"):
        audio.join_chunks([(a, 44100), (a, 48000)], "x.aac")
    with pytest.raises(AudioError, match="channel count changes from 2 to 1"):
        audio.join_chunks([(a, 44100), (a[:1], 44100)], "x.aac")


def test_audio_reading_needs_no_librosa(tmp_path):
    """Reading WAV and M4A and building the mel filters never imports librosa (it may leave the dependencies)."""
    import soundfile
    import subprocess
    import sys

    soundfile.write(tmp_path / "a.wav", _sine(4000, 16000, 440.0), 16000)
    _write_av(tmp_path / "a.m4a", container="ipod", codec="aac", sr=16000, channels=[_sine(8000, 16000, 440.0)])
    code = ("import sys; from ming_jax.processors import audio; "
            f"[audio.process_audios([audio.load_audio(p)]) for p in ({str(tmp_path / 'a.wav')!r}, "
            f"{str(tmp_path / 'a.m4a')!r})]; "
            "assert 'librosa' not in sys.modules, 'librosa imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Image processor against transformers' Qwen2-VL image processor (the official class is derived from it)

SIZES = [(70, 100), (33, 257), (500, 20), (16, 16), (80, 80), (1000, 1200), (7, 9), (1, 150), (250, 251)]
CONFIGS = {
    "ming": ProcessorConfig.ming_flash_omni_2(),
    "small_max": ProcessorConfig.ming_flash_omni_2(min_pixels=56 * 56, max_pixels=28 * 28 * 64),
    "patch14": ProcessorConfig.ming_flash_omni_2(patch_size=14, min_pixels=3136, max_pixels=200_000),
    "merge3_t1": ProcessorConfig.ming_flash_omni_2(patch_size=8, temporal_patch_size=1, merge_size=3,
                                                   min_pixels=1000, max_pixels=50_000),
}


def _qwen2vl(cfg: ProcessorConfig):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=cfg.patch_size,
                                 temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
                                 image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_image_processor_matches_qwen2vl(name):
    cfg = CONFIGS[name]
    ref_proc = _qwen2vl(cfg)
    rng = np.random.default_rng(len(name))
    for h, w in SIZES:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = ref_proc(images=[img], input_data_format="channels_last", return_tensors="np")
        out = process_images([img], cfg)
        assert out["pixel_values"].dtype == np.float32 and out["image_grid_thw"].dtype == np.int64
        numerics.assert_close(f"{name} {h}x{w} pixels", out["pixel_values"], ref["pixel_values"])
        numerics.assert_close(f"{name} {h}x{w} grid", out["image_grid_thw"], ref["image_grid_thw"])
        assert out["pixel_values"].shape == (image.num_image_patches(h, w, cfg), cfg.patch_dim)


def test_several_images_and_pil_modes():
    from PIL import Image

    cfg = ProcessorConfig.ming_flash_omni_2()
    rng = np.random.default_rng(9)
    rgba = Image.fromarray(rng.integers(0, 256, (77, 91, 4), dtype=np.uint8), "RGBA")
    images = [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), rgba, rgba.convert("L"), rgba.convert("P")]
    ref = _qwen2vl(cfg)(images=images, return_tensors="np")
    out = process_images(images, cfg)
    numerics.assert_close("pixels", out["pixel_values"], ref["pixel_values"])
    numerics.assert_close("grid", out["image_grid_thw"], ref["image_grid_thw"])


def test_smart_resize_rules():
    # round half to even (80 / 32 = 2.5 -> 2), then grown to min_pixels with ceil
    assert image.smart_resize(80, 80, 32, 4096, 16777216) == (64, 64)
    assert image.smart_resize(70, 100, 32, 4096, 16777216) == (64, 96)
    assert image.smart_resize(10, 10, 32, 4096, 16777216) == (64, 64)  # below min_pixels: upscaled, not refused
    h, w = image.smart_resize(4000, 3000, 32, 4096, 1_000_000)  # above max_pixels: shrunk with floor
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 1_000_000 and (h, w) == (1152, 864)


def test_patch_row_layout():
    """Row r of pixel_values is (temporal group, merge window row-major, patch in window row-major) and holds
    (channel, frame, pixel row, pixel col): check one row by hand against the normalised image."""
    cfg = ProcessorConfig.ming_flash_omni_2(min_pixels=64 * 64, max_pixels=64 * 96)
    img = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    rows = process_images([img], cfg)["pixel_values"]
    pixels = image.rescale_normalize(img, cfg)  # [64, 96, 3] (no resize: already on the grid)
    p, m = cfg.patch_size, cfg.merge_size
    window_row, window_col, in_row, in_col = 1, 2, 1, 0  # merge windows are 2x3; patches in a window are 2x2
    r = (window_row * (96 // (p * m)) + window_col) * m * m + in_row * m + in_col
    y0, x0 = (window_row * m + in_row) * p, (window_col * m + in_col) * p
    patch = pixels[y0:y0 + p, x0:x0 + p].transpose(2, 0, 1)  # [C, p, p]
    expected = np.stack([patch, patch], axis=1).reshape(-1)  # the image repeated over the temporal patch
    np.testing.assert_array_equal(rows[r], expected)


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros((0, 10, 3), np.uint8), ImageError, "empty"),
    (np.zeros((2, 401, 3), np.uint8), ImageError, "aspect ratio"),
    (np.zeros((40, 40, 3), np.float32), ImageError, "uint8"),
    (np.zeros((40, 40), np.uint8), ImageError, r"\[height, width, 3\]"),
    (np.zeros((40, 40, 4), np.uint8), ImageError, r"\[height, width, 3\]"),
])
def test_bad_images(bad, err, match):
    with pytest.raises(err, match=match):
        process_images([bad], ProcessorConfig.ming_flash_omni_2())


def test_no_images():
    with pytest.raises(ImageError, match="at least one"):
        process_images([], ProcessorConfig.ming_flash_omni_2())


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_config_reads_the_shipped_preprocessor_config():
    import json

    path = GOLDEN.parent / "reference" / "preprocessor_config.json"
    if not path.is_file():
        pytest.fail(f"{path} not found")
    cfg = ProcessorConfig.from_official(json.loads(path.read_text()))
    assert cfg == ProcessorConfig.ming_flash_omni_2()
    assert ProcessorConfig.from_official(cfg.to_official()) == cfg


def test_config_defaults_and_strictness():
    assert ProcessorConfig.from_official({}) == ProcessorConfig()  # official constructor defaults
    assert ProcessorConfig().max_pixels == 32 * 32 * 1280
    with pytest.raises(ConfigError, match="unknown"):
        ProcessorConfig.from_official({"min_pixel": 4096})
    with pytest.raises(ConfigError, match="min_pixels"):
        ProcessorConfig.from_official({"min_pixels": 10_000, "max_pixels": 5000})
    with pytest.raises(ConfigError, match="image_processor_type"):
        ProcessorConfig.from_official({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ConfigError, match="size"):
        ProcessorConfig.from_official({"size": {"shortest_edge": 10}})
    with pytest.raises(ConfigError, match="n_mels"):
        ProcessorConfig.from_official({"whisper_frontend_args": {"n_mels": 64}})
    with pytest.raises(ConfigError, match="3 \\(RGB\\)"):
        ProcessorConfig.from_official({"image_mean": [0.5, 0.5]})
    over = ProcessorConfig.from_official({"whisper_frontend_args": {"n_mels": 80}},
                                         defaults=ProcessorConfig.ming_flash_omni_2())
    assert over.audio.n_mels == 80 and over.max_pixels == 16777216
