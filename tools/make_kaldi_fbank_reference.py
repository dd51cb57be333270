"""Make the kaldi-fbank reference: `torchaudio.compliance.kaldi.fbank` with the talker's speaker-embedding settings
(num_mel_bins=80, dither=0, sample_frequency=16000) on two fixed clips.

    python tools/make_kaldi_fbank_reference.py --kaldi /path/to/torchaudio/compliance/kaldi.py \
        --out tests/data/kaldi_fbank_reference.npz

`--kaldi` is torchaudio's kaldi.py, unmodified (e.g. taken out of a torchaudio wheel: it is pure torch code, so it
runs with any recent torch even when no torchaudio build matches it); without it the installed torchaudio is used.
The file is imported from where it lies, with a stand-in `torchaudio` module for its one top-level import (used by
mfcc only); nothing of it is stored in this project. `tests/test_tts.py` reads only the .npz this writes (the
inputs, the features, and the source's git blob id).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import types

import numpy as np


def clips() -> dict[str, np.ndarray]:
    """A 0.6 s chirp with noise and a short 0.1 s clip with a DC offset (float32 in [-1, 1], 16 kHz)."""
    rng = np.random.default_rng(7)
    t = np.arange(9600) / 16000.0
    chirp = 0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * rng.normal(size=t.shape)
    short = 0.2 + 0.3 * np.sin(2 * np.pi * 440 * np.arange(1600) / 16000.0)
    return {"chirp": chirp.astype(np.float32), "short": short.astype(np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kaldi", default=None, help="torchaudio's compliance/kaldi.py")
    ap.add_argument("--out", default="tests/data/kaldi_fbank_reference.npz")
    args = ap.parse_args()
    import torch

    if args.kaldi:
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
        spec = importlib.util.spec_from_file_location("kaldi_reference", args.kaldi)
        kaldi = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kaldi)
        with open(args.kaldi, "rb") as f:
            data = f.read()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    else:
        import torchaudio.compliance.kaldi as kaldi

        blob = f"torchaudio {__import__('torchaudio').__version__}"
    out = {"source_blob": np.asarray(blob), "torch": np.asarray(torch.__version__)}
    for name, wave in clips().items():
        feats = kaldi.fbank(torch.from_numpy(wave)[None], num_mel_bins=80, dither=0, sample_frequency=16000)
        out[f"{name}_wave"] = wave
        out[f"{name}_fbank"] = feats.numpy().astype(np.float32)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items() if v.ndim))


if __name__ == "__main__":
    main()
