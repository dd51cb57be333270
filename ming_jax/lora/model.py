"""LoRA adapters on the language model's projections: which weights, how they are made, merged and removed.

    cfg = LoraConfig(rank=8, alpha=16, targets=("attention", "mlp", "shared_expert"))
    add_lora(model, cfg, seed=0)        # in place: each target becomes a `LoraWeight` (base + (alpha/r) A @ B)
    abstract = add_lora(llm.create_abstract(c), cfg)   # abstract too (ShapeDtypeStructs: AOT, checkpoint restore)
    merge_lora(model); unmerge_lora(model)              # base += / -= (alpha/r) A @ B (float bases only)
    remove_lora(model, merge=True)                      # back to plain parameters (the merged ones)

Targets are regexes over the dotted parameter paths of the model (`moe_layers.attn.qkv`, `dense_layers.0.mlp.up`),
or the names of `TARGET_PRESETS`. A target must be a projection: the axes it contracts are those of the
quantization rules (`ming_jax.quant.LLM_RULES`, by logical axis name), so the factors follow the weight's layout:
A [lead..., in..., r] and B [lead..., r, out...], with the base's logical axis names plus "lora_rank" (replicated),
the stacked MoE layers' `layers` axis and an expert stack's `experts` axis kept as lead axes. Init as PEFT's
default: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's kaiming_uniform(a=sqrt(5))), B = 0, so a fresh adapter
leaves the model's outputs unchanged. No dropout.

QLoRA: quantize the base first (`ming_jax.quant.quantize_model`), then add adapters; `read` dequantises the base
and adds the delta. Routed-expert stacks take adapters on a float base only (the delta is a dense [E, D, F] per
layer, the stack's size in the compute dtype, and their gradient passes through the grouped matmul's full weight
gradient); on a quantized expert stack `add_lora` refuses (the quantized grouped matmul takes a QArray, to which a
delta cannot be added; a separate low-rank grouped matmul is not implemented). Merging a quantized base is refused
too: it would have to requantize, and unmerging could not restore the stored bytes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from ming_jax.layers.params import LoraParam, LoraWeight, QuantizedParam
from ming_jax.quant.model import LLM_RULES, Rule

RANK_AXIS = "lora_rank"

# Named target sets: regexes over dotted parameter paths of `ming_jax.models.llm.BailingMoeV2`.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": (r"(^|\.)attn\.(qkv|out)$",),  # the fused qkv kernel and the output projection
    "mlp": (r"(^|\.)mlp\.(gate|up|down)$",),  # the dense layers' SwiGLU MLPs
    "shared_expert": (r"(^|\.)moe\.shared\.(gate|up|down)$",),
    "experts": (r"(^|\.)moe\.w_(gate|up|down)$",),  # per-expert adapters on the routed experts (float bases)
    "lm_head": (r"^lm_head$",),
}
DEFAULT_TARGETS = ("attention", "mlp", "shared_expert")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r >= 1, alpha (the delta is scaled by alpha / r, as PEFT without rsLoRA), targets: preset names of
    `TARGET_PRESETS` and / or regexes over dotted parameter paths."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t.strip()))
        object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets))
        problems = []
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            problems.append(f"rank={self.rank!r} must be an int >= 1")
        if not self.alpha > 0:
            problems.append(f"alpha={self.alpha!r} must be > 0")
        if not self.targets:
            problems.append("targets is empty")
        for t in self.targets:
            if t in TARGET_PRESETS:
                continue
            try:
                re.compile(t)
            except re.error as e:
                problems.append(f"target {t!r} is neither a preset ({', '.join(TARGET_PRESETS)}) nor a regex: {e}")
        if problems:
            raise ValueError("LoraConfig: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def patterns(self) -> dict[str, tuple[str, ...]]:
        """{target as given: its regexes}."""
        return {t: TARGET_PRESETS.get(t, (t,)) for t in self.targets}

    def to_json(self) -> dict:
        return {"rank": int(self.rank), "alpha": float(self.alpha), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: Mapping) -> "LoraConfig":
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


@dataclasses.dataclass(frozen=True)
class Target:
    """One weight to adapt: dotted path, shape and logical axes (stacked axes included), its float dtype, how many
    leading axes are kept (`n_lead`: layers / experts) and how many it contracts (`n_in`)."""

    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: np.dtype
    n_lead: int
    n_in: int
    quantized: bool

    def a_shape(self, r: int) -> tuple[int, ...]:
        return self.shape[:self.n_lead + self.n_in] + (r,)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return self.shape[:self.n_lead] + (r,) + self.shape[self.n_lead + self.n_in:]

    @property
    def a_axes(self) -> tuple:
        return self.axes[:self.n_lead + self.n_in] + (RANK_AXIS,)

    @property
    def b_axes(self) -> tuple:
        return self.axes[:self.n_lead] + (RANK_AXIS,) + self.axes[self.n_lead + self.n_in:]

    @property
    def fan_in(self) -> int:
        return int(np.prod(self.shape[self.n_lead:self.n_lead + self.n_in]))


def _axes(v: nnx.Variable) -> tuple:
    axes = v.get_metadata().get("out_sharding")
    return tuple(axes) if axes is not None else (None,) * len(v.get_value().shape)


def _nodes(module: nnx.Module) -> dict[str, object]:
    """{dotted path: graph node} of every parameter-like node: nnx.Params, QuantizedParams, LoraWeights (the
    leaves inside a QuantizedParam / LoraWeight are left out: the wrapper stands for them)."""
    nodes = {".".join(map(str, p)): n for p, n in nnx.iter_graph(module)
             if isinstance(n, (nnx.Param, QuantizedParam, LoraWeight))}
    wrappers = [p for p, n in nodes.items() if isinstance(n, (QuantizedParam, LoraWeight))]
    return {p: n for p, n in nodes.items() if not any(p.startswith(w + ".") for w in wrappers)}


def _target(path: str, node, rules: Sequence[Rule]) -> Target:
    if isinstance(node, QuantizedParam):
        shape, axes, dtype, quantized = node.shape, _axes(node.qvalue), np.dtype(node.dtype), True
    else:
        shape, axes, quantized = tuple(node.get_value().shape), _axes(node), False
        dtype = np.dtype(node.get_value().dtype)
    rule = next((r for r in rules if r.matches(path)), None)
    if rule is None:
        raise ValueError(f"LoRA target {path} {shape} is not a projection (no contraction rule in "
                         "ming_jax.quant.LLM_RULES matches it): only projection kernels take adapters")
    idx = [axes.index(c) if c in axes else None for c in rule.contract]
    if None in idx or idx != list(range(idx[0], idx[0] + len(idx))):
        raise ValueError(f"LoRA target {path} (axes {axes}): contracted axes {rule.contract} are not one run of "
                         "axes after the lead axes")
    return Target(path, shape, axes, dtype, idx[0], len(idx), quantized)


def plan(module: nnx.Module, config: LoraConfig, rules: Iterable[Rule] = LLM_RULES) -> dict[str, Target]:
    """{dotted path: Target} of every weight of `module` (abstract or not) the config's targets match. A target
    that matches nothing is an error (a typo would train nothing), so is one that matches a weight already
    adapted, a non-projection, or a quantized expert stack."""
    rules = tuple(rules)
    nodes = _nodes(module)
    out: dict[str, Target] = {}
    for name, patterns in config.patterns().items():
        hits = [p for p in nodes if any(re.search(pat, p) for pat in patterns)]
        if not hits:
            raise ValueError(f"LoRA target {name!r} matches no parameter path (paths look like "
                             f"{next(iter(nodes))!r}, {list(nodes)[-1]!r})")
        for p in hits:
            node = nodes[p]
            if isinstance(node, LoraWeight):
                raise ValueError(f"LoRA target {name!r}: {p} already has an adapter")
            if isinstance(node, LoraParam):
                raise ValueError(f"LoRA target {name!r} matches the adapter factor {p}")
            t = _target(p, node, rules)
            if t.quantized and "experts" in t.axes:
                raise ValueError(f"LoRA target {name!r}: {p} is a quantized routed-expert stack; adapters on "
                                 "quantized expert stacks are not supported (the quantized grouped matmul takes "
                                 "int8 / fp8 tiles, no float delta). Adapt float expert stacks, or leave 'experts' "
                                 "out of the targets")
            out[p] = t
    return out


def _owner(module, path: str):
    *parents, name = path.split(".")
    owner = module
    for key in parents:
        owner = owner[int(key)] if isinstance(owner, (nnx.List, list)) else getattr(owner, key)
    return owner, name


def _is_abstract(node) -> bool:
    v = node.qvalue.get_value() if isinstance(node, QuantizedParam) else node.get_value()
    return isinstance(v, jax.ShapeDtypeStruct)


def add_lora(module: nnx.Module, config: LoraConfig, *, seed: int = 0,
             rules: Iterable[Rule] = LLM_RULES) -> nnx.Module:
    """Replace, in place, every weight the config targets by a `LoraWeight` over it; returns `module`. A is drawn on
    the host with numpy from `seed` (PEFT's init, see the module docstring), B is zero; both in the base's float
    dtype. Abstract models (`nnx.eval_shape`d) get ShapeDtypeStruct factors. The factors are placed like any new
    array (the train loop puts the state on its mesh by the logical axes)."""
    targets = plan(module, config, rules)
    rng = np.random.default_rng(seed)
    r = config.rank
    for path, t in targets.items():
        owner, name = _owner(module, path)
        node = getattr(owner, name)
        if _is_abstract(node):
            a = jax.ShapeDtypeStruct(t.a_shape(r), t.dtype)
            b = jax.ShapeDtypeStruct(t.b_shape(r), t.dtype)
        else:
            bound = 1.0 / t.fan_in ** 0.5
            a = jax.numpy.asarray(rng.uniform(-bound, bound, t.a_shape(r)).astype(np.float32), t.dtype)
            b = jax.numpy.zeros(t.b_shape(r), t.dtype)
        setattr(owner, name, LoraWeight(node, LoraParam(a, out_sharding=t.a_axes, eager_sharding=False),
                                        LoraParam(b, out_sharding=t.b_axes, eager_sharding=False),
                                        n_in=t.n_in, rank=r, alpha=config.alpha))
    return module


def adapters(module: nnx.Module) -> dict[str, LoraWeight]:
    """{dotted path: LoraWeight} of the model."""
    return {p: n for p, n in _nodes(module).items() if isinstance(n, LoraWeight)}


def config_of(module: nnx.Module, targets: Sequence[str] = ()) -> LoraConfig | None:
    """The (rank, alpha) the model's adapters were made with (one per model), None without adapters; `targets`
    default to the adapted paths themselves (as exact regexes)."""
    found = {(w.rank, w.alpha) for w in adapters(module).values()}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"the model mixes LoRA (rank, alpha) settings {sorted(found)}")
    rank, alpha = found.pop()
    return LoraConfig(rank, alpha, tuple(targets) or tuple("^" + re.escape(p) + "$" for p in adapters(module)))


def lora_state(module: nnx.Module) -> nnx.State:
    """The adapter factors alone (`<path>.lora_a`, `<path>.lora_b`): what a LoRA run trains."""
    return nnx.state(module, LoraParam)


def _need(module, merged: bool, what: str) -> dict[str, LoraWeight]:
    found = adapters(module)
    if not found:
        raise ValueError(f"{what}: the model has no LoRA adapters")
    wrong = [p for p, w in found.items() if w.merged != merged]
    if wrong:
        state = "already merged" if not merged else "not merged"
        raise ValueError(f"{what}: adapters {wrong[:4]}{' ...' if len(wrong) > 4 else ''} are {state}")
    _check_mergeable(found, what)
    return found


def _check_mergeable(found: Mapping[str, LoraWeight], what: str) -> None:
    quantized = [p for p, w in found.items() if isinstance(w.base, QuantizedParam)]
    if quantized:
        raise ValueError(f"{what}: {quantized[:4]} have quantized bases; merging would requantize base + delta "
                         "(and unmerging could not restore the stored int8 / fp8 bytes), so it is refused. Keep the "
                         "adapters separate (read adds them), or merge into a float copy of the model")
    abstract = [p for p, w in found.items() if _is_abstract(w.base)]
    if abstract:
        raise ValueError(f"{what}: the model is abstract ({abstract[0]} holds no values)")


def _shift(w: LoraWeight, sign: float) -> None:
    base = w.base.get_value()
    w.base.set_value((base.astype(np.float32) + sign * w.delta(np.float32)).astype(base.dtype))


def merge_lora(module: nnx.Module) -> nnx.Module:
    """base += (alpha / r) A @ B for every adapter (in float32, rounded to the base dtype); the adapters stay and
    `read` then returns the base alone, so the logits are unchanged up to that rounding. In place; returns
    `module`. Refused when an adapter is already merged, has a quantized base, or the model is abstract."""
    for w in _need(module, False, "merge_lora").values():
        _shift(w, 1.0)
        w.merged = True
    return module


def unmerge_lora(module: nnx.Module) -> nnx.Module:
    """Undo `merge_lora`: base -= the same delta (from the unchanged factors). Float rounding: the restored base
    differs from the original by at most one rounding of base + delta and one of the difference (about 1 ulp of
    |base| + |delta|; exact where the delta is 0). In place; returns `module`."""
    for w in _need(module, True, "unmerge_lora").values():
        _shift(w, -1.0)
        w.merged = False
    return module


def remove_lora(module: nnx.Module, *, merge: bool = False) -> nnx.Module:
    """Put every adapted weight's base back in the module's place (the factors dropped), after merging the delta
    into it when `merge` (a merged adapter is kept merged); returns `module`. With merge=False an unmerged delta is
    discarded: the original model comes back."""
    found = adapters(module)
    if merge:
        _check_mergeable({p: w for p, w in found.items() if not w.merged}, "remove_lora(merge=True)")
    for path, w in found.items():
        if merge and not w.merged:
            _shift(w, 1.0)
        elif not merge and w.merged:
            raise ValueError(f"remove_lora(merge=False): {path} is merged; unmerge_lora first, or merge=True")
        owner, name = _owner(module, path)
        setattr(owner, name, w.base)
    return module


def param_count(module: nnx.Module) -> int:
    """Adapter parameters (every factor element, stacked layers counted)."""
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(lora_state(module)))
