"""Weight-only quantization: the arithmetic, and the quantized weights the grouped matmuls take.

A quantized weight is a `qwix.QArray` (qvalue, scale; symmetric, no zero point): qvalue has the weight's shape and
dtype int8 or float8_e4m3fn, scale is float32 of the same rank, each of its dims either the weight's (per-channel),
1 (shared) or a divisor of it (sub-channel: blocks of dim / scale_dim along that axis), and

    weight ~= qvalue * broadcast(scale)              (qwix's "generic broadcast": `dequantize`)

`quantize` reduces |w| over the contracted axes (the whole axis, or blocks of `block` along it): per output channel
by default. The same code runs on numpy (the converter and quantize at load, on the host) and on jax
(`quantize_model` on devices): scale = amax / qmax (amax 0 -> scale 1), qvalue = clip(round(w / scale), -127, 127)
for int8, clip(w / scale, -448, 448) cast to e4m3 (round to nearest even) for fp8, all in float32; the same bytes on
numpy and XLA:CPU (TPU division may round a tie the other way).

Grouped-matmul weights [G, K, N] (K contracted) accept two layouts (`expert_scales`):
    per-channel  scale [G, 1, N]       applied to the float32 accumulators (the kernels' epilogue)
    sub-channel  scale [G, K / bk, N]  block k of bk rows: applied to each block's partial product
Anything else (a scale varying along N in blocks, or along G) is rejected with the shapes named.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from qwix import QArray

QTYPES = ("int8", "fp8")
QDTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
QMAX = {"int8": 127.0, "fp8": 448.0}


def qtype_of(dtype) -> str:
    """"int8" / "fp8" of a stored qvalue dtype."""
    dtype = np.dtype(dtype)
    for name, dt in QDTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not a quantized weight dtype (int8, float8_e4m3fn)")


def check_qtype(qtype: str) -> str:
    if qtype not in QTYPES:
        raise ValueError(f"quantization {qtype!r}: choose one of {', '.join(QTYPES)}")
    return qtype


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


def scale_shape(shape: Sequence[int], contract: Sequence[int], block: int | None = None) -> tuple[int, ...]:
    """The scale's shape for a weight of `shape` reduced over the axes `contract`: 1 on each contracted axis, or with
    `block`, dim / block on the (single) contracted axis when block divides it (per-channel when it does not, or
    when block >= dim)."""
    out = list(shape)
    contract = [a % len(shape) for a in contract]
    for a in contract:
        out[a] = 1
    if block is not None and len(contract) == 1:
        a = contract[0]
        if 0 < block < shape[a] and shape[a] % block == 0:
            out[a] = shape[a] // block
    return tuple(out)


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def _blocked(x, s_shape):
    """x reshaped so that every scale dim d of size s < dim D splits into (s, D / s); the scale then broadcasts
    against it after `_expand_scale`."""
    new = []
    for d, s in zip(x.shape, s_shape):
        new += [d] if s in (1, d) else [s, d // s]
    return x.reshape(new)


def _expanded_shape(shape, s_shape):
    """The scale's shape against `_blocked(x)`: a unit axis after every blocked dim."""
    new = []
    for d, s in zip(shape, s_shape):
        new += [s] if s in (1, d) else [s, 1]
    return tuple(new)


def _expand_scale(scale, shape):
    return scale.reshape(_expanded_shape(shape, scale.shape))


def quantize(w, qtype: str, contract: Sequence[int], block: int | None = None) -> QArray:
    """w (numpy or jax, any float dtype) -> QArray(qvalue int8 / float8_e4m3fn, scale float32); see the module
    docstring. `contract`: the contracted axes (negative counts from the end); `block`: sub-channel block along the
    single contracted axis (None: per-channel)."""
    check_qtype(qtype)
    xp = _xp(w)
    w32 = w.astype(np.float32)
    s_shape = scale_shape(w.shape, contract, block)
    blocked = _blocked(w32, s_shape)
    expanded = _expanded_shape(w.shape, s_shape)
    reduce = tuple(i for i, (a, b) in enumerate(zip(blocked.shape, expanded)) if b == 1 and a > 1)
    amax = xp.max(xp.abs(blocked), axis=reduce, keepdims=True) if reduce else xp.abs(blocked)
    qmax = np.float32(QMAX[qtype])
    # amax x (1 / qmax), not amax / qmax: XLA rewrites a division by a constant into that multiplication, so numpy
    # (the converter) and a jitted quantize on CPU give the same bytes.
    scale = xp.where(amax > 0, amax * np.float32(1.0 / QMAX[qtype]), np.float32(1.0)).astype(np.float32)
    x = blocked / scale
    if qtype == "int8":
        q = xp.clip(xp.round(x), -qmax, qmax).astype(np.int8)
    else:
        q = xp.clip(x, -qmax, qmax).astype(QDTYPES["fp8"])
    return QArray(q.reshape(w.shape), scale.reshape(s_shape), None, q.dtype)


def dequantize(q: QArray, dtype=jnp.float32):
    """qvalue * broadcast(scale) in `dtype` (computed in float32); numpy in, numpy out."""
    xp = _xp(q.qvalue)
    v = _blocked(q.qvalue.astype(np.float32), q.scale.shape)
    out = (v * _expand_scale(q.scale.astype(np.float32), q.qvalue.shape)).reshape(q.qvalue.shape)
    return out.astype(dtype) if xp is jnp else out.astype(np.dtype(dtype))


def nbytes(q: QArray) -> int:
    return int(q.qvalue.size * q.qvalue.dtype.itemsize + q.scale.size * q.scale.dtype.itemsize)


# --- grouped-matmul weights -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertScales:
    """How the scale of a quantized [G, K, N] expert stack applies: `block` rows of K share one scale row (block ==
    K: per-channel, applied once to the accumulators)."""

    block: int
    k: int

    @property
    def per_channel(self) -> bool:
        return self.block == self.k

    @property
    def k_blocks(self) -> int:
        return self.k // self.block


def expert_scales(w: QArray, what: str = "weight") -> ExpertScales:
    """Validate a quantized [G, K, N] grouped-matmul weight and say how its scale applies."""
    if w.qvalue.ndim != 3:
        raise ValueError(f"quantized {what} must be [G, K, N], got qvalue {w.qvalue.shape}")
    if w.zero_point is not None:
        raise ValueError(f"quantized {what}: asymmetric (zero-point) weights are not supported")
    if w.qvalue.dtype not in tuple(QDTYPES.values()):
        raise ValueError(f"quantized {what}: qvalue dtype {w.qvalue.dtype} (int8 or float8_e4m3fn)")
    g, k, n = w.qvalue.shape
    sg, sk, sn = w.scale.shape if w.scale.ndim == 3 else (None, None, None)
    if sg != g or sn != n or k % sk:
        raise ValueError(f"quantized {what} [G={g}, K={k}, N={n}]: scale {tuple(w.scale.shape)} must be [G, 1, N] "
                         f"(per output channel) or [G, K / block, N] (sub-channel along K)")
    return ExpertScales(k // sk, k)


def weight_shape(w) -> tuple[int, ...]:
    return tuple(w.qvalue.shape if is_quantized(w) else w.shape)

