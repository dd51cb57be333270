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
