"""Quantize at load: a converted float checkpoint's projections restored straight into int8 / fp8 weights.

Each device's shard of `<param>.qvalue` / `<param>.scale` is made by a `jax.make_array_from_callback` callback that
reads the float region it needs from the checkpoint's zarr array (tensorstore: only that region, widened to the whole
contracted axes so the per-channel scales are exact), quantizes it on the host with the converter's arithmetic
(`ming_jax.pallas.gmm.quant.quantize`: the same bytes as a `--dtype int8|fp8` conversion) in chunks of at most
`CHUNK_BYTES` of float32, and hands back the int8 / fp8 slice. The float weights are never on a device: device memory
is the quantized model, host memory a shard plus one chunk.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
import numpy as np

from ming_jax import quant
from ming_jax.checkpoint import orbax_tree
from ming_jax.checkpoint.manifest import PARAMS_DIR
from ming_jax.pallas.gmm import quant as qmath

CHUNK_BYTES = 256 << 20


def _bounds(index, shape) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, shape[i] if s.stop is None else s.stop) if isinstance(s, slice) else (s, s + 1)
                 for i, s in enumerate(index))


class _Leaf:
    """One float leaf of the checkpoint quantized region by region (see the module docstring)."""

    def __init__(self, array, target: quant.Target, config: quant.QuantConfig):
        self.array, self.t, self.cfg = array, target, config
        self.scales: dict = {}  # non-contracted bounds -> scale of that region (made by the qvalue callbacks)
        self.last = None  # (non-contracted bounds, QArray of the whole-contraction region): fsdp shards reuse it

    def _key(self, bounds):
        return tuple(b for i, b in enumerate(bounds) if i not in self.t.contract)

    def _quantized(self, bounds) -> qmath.QArray:
        """The QArray of the region `bounds` widened to the whole contracted axes."""
        key = self._key(bounds)
        if self.last is not None and self.last[0] == key:
            return self.last[1]
        shape = self.t.shape
        full = [(0, shape[i]) if i in self.t.contract else b for i, b in enumerate(bounds)]
        chunk_axis = next(i for i in range(len(shape)) if i not in self.t.contract)
        lo, hi = full[chunk_axis]
        row = int(np.prod([b - a for i, (a, b) in enumerate(full) if i != chunk_axis])) * 4
        step = max(1, CHUNK_BYTES // max(row, 1))
        qs, ss = [], []
        for c in range(lo, hi, step):
            sl = list(full)
            sl[chunk_axis] = (c, min(hi, c + step))
            w = np.asarray(self.array[tuple(slice(a, b) for a, b in sl)].read().result())
            q = qmath.quantize(w, self.cfg.qtype, self.t.contract, self.cfg.block)
            qs.append(q.qvalue)
            ss.append(q.scale)
        qa = qmath.QArray(np.concatenate(qs, chunk_axis), np.concatenate(ss, chunk_axis), None, qs[0].dtype)
        self.last = (key, qa)
        self.scales[key] = qa.scale
        return qa

    def qvalue(self, index):
        bounds = _bounds(index, self.t.shape)
        q = self._quantized(bounds)
        return q.qvalue[tuple(slice(a, b) if i in self.t.contract else slice(None)
                              for i, (a, b) in enumerate(bounds))]

    def scale(self, index):
        s_shape = self.t.scale_shape
        bounds = _bounds(index, s_shape)
        key = tuple(b for i, b in enumerate(bounds) if i not in self.t.contract)
        sc = self.scales.pop(key, None)
        if sc is None:  # no qvalue shard covered this region here (another host's): compute it
            weight_bounds = tuple(b if i not in self.t.contract else (0, self.t.shape[i]) for i, b in enumerate(bounds))
            sc = self._quantized(weight_bounds).scale
        return sc[tuple(slice(a, b) if i in self.t.contract else slice(None) for i, (a, b) in enumerate(bounds))]


def fillers(ckpt_dir: str, subtree: str | None, targets: Mapping[str, quant.Target],
            config: quant.QuantConfig) -> dict[str, Callable]:
    """{"<param>.qvalue" / "<param>.scale": fn(target struct) -> jax.Array} for `restore_params(computed=...)`,
    quantizing the checkpoint's float `<param>` of every target (paths relative to `subtree`)."""
    reader = orbax_tree.TreeReader(os.path.join(ckpt_dir, PARAMS_DIR))
    prefix = f"{subtree}." if subtree else ""
    out = {}
    for path, t in targets.items():
        shape, _ = reader.spec(prefix + path)
        if shape != t.shape:
            raise ValueError(f"{prefix + path}: checkpoint shape {shape} != model {t.shape}")
        leaf = _Leaf(reader.array(prefix + path), t, config)

        def make(kind, leaf=leaf):
            def fn(struct):
                cb = leaf.qvalue if kind == "qvalue" else leaf.scale
                return jax.make_array_from_callback(struct.shape, struct.sharding, cb)

            return fn

        out[f"{path}.qvalue"] = make("qvalue")
        out[f"{path}.scale"] = make("scale")
    return out
