"""Parameter creation with logical sharding axis names.

Every parameter carries a tuple of logical axis names (`("embed", "mlp")`, ...). `ming_jax.sharding` maps those to
mesh axes with a rules object; nothing here knows about meshes. Parameters are created unsharded
(`eager_sharding=False`): placement happens at jitted init or at checkpoint restore, from the same names.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.pallas.gmm import quant

Init = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} given {len(axes)} axis names {tuple(axes)}")
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


# --- quantized weights -----------------------------------------------------------------------------------------------


class QuantizedParam(nnx.Module):
    """A weight-only quantized parameter in a module's place of an `nnx.Param`: `qvalue` (int8 / float8_e4m3fn, the
    weight's shape and logical axes) and `scale` (float32, same rank: 1 on the contracted axes, or blocks of them;
    those axes unsharded), both `nnx.Param`s with logical axis names, so meshes, checkpoints and the layer scan see
    two ordinary parameters (`<path>.qvalue`, `<path>.scale`). `dtype` is the float dtype it stands for (what
    `read` dequantises to when asked for no other), `block` the sub-channel block it was quantized with. Made by
    `ming_jax.quant`; read through `read`.
    """

    def __init__(self, qvalue: nnx.Param, scale: nnx.Param, dtype, block: int | None = None):
        self.qvalue = qvalue
        self.scale = scale
        self.dtype = str(jnp.dtype(dtype))
        self.block = block  # the sub-channel block asked for (None: per channel; it applies where it divides K)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.get_value().shape)

    def qarray(self):
        """The stored (qvalue, scale) as a `qwix.QArray`: what the grouped matmuls take."""
        v = self.qvalue.get_value()
        return quant.QArray(v, self.scale.get_value(), None, v.dtype)


# --- low-rank adapters ----------------------------------------------------------------------------------------------


class LoraParam(nnx.Param):
    """A LoRA factor (A or B of `LoraWeight`): an `nnx.Param` of its own type, so that training selects exactly the
    adapters (`nnx.state(model, LoraParam)`) and everything else stays frozen."""


class LoraWeight(nnx.Module):
    """A weight with a low-rank adapter, in a module's place of its `nnx.Param` or `QuantizedParam` (made by
    `ming_jax.lora.add_lora`; read through `read`): W = base + (alpha / rank) * A @ B.

    The base keeps its layout [lead..., in..., out...] (lead: the experts axis of an expert stack, and in storage
    the stacked MoE layers' `layers` axis; in: the axes the consumer contracts). `lora_a` is [lead..., in..., r]
    (logical axes: the base's, then "lora_rank"), `lora_b` [lead..., r, out...]; `n_in` counts the in axes, so
    the same code reads a per-layer slice inside the layer scan and the stacked arrays when merging. `merged`:
    the delta has been added into the base (`ming_jax.lora.merge_lora`), so `read` returns the base alone.
    """

    def __init__(self, base, lora_a: LoraParam, lora_b: LoraParam, *, n_in: int, rank: int, alpha: float):
        self.base = base
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.n_in = int(n_in)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.merged = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape) if isinstance(self.base, QuantizedParam) else tuple(
            self.base.get_value().shape)

    def delta(self, dtype=None, a=None, b=None):
        """scale * A @ B in the base's layout [lead..., in..., out...], accumulated in float32, rounded to `dtype`
        (default float32). `a` / `b`: other values of the factors (default: the stored ones)."""
        a = self.lora_a.get_value() if a is None else a
        b = self.lora_b.get_value() if b is None else b
        n_lead = a.ndim - 1 - self.n_in
        lead, ins, outs = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1:]
        dt = jnp.dtype(dtype or jnp.float32)
        a2 = a.reshape(lead + (int(np.prod(ins)), self.rank)).astype(dt)  # [lead..., I, r]
        b2 = b.reshape(lead + (self.rank, int(np.prod(outs)))).astype(dt)  # [lead..., r, O]
        d = jnp.einsum("...ir,...ro->...io", a2, b2, preferred_element_type=jnp.float32)
        return (self.scale * d).reshape(lead + ins + outs).astype(dt)


def _read_lora(weight: LoraWeight, dtype, quantized: bool):
    base = weight.base
    if isinstance(base, QuantizedParam):
        if quantized:  # `add_lora` refuses this pairing; a consumer of QArrays cannot take base + delta
            raise ValueError("a LoRA adapter on a quantized weight read by a quantized consumer (the routed "
                             "experts' grouped matmuls): base + delta is no QArray")
        value = quant.dequantize(base.qarray(), jnp.dtype(dtype or base.dtype))
    else:
        value = base.get_value()
        if dtype is not None and value.dtype != jnp.dtype(dtype):
            value = value.astype(dtype)
    if weight.merged:
        return value
    return value + weight.delta(value.dtype)


# --- the one weight-read site ---------------------------------------------------------------------------------------

WeightHook = Callable[[Any, Any], Any]  # (the stored weight: nnx.Variable or a wrapped weight, value) -> value
_HOOKS: list[WeightHook] = []


def read(weight, dtype=None, *, quantized: bool = False):
    """The value of a weight as it enters a computation: THE site every projection, embedding, norm scale, conv kernel
    and expert stack of every tower reads its parameter through (`read(self.kernel, x.dtype)`).

    * `weight` a `QuantizedParam` (weight-only int8 / fp8, `ming_jax.quant`): dequantised, qvalue x scale in float32
      rounded to `dtype` (default: the dtype it stands for), so every projection works unchanged; XLA fuses the
      dequantisation into the matmul's operand. With `quantized=True` (a consumer that takes quantized weights
      itself: the routed experts' grouped matmuls) it is handed on as a `qwix.QArray`, not dequantised. A float
      weight read with `quantized=True` is read as usual.

    * `weight` a `LoraWeight` (`ming_jax.lora`): its base read as above (a quantized base dequantised) plus
      (alpha / rank) * A @ B in the compute dtype (float32 accumulation); only the base once merged. The delta is
      dense, the base's size: for an expert stack that is one [E, D, F] temporary per layer.
    * `weight` an `nnx.Variable`: its stored array, cast to `dtype` when given and different. The array is the very
      object the variable holds (no copy when no cast is needed), so op interceptors that look a weight up among the
      module's parameters by identity or through unary ops (qwix's PTQ / LoRA providers, `flax_util.find_param`)
      recognise it.
    * anything else (a wrapped weight, e.g. qwix PTQ's `WithAux` holding a `QArray` after `qwix.quantize_model`):
      handed on untouched, neither unboxed nor cast; the intercepted op that consumes it knows how to use it.

    Hooks installed with `weight_hook` then see `(weight, value)` and return the value that is used (quantize,
    add a low-rank delta, record, stop gradients, ...). With no hook installed this is exactly `param[...].astype(dt)`.
    """
    if isinstance(weight, nnx.Variable):
        value = weight.get_value()
        if dtype is not None and value.dtype != jnp.dtype(dtype):
            value = value.astype(dtype)
    elif isinstance(weight, LoraWeight):
        value = _read_lora(weight, dtype, quantized)
    elif isinstance(weight, QuantizedParam):
        value = weight.qarray()
        if not quantized:
            value = quant.dequantize(value, jnp.dtype(dtype or weight.dtype))
    else:
        value = weight
    for hook in _HOOKS:
        value = hook(weight, value)
    return value


@contextlib.contextmanager
def weight_hook(fn: WeightHook) -> Iterator[WeightHook]:
    """Install `fn(weight, value) -> value` on every `read` while the context is open (at trace time: a jitted
    function traced outside the context does not see it). Hooks nest; the innermost runs last."""
    _HOOKS.append(fn)
    try:
        yield fn
    finally:
        _HOOKS.remove(fn)


def has_weight_hooks() -> bool:
    """Whether a `weight_hook` is installed (at trace time): then every weight must go through `read` one by one."""
    return bool(_HOOKS)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def fan_in_normal(fan_in_axes: Sequence[int] = (0,), scale: float = 1.0) -> Init:
    """N(0, scale^2 / fan_in) where fan_in is the product of `fan_in_axes` of the shape."""

    def init(key, shape, dtype):
        fan_in = 1
        for a in fan_in_axes:
            fan_in *= shape[a]
        return (scale / fan_in**0.5) * jax.random.normal(key, shape, dtype)

    return init


def normal(stddev: float) -> Init:
    def init(key, shape, dtype):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def uniform_fan_in(axis: int = 0) -> Init:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = shape[axis] (torch's default Linear init)."""

    def init(key, shape, dtype):
        bound = 1.0 / shape[axis] ** 0.5
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --- random weights drawn on the host -------------------------------------------------------------------------------


def host_random(model: nnx.Module, seed: int = 0, *, stddev: float = 0.02,
                special: dict[str, Callable[[tuple[int, ...]], np.ndarray]] | None = None) -> nnx.Module:
    """`model` (abstract, e.g. from `nnx.eval_shape`, or not) with every parameter drawn with numpy on the host: no
    initializer is compiled, which on a busy CPU saves seconds to a minute even for tiny models (every parameter
    shape is an XLA program of its own). Norm scales (`scale`) are 1, biases (`*bias`, `b_*`) 0, a name in
    `special` gets `special[name](shape)`, every other tensor N(0, stddev^2), drawn in parameter order."""
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = []
    for path, var in nnx.to_flat_state(params):
        name = str(path[-1])
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if name == "scale":
            value = np.ones(shape, np.float32)
        elif name.endswith("bias") or name.startswith("b_"):
            value = np.zeros(shape, np.float32)
        elif special and name in special:
            value = special[name](shape)
        else:
            value = stddev * rng.standard_normal(shape, np.float32)
        var.set_value(jnp.asarray(value, dtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
