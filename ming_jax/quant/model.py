"""Weight-only int8 / fp8 quantization of a model's projections: which parameters, how, and the quantized model.

    cfg = QuantConfig.parse("int8")                  # or "fp8", "fp8:128" (sub-channel blocks of 128 along K)
    quantize_model(model, cfg)                       # in place: projections become `QuantizedParam`s
    abstract = quantize_model(llm.create_abstract(c), cfg)   # abstract too (ShapeDtypeStructs, nothing computed)

What is quantized (`LLM_RULES`): every projection of the language model, i.e. the attention qkv and output
kernels, the dense MLPs, the shared experts, the routed expert stacks and the LM head; each matched by its
attribute path and quantized over the axes its consumer contracts (named by logical axis, so the stacked MoE layers'
leading `layers` axis and the experts axis are kept): per output channel by default, or in blocks of `block` along
the contracted axis (sub-channel). Not quantized: the embedding table (a row gather, not a matmul), norm scales,
biases, and the routers (their float32 logits decide the top-k; a flipped choice moves a token's whole row).

A quantized parameter is a `ming_jax.layers.params.QuantizedParam` in the module's place of the `nnx.Param`:
`<path>.qvalue` (int8 / float8_e4m3fn, the weight's logical axes) and `<path>.scale` (float32, unit or blocked on the
contracted axes, which are unsharded there). `read` dequantises it for the einsum projections (XLA fuses the
dequantisation into the matmul's operand) and hands the expert stacks to the grouped matmuls as `qwix.QArray`s
(int8 / fp8 tiles in the Pallas kernels, scales in their epilogue). Memory: 1 byte per weight plus 4 bytes per
output channel (per block of K with sub-channel scales).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.layers.params import QuantizedParam
from ming_jax.pallas.gmm import quant

QTYPES = quant.QTYPES
COMPONENTS = ("llm",)  # the components whose parameters the converter and the loader quantize


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """qtype "int8" | "fp8" (float8_e4m3fn); block: sub-channel block along the contracted axis (None: one scale
    per output channel)."""

    qtype: str
    block: int | None = None

    def __post_init__(self):
        quant.check_qtype(self.qtype)
        if self.block is not None and (not isinstance(self.block, int) or self.block < 1):
            raise ValueError(f"QuantConfig.block={self.block!r}: a positive int, or None for per-channel scales")

    @classmethod
    def parse(cls, text: "str | QuantConfig | None") -> "QuantConfig | None":
        """"int8", "fp8", "fp8:128" / "int8:128" (sub-channel, block 128); None / "" / "none" -> None."""
        if text is None or isinstance(text, QuantConfig):
            return text
        text = text.strip().lower()
        if text in ("", "none"):
            return None
        qtype, _, block = text.partition(":")
        if qtype not in QTYPES:
            raise ValueError(f"quantization {text!r}: choose {' / '.join(QTYPES)}, optionally with ':BLOCK' for "
                             "sub-channel scales (e.g. fp8:128)")
        try:
            return cls(qtype, int(block) if block else None)
        except ValueError as e:
            raise ValueError(f"quantization {text!r}: {e}") from None

    def __str__(self) -> str:
        return self.qtype + (f":{self.block}" if self.block else "")

    def to_json(self) -> dict:
        return {"qtype": self.qtype, "block": self.block}

    @classmethod
    def from_json(cls, d: Mapping) -> "QuantConfig":
        return cls(d["qtype"], d.get("block"))

    @property
    def dtype(self) -> np.dtype:
        return quant.QDTYPES[self.qtype]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Parameters whose dotted path (inside the module being quantized) matches `pattern` are quantized over the
    axes named `contract` (logical axis names; every one must be among the parameter's)."""

    pattern: str
    contract: tuple[str, ...]

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


LLM_RULES = (
    Rule(r"(^|\.)attn\.qkv$", ("embed",)),
    Rule(r"(^|\.)attn\.out$", ("heads", "head_dim")),
    Rule(r"(^|\.)(mlp|shared)\.(gate|up)$", ("embed",)),
    Rule(r"(^|\.)(mlp|shared)\.down$", ("mlp",)),
    Rule(r"(^|\.)moe\.w_(gate|up)$", ("expert_embed",)),
    Rule(r"(^|\.)moe\.w_down$", ("expert_mlp",)),
    Rule(r"^lm_head$", ("embed",)),
)


@dataclasses.dataclass(frozen=True)
class Target:
    """One parameter to quantize: its path, shape, logical axes and contracted axes, and the scale it gets."""

    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    contract: tuple[int, ...]
    scale_shape: tuple[int, ...]

    @property
    def scale_axes(self) -> tuple[str | None, ...]:
        """The weight's axes with the reduced / blocked ones unsharded (a scale of 1 or K / block rows)."""
        return tuple(a if s == d else None for a, s, d in zip(self.axes, self.scale_shape, self.shape))

    def quantize(self, value, config: QuantConfig) -> quant.QArray:
        """numpy or jax -> QArray (the same bytes either way)."""
        if tuple(value.shape) != self.shape:
            raise ValueError(f"{self.path}: value shape {tuple(value.shape)} != {self.shape}")
        return quant.quantize(value, config.qtype, self.contract, config.block)


SLOT_CHUNK_BYTES = 64 << 20  # float32 bytes quantized at once by `quantize_slot` (numpy makes a few such temporaries)


def quantize_slot(value: np.ndarray, target: Target, config: QuantConfig, n_lead: int) -> quant.QArray:
    """Quantize one slot of a stacked parameter (`value` = the target's shape without its first `n_lead` axes, e.g.
    one expert of one layer), as the converter streams it: the same bytes as quantizing the whole stack, since the
    stacked axes are never contracted. On the host, in chunks of at most SLOT_CHUNK_BYTES of float32 along an axis
    that is not contracted, so a large tensor (the LM head) needs no float32 copies of itself."""
    contract = tuple(a - n_lead for a in target.contract)
    if min(contract, default=0) < 0 or tuple(value.shape) != target.shape[n_lead:]:
        raise ValueError(f"{target.path}: slot {tuple(value.shape)} of {target.shape} (n_lead={n_lead}) cannot be "
                         f"quantized on its own over axes {target.contract}")
    value = np.asarray(value)
    free = [a for a in range(value.ndim) if a not in contract]
    if not free or value.size * 4 <= SLOT_CHUNK_BYTES:
        return quant.quantize(value, config.qtype, contract, config.block)
    axis = max(free, key=lambda a: value.shape[a])
    step = max(1, value.shape[axis] * SLOT_CHUNK_BYTES // (value.size * 4))
    parts = [quant.quantize(np.take(value, np.arange(i, min(i + step, value.shape[axis])), axis=axis), config.qtype,
                            contract, config.block) for i in range(0, value.shape[axis], step)]
    return quant.QArray(np.concatenate([q.qvalue for q in parts], axis), np.concatenate([q.scale for q in parts], axis),
                        None, parts[0].qvalue.dtype)


def _axes(v: nnx.Variable) -> tuple:
    axes = v.get_metadata().get("out_sharding")
    return tuple(axes) if axes is not None else (None,) * len(v.get_value().shape)


def target_of(path: str, shape: Sequence[int], axes: Sequence[str | None], config: QuantConfig,
              rules: Iterable[Rule] = LLM_RULES) -> Target | None:
    """The Target of one parameter, or None when no rule matches it."""
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    for rule in rules:
        if rule.matches(path):
            missing = [c for c in rule.contract if c not in axes]
            if missing:
                raise ValueError(f"{path} {shape} (axes {axes}) matches quantization rule {rule.pattern!r} but has no "
                                 f"axis {missing}")
            contract = tuple(axes.index(c) for c in rule.contract)
            return Target(path, shape, axes, contract, quant.scale_shape(shape, contract, config.block))
    return None


def plan(module: nnx.Module, config: QuantConfig, rules: Iterable[Rule] = LLM_RULES) -> dict[str, Target]:
    """{dotted path: Target} of every float parameter of `module` (abstract or not) the rules quantize."""
    rules = tuple(rules)
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        path = ".".join(map(str, p))
        t = target_of(path, v.get_value().shape, _axes(v), config, rules)
        if t is not None:
            out[path] = t
    return out


def _param_like(v: nnx.Variable, value, axes) -> nnx.Param:
    meta = dict(v.get_metadata())
    meta["out_sharding"] = tuple(axes)
    return nnx.Param(value, **meta)


def _quantize_value(value, target: Target, config: QuantConfig):
    """(qvalue, scale) of one concrete or abstract array, keeping a NamedSharding's placement."""
    if isinstance(value, jax.ShapeDtypeStruct):
        sh = getattr(value, "sharding", None)
        sc_sh = _scale_sharding(sh, target)
        return (jax.ShapeDtypeStruct(target.shape, config.dtype, sharding=sh),
                jax.ShapeDtypeStruct(target.scale_shape, jnp.float32, sharding=sc_sh))
    if isinstance(value, np.ndarray):
        q = target.quantize(value, config)
        return q.qvalue, q.scale
    sh = getattr(value, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        fn = jax.jit(lambda w: _pair(target.quantize(w, config)), out_shardings=(sh, _scale_sharding(sh, target)))
    else:
        fn = jax.jit(lambda w: _pair(target.quantize(w, config)))
    return fn(value)


def _pair(q: quant.QArray):
    return q.qvalue, q.scale


def _scale_sharding(sh, target: Target):
    """The weight's NamedSharding with the scale's reduced / blocked dims unsharded."""
    if not isinstance(sh, jax.sharding.NamedSharding):
        return sh
    spec = list(sh.spec) + [None] * (len(target.shape) - len(sh.spec))
    spec = [e if s == d else None for e, s, d in zip(spec, target.scale_shape, target.shape)]
    return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*spec))


def quantize_model(module: nnx.Module, config: "QuantConfig | str", rules: Iterable[Rule] = LLM_RULES) -> nnx.Module:
    """Replace, in place, every parameter the rules match by a `QuantizedParam` (see the module docstring); returns
    `module`. Works on concrete models (each weight quantized on its devices, placement kept) and on abstract ones
    (`nnx.eval_shape`d: ShapeDtypeStruct leaves, shardings kept). Already quantized parameters are left alone."""
    config = QuantConfig.parse(config)
    targets = plan(module, config, rules)
    for path, t in targets.items():
        *parents, name = path.split(".")
        owner = module
        for key in parents:
            owner = owner[int(key)] if isinstance(owner, (nnx.List, list)) else getattr(owner, key)
        v = getattr(owner, name)
        qvalue, scale = _quantize_value(v.get_value(), t, config)
        setattr(owner, name, QuantizedParam(_param_like(v, qvalue, t.axes), _param_like(v, scale, t.scale_axes),
                                            v.get_value().dtype, config.block))
    return module


def config_of(module: nnx.Module) -> QuantConfig | None:
    """The QuantConfig a module was quantized with (None: not quantized); one per model."""
    found = set()
    for _, node in nnx.iter_graph(module):
        if isinstance(node, QuantizedParam):
            found.add(QuantConfig(quant.qtype_of(node.qvalue.get_value().dtype), node.block))
    if len(found) > 1:
        raise ValueError(f"the model mixes quantizations {sorted(map(str, found))}")
    return next(iter(found)) if found else None


def weight_bytes(module: nnx.Module) -> dict[str, int]:
    """Bytes of the parameters by stored dtype name (float parameters, int8 / fp8 values, float32 scales)."""
    out: dict[str, int] = {}
    for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        a = v.get_value()
        out[str(a.dtype)] = out.get(str(a.dtype), 0) + int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
    return out


def manifest_entry(config: QuantConfig, targets: Mapping[str, Target]) -> dict:
    """What a quantized checkpoint's manifest records (options.quantization)."""
    return {"qtype": config.qtype, "block": config.block, "params": sorted(targets)}

