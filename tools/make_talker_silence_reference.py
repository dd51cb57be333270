"""Reference data for the talker's trailing-silence hold, made with the OFFICIAL function.

    python tools/make_talker_silence_reference.py --official /path/to/Ming2 --out tests/data/talker_silence_reference

`--official` is a checkout (or `git archive`) of the official Ming-flash-omni 2.0 code (github Zihhan318/Ming2) with
`modeling_bailing_talker.py` at its top. This script imports that file as it is and runs its
`BailingTalker2.silence_holder` (a static method: plain torch, no weights) over synthetic streams: speech-like bursts
and silences at several sample rates, cut into chunks of several sizes, each stream fed chunk by chunk with the
official cache as the release's `tts_job` does, and also whole. The modules the file imports but this function never
uses (onnxruntime, torchaudio, x_transformers, loguru, inflect, the pynini normaliser) are stubbed when absent. Needs
torch and transformers. Writes `silence.npz` (inputs and per-chunk outputs) and `README.md` (the official file's git
blob id, the cases). Nothing here is imported by ming_jax; run it outside the package, commit its output.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import types

import numpy as np

OFFICIAL_FILE = "modeling_bailing_talker.py"
# (case name, sample rate, [(segment seconds, amplitude)], chunk sizes in samples (cycled); 0: the whole stream)
CASES = [
    ("speech_then_silence", 1000, [(0.45, 0.3), (0.6, 0.0)], [130, 70, 250]),
    ("silence_then_speech", 1000, [(0.5, 0.0), (0.35, 0.2), (0.05, 0.0)], [90, 160]),
    ("bursts", 1000, [(0.2, 0.4), (0.3, 0.0), (0.25, 0.1), (0.4, 0.0), (0.1, 0.5), (0.05, 0.0)], [110, 40, 300]),
    ("all_silence", 1000, [(0.9, 0.0)], [200, 150]),
    ("near_threshold", 1000, [(0.3, 1.6e-3), (0.3, 0.6e-3), (0.3, 1.2e-3)], [100]),
    ("short_stream", 1000, [(0.07, 0.3)], [30, 30, 30]),
    ("rate_2400", 2400, [(0.3, 0.2), (0.5, 0.0), (0.2, 0.3), (0.4, 0.0)], [500, 333]),
    ("rate_44100_short", 44100, [(0.15, 0.25), (0.35, 0.0)], [6000, 9000]),
    ("whole_speech_then_silence", 1000, [(0.45, 0.3), (0.6, 0.0)], [0]),
    ("whole_bursts", 2400, [(0.2, 0.4), (0.3, 0.0), (0.25, 0.1), (0.4, 0.0)], [0]),
    ("whole_all_silence", 1000, [(0.9, 0.0)], [0]),
]


def _stub(name: str, **attrs) -> None:
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        _stub(parent)
        setattr(sys.modules[parent], child, mod)


def _import_official(folder: str):
    class _Anything:  # a stand-in for every class / function of a stubbed module
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            return self

        def __getattr__(self, name):
            return _Anything()

    import transformers  # noqa: F401  before the stubs: its availability probes must not see them
    from transformers import AutoTokenizer, PreTrainedModel, Qwen2Config, Qwen2Model, StaticCache  # noqa: F401

    for name in ("onnxruntime", "torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi",
                 "torchaudio.transforms", "inflect"):
        _stub(name, **{"InferenceSession": _Anything, "SessionOptions": _Anything,
                       "GraphOptimizationLevel": _Anything(), "fbank": _Anything(), "Resample": _Anything,
                       "engine": _Anything, "load": _Anything(), "save": _Anything()})
    _stub("loguru", logger=_Anything())
    _stub("x_transformers")
    _stub("x_transformers.x_transformers", RotaryEmbedding=_Anything, apply_rotary_pos_emb=_Anything())
    sys.path.insert(0, os.path.abspath(folder))
    import modeling_bailing_talker as official  # noqa: E402  (the official file, as it is)

    return official


def _signal(rate: int, segments, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for seconds, amp in segments:
        n = int(round(seconds * rate))
        t = np.arange(n) / rate
        tone = np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        parts.append(amp * (tone + 0.3 * rng.standard_normal(n)))
    return np.concatenate(parts).astype(np.float32)[None, :]  # [1, L]: one channel, as the decoder emits


def _chunks(x: np.ndarray, sizes) -> list[np.ndarray]:
    if sizes == [0]:
        return [x]
    out, i, k = [], 0, 0
    while i < x.shape[-1]:
        n = sizes[k % len(sizes)]
        out.append(x[..., i:i + n])
        i, k = i + n, k + 1
    return out


def _blob(folder: str) -> str:
    try:
        return subprocess.run(["git", "hash-object", os.path.join(folder, OFFICIAL_FILE)], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # no git: the same id, computed by hand
        data = open(os.path.join(folder, OFFICIAL_FILE), "rb").read()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder with the official modeling_bailing_talker.py")
    ap.add_argument("--out", required=True, help="output folder (e.g. tests/data/talker_silence_reference)")
    args = ap.parse_args()
    import torch

    official = _import_official(args.official)
    hold = official.BailingTalker2.silence_holder
    arrays, lines = {}, []
    for seed, (name, rate, segments, sizes) in enumerate(CASES):
        x = _signal(rate, segments, seed)
        chunks = _chunks(x, sizes)
        cache = None
        arrays[f"{name}/input"] = x
        arrays[f"{name}/rate"] = np.array(rate)
        arrays[f"{name}/chunk_sizes"] = np.array([c.shape[-1] for c in chunks])
        for i, c in enumerate(chunks):
            last = i == len(chunks) - 1
            out, cache = hold(torch.from_numpy(np.ascontiguousarray(c)), rate, cache, last)
            arrays[f"{name}/out{i}"] = out.numpy()
        total = sum(arrays[f"{name}/out{i}"].shape[-1] for i in range(len(chunks)))
        lines.append(f"| {name} | {rate} | {x.shape[-1]} | {len(chunks)} | {total} |")
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "silence.npz"), **arrays)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("# Trailing-silence hold: reference outputs of the official `BailingTalker2.silence_holder`\n\n"
                f"Made by `tools/make_talker_silence_reference.py` with torch {torch.__version__} from the official "
                f"`{OFFICIAL_FILE}` (git blob {_blob(args.official)}). Each case: a synthetic signal [1, L] "
                "(`<case>/input`), fed in chunks of `<case>/chunk_sizes` samples with the official cache, "
                "last_chunk on the final one; `<case>/out<i>` is what the official function returned for chunk i. "
                "Default threshold 1e-3 and tail 0.3 s.\n\n| case | sample rate | samples | chunks | samples out |\n"
                "|---|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")
    print(f"wrote {len(CASES)} cases to {args.out}")


if __name__ == "__main__":
    main()
