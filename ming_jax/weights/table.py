"""Official PyTorch state-dict names <-> our parameter tree, driven by one declarative table per component.

A `Rule` says: the official tensors named by `official` (a template such as
``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``, its variables ranging over `ranges`) are, after `transform`,
the slice ``[index]`` of our parameter at path `ours` (dotted, e.g. ``decoder.moe.experts.w_gate``), where `index`
lists the variables that address the leading (stacked) axes of our array, offset by their range start.

The engine is strict in both directions:
* every official name matches exactly one rule instance (none: "unexpected tensor"; two: a table bug);
* every rule instance is present in the source ("missing tensor"), so every slice of every target leaf is filled
  exactly once (`check_coverage` proves the table covers each leaf);
* shapes are checked against our abstract parameter shapes, with the name of the offending tensor.

The same table drives in-memory loading (`load_state_dict`), the streaming converter (`plan`) and the reverse
export (`export_state_dict`). Tests move weights with these functions, never with a copy of their own.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import string
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np


class WeightError(ValueError):
    """Missing, unexpected or mis-shaped tensors when mapping official weights to ours (or back)."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named, invertible change of layout applied to one official tensor."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_official: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# torch nn.Linear stores [out, in]; our kernels are [in, out].
LINEAR = Transform("linear_t", lambda a: a.T, lambda a: a.T)


def linear_to(out_shape: Sequence[int], name: str = "linear_reshape") -> Transform:
    """torch Linear [out, in] -> our kernel [in, *out_shape] (e.g. per-head output axes)."""
    out_shape = tuple(out_shape)

    def fwd(a):
        return a.T.reshape((a.shape[1],) + out_shape)

    def inv(a):
        return a.reshape(a.shape[0], -1).T

    return Transform(name, fwd, inv)


def linear_from(in_shape: Sequence[int], name: str = "linear_in_reshape") -> Transform:
    """torch Linear [out, in] -> our kernel [*in_shape, out] (e.g. attention output projection [H, hd, D])."""
    in_shape = tuple(in_shape)

    def fwd(a):
        return a.T.reshape(in_shape + (a.shape[0],))

    def inv(a):
        return a.reshape(-1, a.shape[-1]).T

    return Transform(name, fwd, inv)


@dataclasses.dataclass(frozen=True)
class Rule:
    official: str
    ours: str
    transform: Transform = IDENTITY
    ranges: Mapping[str, range] = dataclasses.field(default_factory=dict)
    index: tuple[str | int, ...] = ()  # a variable name, or a constant slot (e.g. which of three gates)

    def __post_init__(self):
        fields = {f for _, f, _, _ in string.Formatter().parse(self.official) if f}
        if fields != set(self.ranges):
            raise ValueError(f"rule {self.official!r}: template variables {sorted(fields)} != ranges "
                             f"{sorted(self.ranges)}")
        if not {k for k in self.index if isinstance(k, str)} <= set(self.ranges):
            raise ValueError(f"rule {self.official!r}: index {self.index} uses unknown variables")

    @property
    def regex(self) -> re.Pattern:
        parts = []
        for literal, field, _, _ in string.Formatter().parse(self.official):
            parts.append(re.escape(literal))
            if field:
                parts.append(f"(?P<{field}>[0-9]+)")
        return re.compile("".join(parts) + r"\Z")

    def instances(self) -> Iterator[dict[str, int]]:
        keys = list(self.ranges)
        for values in itertools.product(*(self.ranges[k] for k in keys)):
            yield dict(zip(keys, values))

    def name(self, v: Mapping[str, int]) -> str:
        return self.official.format(**v)

    def path(self, v: Mapping[str, int]) -> str:
        return self.ours.format(**v)

    def slot(self, v: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(v[k] - self.ranges[k].start if isinstance(k, str) else k for k in self.index)


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One official tensor's place in our tree."""

    official: str
    path: str
    index: tuple[int, ...]
    transform: Transform


class Table:
    """A component's rules, with strict matching.

    `tied` names official tensors that are copies of another official tensor (transformers' tied embeddings: a
    Qwen2ForCausalLM state dict holds `lm_head.weight`, the very same tensor as `model.embed_tokens.weight`). Such an
    alias is optional in the source; when present it is consumed by a check that it equals its twin (in-memory
    loading compares the values; the streaming converter, which plans before reading data, only drops it), and the
    export leaves it out, as `save_pretrained` does.

    `constants` names official buffers that are not parameters but values the config implies (x_transformers keeps
    its rope `inv_freq` in the state dict). They are required in the source (`plan` lists a missing one), checked
    against the expected value wherever data is read (`check_constants`), filled by nothing, and written back by the
    export (`export_arrays`).
    """

    def __init__(self, rules: Iterable[Rule], tied: Mapping[str, str] | None = None,
                 constants: Mapping[str, np.ndarray] | None = None):
        self.rules = tuple(rules)
        self.tied = dict(tied or {})
        self.constants = {k: np.asarray(v) for k, v in (constants or {}).items()}
        self._compiled = [(r, r.regex) for r in self.rules]

    def __add__(self, other: "Table") -> "Table":
        return Table(self.rules + other.rules, {**self.tied, **other.tied}, {**self.constants, **other.constants})

    def renamed(self, official: str = "", ours: str = "") -> "Table":
        """The same table with `official` prepended to every official name (rules, aliases, constants) and `ours`
        to every one of our paths: a component that sits under a prefix in a bigger checkpoint or tree."""
        rules = (dataclasses.replace(r, official=official + r.official, ours=ours + r.ours) for r in self.rules)
        return Table(rules, {official + k: official + v for k, v in self.tied.items()},
                     {official + k: v for k, v in self.constants.items()})

    def check_constants(self, tensors: Mapping[str, np.ndarray], names: Iterable[str] | None = None,
                        rtol: float = 1e-6) -> None:
        """Every constant among `names` (default: all of `tensors`) is shaped and valued as the config implies
        (relative tolerance `rtol`: float32 rounding of the same formula; a buffer stored in a narrower float, e.g.
        a checkpoint cast to bfloat16 with its buffers, is allowed that dtype's rounding)."""
        import ml_dtypes

        for name in (n for n in (tensors.keys() if names is None else names) if n in self.constants):
            want = self.constants[name]
            got = np.asarray(tensors[name])
            tol = max(rtol, float(ml_dtypes.finfo(got.dtype).eps)) if got.dtype.kind in "fV" else rtol
            if got.shape != want.shape or not np.allclose(got.astype(np.float64), want.astype(np.float64),
                                                          rtol=tol, atol=0.0):
                raise WeightError(f"{name} {tuple(got.shape)} is not the value {tuple(want.shape)} this config implies "
                                  f"(a non-parameter buffer fixed by the config: a different head size or rope base?)")

    def match(self, name: str) -> Assignment | None:
        hits = []
        for rule, rx in self._compiled:
            m = rx.match(name)
            if m is None:
                continue
            v = {k: int(x) for k, x in m.groupdict().items()}
            if all(v[k] in rule.ranges[k] for k in v):
                hits.append(Assignment(name, rule.path(v), rule.slot(v), rule.transform))
        if len(hits) > 1:
            raise WeightError(f"{name!r} matches {len(hits)} rules ({[h.path for h in hits]}): mapping table bug")
        return hits[0] if hits else None

    def expected_names(self) -> list[str]:
        return [r.name(v) for r in self.rules for v in r.instances()]

    def plan(self, names: Iterable[str]) -> list[Assignment]:
        """Map every official name; raise naming all unexpected and all missing tensors."""
        names = list(names)
        missing_constants = sorted(set(self.constants) - set(names))
        names = [n for n in names if n not in self.tied and n not in self.constants]
        out, unexpected = [], []
        for n in names:
            a = self.match(n)
            (unexpected.append(n) if a is None else out.append(a))
        missing = sorted(set(self.expected_names()) - set(names)) + missing_constants
        if unexpected or missing:
            msg = []
            if missing:
                msg.append(f"{len(missing)} missing tensor(s): {_abbrev(missing)}")
            if unexpected:
                msg.append(f"{len(unexpected)} unexpected tensor(s): {_abbrev(sorted(unexpected))}")
            raise WeightError("; ".join(msg))
        return out

    def check_coverage(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Prove the table fills every leaf of `shapes` (path -> shape) exactly once, and nothing else."""
        filled: dict[str, set] = {}
        for r in self.rules:
            for v in r.instances():
                path, slot = r.path(v), r.slot(v)
                if path not in shapes:
                    raise WeightError(f"rule {r.official!r} targets {path!r}, which the model does not have")
                if slot in filled.setdefault(path, set()):
                    raise WeightError(f"{path}{list(slot)} is filled twice")
                filled[path].add(slot)
        for path, shape in shapes.items():
            got = filled.get(path, set())
            n_lead = len(next(iter(got))) if got else 0
            want = int(np.prod(shape[:n_lead])) if n_lead else 1
            if len(got) != want:
                raise WeightError(f"parameter {path} {shape}: table fills {len(got)} of {want} slices")


def _abbrev(names: Sequence[str], n: int = 12) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def load_arrays(table: Table, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                dtypes: Mapping[str, np.dtype] | None = None, names: Iterable[str] | None = None
                ) -> dict[str, np.ndarray]:
    """Official tensors -> {our path: numpy array}, shapes checked; `tensors` may be a lazy mapping.

    `names` restricts the source to a subset (e.g. the LLM's tensors of an omni checkpoint); default: all of them.
    """
    out: dict[str, np.ndarray] = {}
    names = list(tensors.keys() if names is None else names)
    for alias in (n for n in names if n in table.tied):
        twin = table.tied[alias]
        if twin not in tensors:
            raise WeightError(f"{alias} is tied to {twin}, which the source lacks")
        if not np.array_equal(np.asarray(tensors[alias]), np.asarray(tensors[twin])):
            raise WeightError(f"{alias} should be a copy of {twin} (tied weights) but differs: untied weights are "
                              f"not what this config describes")
    table.check_constants(tensors, names)
    for a in table.plan(names):
        if a.path not in shapes:
            raise WeightError(f"{a.official} maps to {a.path}, which the model does not have")
        full = tuple(shapes[a.path])
        want = full[len(a.index):]
        value = a.transform.to_ours(np.asarray(tensors[a.official]))
        if tuple(value.shape) != want:
            raise WeightError(f"{a.official}: shape {tuple(np.asarray(tensors[a.official]).shape)} gives "
                              f"{tuple(value.shape)} after {a.transform.name}, but {a.path} needs {want}")
        if a.path not in out:
            dtype = (dtypes or {}).get(a.path, value.dtype)
            out[a.path] = np.empty(full, dtype=dtype) if a.index else None
        if a.index:
            out[a.path][a.index] = value
        else:
            out[a.path] = value.astype((dtypes or {}).get(a.path, value.dtype), copy=False)
    return out


def export_arrays(table: Table, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{our path: array} -> official state dict (numpy), every rule instance exactly once."""
    out = {}
    for r in table.rules:
        for v in r.instances():
            path = r.path(v)
            if path not in arrays:
                raise WeightError(f"cannot export {r.name(v)}: our tree has no {path}")
            out[r.name(v)] = np.ascontiguousarray(r.transform.to_official(np.asarray(arrays[path])[r.slot(v)]))
    out.update({name: np.ascontiguousarray(value) for name, value in table.constants.items()})
    return out


# --- nnx glue ---------------------------------------------------------------------------------------------------


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every `nnx.Param` of `model` (works on abstract models from `nnx.eval_shape`)."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    return {_dotted(p): tuple(v.shape) for p, v in _flat(state)}


def param_arrays(model) -> dict[str, np.ndarray]:
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    return {_dotted(p): np.asarray(v) for p, v in _flat(state)}


def load_state_dict(model, table: Table, tensors: Mapping[str, np.ndarray], *, names: Iterable[str] | None = None,
                    put: Callable[[str, np.ndarray], object] | None = None):
    """Fill every `nnx.Param` of `model` from official tensors (strict) and return the filled model.

    `model` may be abstract (from `nnx.eval_shape`): nothing of its own is allocated. Dtypes follow the model's
    parameters; `put(path, array)` places each array (default: `jnp.asarray`, e.g. pass a sharded `device_put`).
    """
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves = dict(_flat(params))
    shapes = {_dotted(p): tuple(v.shape) for p, v in leaves.items()}
    arrays = load_arrays(table, tensors, shapes, names=names)
    not_filled = sorted(set(shapes) - set(arrays))
    if not_filled:
        raise WeightError(f"parameters not filled by any official tensor: {_abbrev(not_filled)}")
    for p, v in leaves.items():
        path = _dotted(p)
        arr = arrays.pop(path).astype(v.get_value().dtype, copy=False)
        v.set_value(put(path, arr) if put else jnp.asarray(arr))
    return nnx.merge(graphdef, nnx.from_flat_state(list(leaves.items())), rest)


def export_state_dict(model, table: Table) -> dict[str, np.ndarray]:
    return export_arrays(table, param_arrays(model))


def _flat(state):
    from flax import nnx

    for path, var in nnx.to_flat_state(state):
        yield path, var


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)
