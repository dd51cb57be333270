"""Kaldi-style log mel filterbank features (host side, numpy), as `torchaudio.compliance.kaldi.fbank` computes them
with the settings the talker's speaker-embedding front end uses (`num_mel_bins=80, dither=0,
sample_frequency=16000`, everything else at its default):

    frames        25 ms windows (400 samples) every 10 ms (160), only whole windows ("snip edges":
                  1 + (T - 400) // 160 frames)
    per frame     subtract the frame's mean; pre-emphasis x[j] - 0.97 x[j - 1] (x[-1] := x[0]); the "povey" window
                  (a symmetric Hann window to the power 0.85); zero padded to 512 samples
    spectrum      |rfft|^2 (257 bins)
    mel           80 triangular filters evenly spaced on the mel scale 1127 ln(1 + f / 700) between 20 Hz and the
                  Nyquist frequency, evaluated at the FFT bin frequencies (the Nyquist bin gets weight 0)
    log           ln(max(energy, float32 eps))

Arithmetic follows torch's float32 order where it matters (filter construction, framing); the FFT runs in float64
and is rounded to float32. Waveforms are float in [-1, 1] (no 16-bit rescaling: torchaudio's function does none).
`speaker_features` adds the talker's normalisation (the mean over time subtracted from every frame).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ming_jax.processors.audio import AudioError

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
POVEY_POWER = 0.85
EPS = np.float32(np.finfo(np.float32).eps)


def _mel(freq):
    return 1127.0 * np.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=8)
def mel_banks(num_bins: int, padded: int, sample_rate: float, low_freq: float = LOW_FREQ,
              high_freq: float = 0.0) -> np.ndarray:
    """[num_bins, padded // 2 + 1] float32 triangular filters (the last, Nyquist column zero). high_freq <= 0 is an
    offset from the Nyquist frequency."""
    if num_bins <= 3:
        raise ValueError(f"mel_banks: num_bins={num_bins} must be > 3")
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"mel_banks: bad band {low_freq} .. {high_freq} Hz for Nyquist {nyquist}")
    f32 = np.float32
    mel_low, mel_high = math.log(1.0 + low_freq / 700.0) * 1127.0, math.log(1.0 + high_freq / 700.0) * 1127.0
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=f32)[:, None]
    left = (f32(mel_low) + b * f32(delta)).astype(f32)
    center = (f32(mel_low) + (b + f32(1.0)) * f32(delta)).astype(f32)
    right = (f32(mel_low) + (b + f32(2.0)) * f32(delta)).astype(f32)
    bin_width = sample_rate / padded
    freqs = (f32(bin_width) * np.arange(padded // 2, dtype=f32)).astype(f32)
    mel = (f32(1127.0) * np.log(f32(1.0) + freqs / f32(700.0))).astype(f32)[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(f32(0.0), np.minimum(up, down)).astype(f32)
    return np.pad(banks, ((0, 0), (0, 1)))


@functools.lru_cache(maxsize=8)
def povey_window(size: int) -> np.ndarray:
    """A symmetric Hann window to the power 0.85 (float32), torch's hann_window(periodic=False) ** 0.85."""
    k = np.arange(size, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * k / (size - 1))
    return (hann.astype(np.float32) ** np.float32(POVEY_POWER)).astype(np.float32)


def kaldi_fbank(waveform, sample_rate: int = 16000, num_mel_bins: int = 80) -> np.ndarray:
    """waveform [T] (or [C, T]: channel 0, as torchaudio's channel=-1) float -> log mel energies [frames, bins]
    float32. AudioError when the clip is shorter than one 25 ms window."""
    wav = np.asarray(waveform, np.float32)
    if wav.ndim == 2:
        wav = wav[0]
    if wav.ndim != 1:
        raise AudioError(f"kaldi_fbank: expected a [T] or [C, T] waveform, got shape {np.shape(waveform)}")
    shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
    size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
    padded = 1 << (size - 1).bit_length()
    if wav.shape[0] < size:
        raise AudioError(f"kaldi_fbank: {wav.shape[0]} samples is shorter than one {FRAME_LENGTH_MS:g} ms window "
                         f"({size} samples at {sample_rate} Hz)")
    n = 1 + (wav.shape[0] - size) // shift
    frames = np.lib.stride_tricks.sliding_window_view(wav, size)[::shift][:n].astype(np.float32)
    frames = frames - frames.mean(axis=1, keepdims=True, dtype=np.float32)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - np.float32(PREEMPHASIS) * previous
    frames = frames * povey_window(size)[None, :]
    frames = np.pad(frames, ((0, 0), (0, padded - size)))
    spectrum = np.abs(np.fft.rfft(frames.astype(np.float64), axis=1)) ** 2  # [n, padded / 2 + 1]
    energies = spectrum.astype(np.float32) @ mel_banks(num_mel_bins, padded, float(sample_rate)).T
    return np.log(np.maximum(energies, EPS)).astype(np.float32)


def speaker_features(waveform_16k) -> np.ndarray:
    """The talker's CAM++ input for a 16 kHz clip: kaldi_fbank(80 bins) minus its mean over time, [frames, 80]."""
    feats = kaldi_fbank(waveform_16k, 16000, 80)
    return (feats - feats.mean(axis=0, keepdims=True)).astype(np.float32)
