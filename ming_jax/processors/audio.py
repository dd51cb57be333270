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
  Slaney-normalised mel filters (whisper ships them as `librosa.filters.mel(sr=16000, n_fft=400, n_mels)`, which we
  call directly: bit-identical), log10 with a 1e-10 floor, dynamic range clipped to 8 decades below the clip's
  maximum, then (x + 4) / 4.

Files are read with librosa (soundfile / audioread backends) at their native rate and resampled here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
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
    """Read an audio file at its native rate. Returns (float32 [channels, T] in [-1, 1], sample_rate).

    Raises `AudioError` naming the file when it is missing, cannot be decoded, or holds no samples."""
    import librosa  # heavy import (numba); only needed when reading files

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path}")
    try:
        with warnings.catch_warnings():  # librosa warns when it falls back from soundfile to audioread; we report
            warnings.simplefilter("ignore", UserWarning)  # the outcome ourselves
            warnings.simplefilter("ignore", FutureWarning)
            wav, sr = librosa.load(path, sr=None, mono=False, dtype=np.float32)
    except Exception as e:  # soundfile / audioread raise many unrelated types; name the file and keep the cause
        raise AudioError(f"cannot decode audio file {path}: {type(e).__name__}: {e}") from e
    wav = np.atleast_2d(wav)  # [C, T]
    if wav.shape[-1] == 0:
        raise AudioError(f"audio file {path} holds no samples")
    return wav, int(sr)


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
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels, dtype=np.float32)


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
