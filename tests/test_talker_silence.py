"""The talker's trailing-silence hold against the official `BailingTalker2.silence_holder` on reference streams
(tests/data/talker_silence_reference, made by tools/make_talker_silence_reference.py with the official file): the
same audio out of every chunk, chunk by chunk, with the state carried as the release's streaming job carries it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ming_jax.models.talker import audio_vae as av

DATA = os.path.join(os.path.dirname(__file__), "data", "talker_silence_reference", "silence.npz")
_REF = np.load(DATA)
CASES = sorted({k.split("/")[0] for k in _REF.files})


@pytest.mark.parametrize("case", CASES)
def test_trim_silence_equals_official(case):
    x, rate = _REF[f"{case}/input"], int(_REF[f"{case}/rate"])
    sizes = _REF[f"{case}/chunk_sizes"]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    state = None
    for i, n in enumerate(sizes):
        chunk = x[..., starts[i]:starts[i] + n]
        out, state = av.trim_silence(chunk, rate, state, last_chunk=i == len(sizes) - 1)
        want = _REF[f"{case}/out{i}"]
        assert out.shape == want.shape, (case, i)
        np.testing.assert_array_equal(out, want, err_msg=f"{case} chunk {i}")


def test_reference_covers_holds_and_releases():
    """The reference streams exercise what the hold does: audio held back (a chunk emitting nothing), released
    later (a chunk emitting more than it got), and a quiet end cut to the tail."""
    held = released = 0
    for case in CASES:
        sizes = _REF[f"{case}/chunk_sizes"]
        outs = [_REF[f"{case}/out{i}"].shape[-1] for i in range(len(sizes))]
        held += sum(o == 0 for o in outs[:-1])
        released += sum(o > s for o, s in zip(outs, sizes))
    assert held >= 5 and released >= 3
