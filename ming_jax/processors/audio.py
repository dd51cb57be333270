"""Audio front end: waveform in, Whisper-style 128-mel log spectrogram out (host side, numpy).

The official pipeline (Ming `BailingMM2AudioProcessor` with `use_whisper_encoder=True`) is:

    file --torchaudio.load--> [C, T] float in [-1, 1]
         --normalize_audio_tensor--> integer PCM scaled to [-1, 1], channel 0 kept, resampled to 16 kHz
         --WhisperFrontend = whisper.log_mel_spectrogram(n_mels)--> [T_mel, n_mels]

and the LLM sees `encoder_output_length(T_mel)` audio tokens. This module reproduces each stage without torch,
torchaudio or whisper:

* `resample` is the band-limited sinc interpolation with a Hann window that `torchaudio.transforms.Resample` uses
  (zero-crossing width 6, roll-off 0.99), evaluated the same way (kernel in float64 then stored as float32, the
  per-phase time offsets rounded through float32 like torch's default dtype), so resampled audio matches the official
  pipeline sample for sample rather than merely sounding the same.
* `log_mel_spectrogram` is whisper's: periodic Hann window of 400 samples, hop 160, centred frames with reflect
  padding, power spectrum with the last frame dropped (so 1 frame per 10 ms: T_mel = T // 160), Slaney-scale and
  Slaney-normalised mel filters (whisper ships them as `librosa.filters.mel(sr=16000, n_fft=400, n_mels)`; built
  here with librosa's formulas in librosa's operation order, so bit-identical without importing it), log10 with a
  1e-10 floor, dynamic range clipped to 8 decades below the clip's maximum, then (x + 4) / 4.

`load_audio` reads files at their native rate (resampling is `resample`'s job): with soundfile (libsndfile: WAV, FLAC,
OGG / Vorbis / Opus, MP3, AIFF, ...) first, and otherwise with PyAV (FFmpeg: AAC / M4A, WMA, and the audio track of
video containers such as MP4 / MKV / MOV / WebM). Both give float samples in [-1, 1] the way torchaudio does (integer
PCM divided by 2**(bits-1)). librosa is not used: its 1.0 release dropped the audioread fallback that decoded AAC and
video containers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ming_jax.config.base import ConfigError, check_keys

SAMPLE_RATE = 16_000  # whisper's and the official processor's fixed rate (both hard-code it)
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
SUPPORTED_N_MELS = (80, 128)  # whisper ships filterbanks for these two only and asserts on anything else

# Waveform dtypes the official `normalize_audio_tensor` accepts, with the divisor that maps them to [-1, 1].
_PCM_SCALE = {
    np.dtype(np.int8): 2.0**7,
    np.dtype(np.int16): 2.0**15,
    np.dtype(np.int32): 2.0**31,
    np.dtype(np.int64): 2.0**63,
    np.dtype(np.float32): 1.0,
    np.dtype(np.float64): 1.0,
}

# torchaudio.transforms.Resample defaults, which the official processor uses unchanged.
_RESAMPLE_ZERO_CROSSINGS = 6
_RESAMPLE_ROLLOFF = 0.99


class AudioError(ValueError):
    """Audio that cannot be turned into features: unreadable, empty, too short, non-finite, wrong dtype or shape."""


@dataclasses.dataclass(frozen=True)
class WhisperFrontendConfig:
    """The `whisper_frontend_args` of the official preprocessor_config.json (only `n_mels` exists there)."""

    n_mels: int = 128

    def __post_init__(self):
        if self.n_mels not in SUPPORTED_N_MELS:
            raise ConfigError(f"whisper_frontend_args: n_mels must be one of {SUPPORTED_N_MELS} (the filterbanks "
                              f"whisper ships), got {self.n_mels}")

    @classmethod
    def from_official(cls, d: Mapping[str, Any]) -> "WhisperFrontendConfig":
        check_keys(d, ("n_mels",), "whisper_frontend_args")
        return cls(n_mels=int(d.get("n_mels", cls.n_mels)))

    def to_official(self) -> dict[str, Any]:
        return {"n_mels": self.n_mels}


# ----------------------------------------------------------------------------------------------------------------
# Waveform preparation


def to_mono_float32(waveform) -> np.ndarray:
    """Official `normalize_audio_tensor` minus the resampling: integer PCM scaled to [-1, 1], float kept as is, and
    for a multi-channel array the FIRST row kept (the official takes `waveform[0]` until 1-D, which for torchaudio's
    [channels, time] layout is channel 0; it does not average channels). Returns float32 [T]."""
    wav = np.asarray(waveform)
    if wav.dtype not in _PCM_SCALE:
        raise AudioError(f"unsupported waveform dtype {wav.dtype}; expected one of "
                         f"{sorted(str(d) for d in _PCM_SCALE)}")
    if wav.ndim == 0:
        raise AudioError("waveform is a scalar; expected [T] or [channels, T]")
    while wav.ndim > 1:
        if wav.shape[0] == 0:
            raise AudioError(f"waveform has shape {np.shape(waveform)} with no channels")
        wav = wav[0]
    wav = (wav.astype(np.float64) / _PCM_SCALE[np.asarray(waveform).dtype]).astype(np.float32)
    if wav.size == 0:
        raise AudioError("waveform is empty (0 samples)")
    if not np.all(np.isfinite(wav)):
        raise AudioError("waveform contains NaN or infinite samples")
    return wav


@functools.lru_cache(maxsize=16)
def _sinc_resample_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """Polyphase kernel for resampling by new/orig (both already divided by their gcd).

    Output sample j (phase j mod new) at time j/new is a windowed-sinc weighted sum of the input samples i at times
    i/orig around it; the cut-off is `rolloff` times the lower Nyquist rate, and the sinc is truncated after
    `_RESAMPLE_ZERO_CROSSINGS` zero crossings with a Hann (cos^2) taper. Row j of the kernel holds the weights of
    input offsets -width .. width+orig-1 relative to the block start. Returns (float32 [new, 2*width+orig], width).
    """
    cutoff = min(orig, new) * _RESAMPLE_ROLLOFF  # in units where the input rate is `orig`
    width = math.ceil(_RESAMPLE_ZERO_CROSSINGS * orig / cutoff)
    offsets = np.arange(-width, width + orig, dtype=np.float64) / orig  # [K] input times, in blocks of `orig`
    # torch builds the phase times with its default float32 dtype; round them the same way for identical kernels.
    phases = (-np.arange(new, dtype=np.float32) / np.float32(new)).astype(np.float64)  # [new]
    t = (phases[:, None] + offsets[None, :]) * cutoff  # [new, K] in units of the cut-off period
    t = np.clip(t, -_RESAMPLE_ZERO_CROSSINGS, _RESAMPLE_ZERO_CROSSINGS)
    taper = np.cos(t * math.pi / _RESAMPLE_ZERO_CROSSINGS / 2) ** 2
    kernel = np.sinc(t) * (taper * (cutoff / orig))  # np.sinc(x) = sin(pi x) / (pi x), 1 at 0
    return kernel.astype(np.float32), width


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a 1-D float waveform from `orig_sr` to `target_sr` Hz as `torchaudio.transforms.Resample` does
    (what the official processor uses). Output length is ceil(T * target_sr / orig_sr); the input is treated as zero
    outside [0, T). Rates must be positive integers; equal rates return the input unchanged."""
    if int(orig_sr) != orig_sr or int(target_sr) != target_sr or orig_sr <= 0 or target_sr <= 0:
        raise AudioError(f"sample rates must be positive integers, got {orig_sr} -> {target_sr}")
    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim != 1:
        raise AudioError(f"resample expects a 1-D waveform, got shape {wav.shape}")
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr == target_sr:
        return wav
    g = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // g, target_sr // g
    kernel, width = _sinc_resample_kernel(orig, new)  # [new, K]
    length = wav.shape[0]
    padded = np.pad(wav, (width, width + orig))
    # One block per `orig` input samples; each block yields `new` output samples (one per kernel row).
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]  # [blocks, K]
    out = np.einsum("bk,pk->bp", windows.astype(np.float64), kernel.astype(np.float64)).reshape(-1)
    n_out = math.ceil(new * length / orig)
    return out[:n_out].astype(np.float32)


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file (or the first audio stream of a video file) at its native rate.
    Returns (float32 [channels, T] in [-1, 1], sample_rate).

    soundfile reads what libsndfile knows; anything else goes to PyAV. Raises `AudioError` naming the file when it
    is missing, neither reader can decode it, it has no audio stream, states no sample rate (or changes rate or
    channel count midway), or holds no samples."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path}")
    try:
        wav, sr = _read_soundfile(path)
    except _NotForThisReader as sf_err:
        try:
            wav, sr = _read_av(path)
        except _NotForThisReader as av_err:
            raise AudioError(f"cannot decode audio file {path}: soundfile: {sf_err}; PyAV: {av_err}") from av_err
    if sr <= 0:
        raise AudioError(f"audio file {path} states no valid sample rate ({sr})")
    if wav.shape[-1] == 0:
        raise AudioError(f"audio file {path} holds no samples")
    return wav, int(sr)


class _NotForThisReader(Exception):
    """A reader could not decode the file (the next reader is tried; the message goes into the final error)."""


def _read_soundfile(path: str) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        data, sr = soundfile.read(path, dtype="float32", always_2d=True)  # [T, C]; int PCM / 2**(bits-1)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:  # unknown / corrupt format
        raise _NotForThisReader(f"{type(e).__name__}: {e}") from e
    return np.ascontiguousarray(data.T), int(sr)


# PyAV sample formats (planar or packed) -> (numpy dtype, offset, divisor) mapping them to [-1, 1] as FFmpeg's own
# conversion to float does (and torchaudio, which reads through FFmpeg or libsndfile).
_AV_FORMATS = {
    "u8": (np.uint8, 128.0, 2.0**7),
    "s16": (np.int16, 0.0, 2.0**15),
    "s32": (np.int32, 0.0, 2.0**31),
    "s64": (np.int64, 0.0, 2.0**63),
    "flt": (np.float32, 0.0, 1.0),
    "dbl": (np.float64, 0.0, 1.0),
}


def _av_frame_samples(frame) -> np.ndarray:
    """One decoded PyAV AudioFrame -> float32 [channels, samples]."""
    name = frame.format.name.removesuffix("p")  # "fltp" -> "flt": planar and packed hold the same values
    if name not in _AV_FORMATS:
        raise _NotForThisReader(f"unsupported sample format {frame.format.name}")
    dtype, offset, scale = _AV_FORMATS[name]
    channels = len(frame.layout.channels)
    arr = frame.to_ndarray()
    if frame.format.is_planar:  # [channels, samples]
        arr = arr.reshape(channels, -1)
    else:  # packed: [1, samples * channels], interleaved
        arr = arr.reshape(-1, channels).T
    arr = arr.astype(np.float64)
    if offset or scale != 1.0:
        arr = (arr - offset) / scale
    return arr.astype(np.float32)


def join_chunks(chunks: Sequence[tuple[np.ndarray, int]], path: str) -> tuple[np.ndarray, int]:
    """Decoded chunks [(float32 [C, n], sample_rate)] -> ([C, T], sample_rate). A stream whose rate or channel count
    changes midway cannot be one waveform: `AudioError` names the chunk."""
    if not chunks:
        raise AudioError(f"audio file {path} holds no samples")
    c0, sr0 = chunks[0][0].shape[0], chunks[0][1]
    for i, (arr, sr) in enumerate(chunks):
        if sr != sr0:
            raise AudioError(f"audio file {path}: sample rate changes from {sr0} to {sr} Hz at decoded frame {i}")
        if arr.shape[0] != c0:
            raise AudioError(f"audio file {path}: channel count changes from {c0} to {arr.shape[0]} at decoded "
                             f"frame {i}")
    return np.concatenate([a for a, _ in chunks], axis=1), int(sr0)


def _read_av(path: str) -> tuple[np.ndarray, int]:
    try:
        import av
    except ImportError:
        raise _NotForThisReader("not installed (pip install av)") from None
    try:
        container = av.open(path)
    except Exception as e:  # av.error.* (InvalidDataError, ...) / OSError
        raise _NotForThisReader(f"{type(e).__name__}: {e}") from e
    try:
        if not container.streams.audio:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise AudioError(f"{path} has no audio stream (streams: {kinds})")
        stream = container.streams.audio[0]
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks.append((_av_frame_samples(frame), int(frame.sample_rate or stream.rate or 0)))
        except _NotForThisReader:
            raise
        except Exception as e:  # a corrupt packet midway: name the file and how far decoding got
            raise _NotForThisReader(f"decoding failed after {len(chunks)} frames: {type(e).__name__}: {e}") from e
        if not chunks:
            raise AudioError(f"audio file {path} holds no samples")
        return join_chunks(chunks, path)
    finally:
        container.close()


def prepare_waveform(waveform, sample_rate: int, *, max_duration_s: float | None = None) -> np.ndarray:
    """Official `normalize_audio_tensor` + duration cap: mono float32 at 16 kHz. A waveform at another rate is
    resampled, not rejected; `max_duration_s` (> 0) keeps only the first that many seconds after resampling."""
    wav = resample(to_mono_float32(waveform), sample_rate, SAMPLE_RATE)
    if max_duration_s is not None and max_duration_s > 0:
        wav = wav[: int(max_duration_s * SAMPLE_RATE)]
    return wav


# ----------------------------------------------------------------------------------------------------------------
# Log-mel spectrogram


@functools.lru_cache(maxsize=4)
def mel_filterbank(n_mels: int) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters over the 201 rfft bins of a 400-point FFT at 16 kHz,
    float32 [n_mels, 201]: exactly the matrices whisper ships in mel_filters.npz."""
    if n_mels not in SUPPORTED_N_MELS:
        raise AudioError(f"n_mels must be one of {SUPPORTED_N_MELS}, got {n_mels}")
    # librosa.filters.mel(sr=16000, n_fft=400, n_mels, htk=False, norm="slaney", dtype=float32), step for step:
    # band edges n_mels + 2 points evenly spaced on the Slaney mel scale from 0 Hz to Nyquist, triangles computed
    # in float64 and stored row by row into float32, then scaled in place by 2 / (upper edge - lower edge).
    fftfreqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE)
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2)
    mel_f = _mel_to_hz(mels)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, N_FFT // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2: n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    weights.setflags(write=False)  # cached: callers share one array
    return weights


# Slaney's auditory-toolbox mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
_MEL_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MEL_MIN_LOG_HZ = 1000.0
_MEL_MIN_LOG_MEL = _MEL_MIN_LOG_HZ / _MEL_F_SP
_MEL_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz >= _MEL_MIN_LOG_HZ:
        return _MEL_MIN_LOG_MEL + np.log(hz / _MEL_MIN_LOG_HZ) / _MEL_LOGSTEP
    return hz / _MEL_F_SP


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freqs = _MEL_F_SP * mels
    log_t = mels >= _MEL_MIN_LOG_MEL
    freqs[log_t] = _MEL_MIN_LOG_HZ * np.exp(_MEL_LOGSTEP * (mels[log_t] - _MEL_MIN_LOG_MEL))
    return freqs


@functools.lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    n = np.arange(N_FFT, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * n / N_FFT)  # periodic Hann, as torch.hann_window


def num_mel_frames(num_samples: int) -> int:
    """Frames of `log_mel_spectrogram` for a 16 kHz waveform of `num_samples` samples (one per 10 ms hop)."""
    return num_samples // HOP_LENGTH


def log_mel_spectrogram(waveform: np.ndarray, n_mels: int = 128) -> np.ndarray:
    """whisper.log_mel_spectrogram of a 16 kHz mono waveform, transposed to time-major: float32 [T // 160, n_mels].

    The waveform must be longer than N_FFT // 2 = 200 samples: the centred first frame is reflect-padded by 200
    samples, which needs at least 201 (whisper fails there too)."""
    wav = np.asarray(waveform)
    if wav.ndim != 1:
        raise AudioError(f"log_mel_spectrogram expects a 1-D waveform, got shape {wav.shape}")
    if wav.shape[0] <= N_FFT // 2:
        raise AudioError(f"waveform has {wav.shape[0]} samples; at least {N_FFT // 2 + 1} (~12.6 ms at 16 kHz) are "
                         "needed for one spectrogram frame")
    if not np.all(np.isfinite(wav)):
        raise AudioError("waveform contains NaN or infinite samples")
    # Computed in float64 and rounded once at the end. The official runs torch.stft in float32, whose FFT rounding
    # moves low-energy bins by ~1e-5 of the output range after the log; no numpy FFT reproduces those roundings
    # (the FFT libraries differ), so we return the exact value and leave the official's own float32 noise as the
    # parity error (measured ~2e-5 relative max-abs on the golden chirp).
    wav = wav.astype(np.float64)
    padded = np.pad(wav, N_FFT // 2, mode="reflect")  # centre frame k at sample k * hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]  # [T//hop + 1, N_FFT]
    frames = frames[:-1]  # whisper drops the last frame -> exactly T // hop frames
    spectrum = np.fft.rfft(frames * _hann_window(), axis=-1)  # [F, 201] complex128
    power = spectrum.real**2 + spectrum.imag**2  # [F, 201]
    mel = np.einsum("fk,mk->fm", power, mel_filterbank(n_mels).astype(np.float64))  # [F, n_mels]
    log_mel = np.log10(np.maximum(mel, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)  # keep 8 decades (80 dB) below the clip's peak
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


def whisper_frontend(waveform: np.ndarray, n_mels: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Official `WhisperFrontend` on one 16 kHz waveform: (feats float32 [1, T_mel, n_mels], lens int64 [1])."""
    mel = log_mel_spectrogram(waveform, n_mels)
    return mel[None], np.array([mel.shape[0]], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Processor-level batching and token counts


def encoder_output_length(mel_frames, kernel_size: int = 3, stride: int = 2):
    """Audio tokens the LLM receives for `mel_frames` mel frames: whisper's stride-2 conv (k 3, pad 1) followed by
    the projector's conv (k `kernel_size`, pad kernel_size // 2, stride `stride`). Works on ints and int arrays.
    The official processor hard-codes k 3 / s 2 for both convs; the encoder path reads the projector's from the
    audio config (ds_kernel_size, ds_stride)."""
    after_whisper = (mel_frames - 3 + 2 * 1) // 2 + 1
    return (after_whisper - kernel_size + 2 * (kernel_size // 2)) // stride + 1


def process_audios(audios: Sequence[tuple[Any, int]], cfg: WhisperFrontendConfig = WhisperFrontendConfig(), *,
                   max_duration_s: float | None = None) -> dict[str, np.ndarray]:
    """Official `BailingMM2AudioProcessor(audios, use_whisper_encoder=True)` for one sample holding several clips.

    `audios` is a list of (waveform, sample_rate); each clip is normalised, resampled to 16 kHz and turned into
    log-mel features, and the clips are concatenated along time ("wrapped" layout). Returns
      audio_feats            float32 [1, sum T_i, n_mels]
      audio_feats_lengths    int64 [1, n_clips]   mel frames per clip
      encoder_feats_lengths  int64 [1, n_clips]   LLM audio tokens per clip (official k3/s2 twice)
    """
    if len(audios) == 0:
        raise AudioError("process_audios needs at least one (waveform, sample_rate) clip")
    feats = []
    for i, item in enumerate(audios):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise AudioError(f"clip {i}: expected a (waveform, sample_rate) pair, got {type(item).__name__}")
        wav, sr = item
        feats.append(log_mel_spectrogram(prepare_waveform(wav, sr, max_duration_s=max_duration_s), cfg.n_mels))
    lengths = np.array([[f.shape[0] for f in feats]], dtype=np.int64)
    return {
        "audio_feats": np.concatenate(feats, axis=0)[None],
        "audio_feats_lengths": lengths,
        "encoder_feats_lengths": encoder_output_length(lengths),
    }
