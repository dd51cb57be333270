"""The one loader: a release folder (official safetensors) or a converted checkpoint, onto a mesh or one device.

    from ming_jax.checkpoint import load
    loaded = load(DIR)                                    # every component the folder holds
    loaded = load(DIR, components=["llm"], mesh=make_mesh("expert=8"), rules="ep_fsdp")
    loaded.llm                                            # the BailingMoeV2
    loaded.modules["vision"], loaded.modules["vision_proj"]
    loaded.omni()                                         # an OmniModel of the loaded components (needs llm)
    loaded = load(DIR, components=["talker"])             # speech: loaded.modules["talker"], ["audio_vae"]

The format is detected: a folder with `ming_jax.json` is a converted checkpoint (`ming_jax.checkpoint.convert`),
restored with orbax, each device reading only its shard of each array (`restore_params`); a folder with
config.json + safetensors is a release, its tensors read lazily one by one, mapped by the components' tables and
placed with `jax.device_put` onto their `NamedSharding`s. Which components exist, their abstract modules and tables
come from `ming_jax.models.registry.describe`, and nothing else.

Dtypes: parameters stay in the checkpoint's dtype. A converted checkpoint keeps, per component, the dtype most of
its parameters are stored in (each array cast to the dtype the model gives that parameter, e.g. float32 router
biases); a release folder the dtype its config.json declares (`torch_dtype`, e.g. bfloat16 for the release; float32
when absent: `release_dtype`). `dtype` sets the parameter dtype instead (converted: every array cast to it);
`compute_dtype` the activation dtype (default: the runtime's, float32). `checkpoint_dtype(DIR)` tells the dtype
without loading anything (the generate CLI computes in it by default).

`restore_params(DIR, abstract_model, subtree=...)` is the converted-checkpoint primitive; `load_llm`,
`load_vision`, `load_audio`, `load_omni` are thin wrappers over `load` for converted checkpoints
(`ming_jax.checkpoint.release` has the release-folder ones).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from ming_jax import quant
from ming_jax.checkpoint import folders, quantized
from ming_jax.checkpoint.manifest import (CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR, CheckpointFormatError, Manifest,
                                          np_dtype, read_config)
from ming_jax.checkpoint.safetensors import CheckpointError, TensorMapping
from ming_jax.config.omni import OmniConfig
from ming_jax.config.runtime import Runtime
from ming_jax.layers.params import QuantizedParam
from ming_jax.models import registry
from ming_jax.models.omni import OmniModel
from ming_jax.sharding import ShardingRules, param_shardings
from ming_jax.weights.table import WeightError, load_arrays

Shardings = Any  # an nnx.State / pure dict of NamedSharding mirroring nnx.state(model, nnx.Param)


def _pure(tree) -> dict:
    """nnx.State (of arrays, ShapeDtypeStructs or shardings) -> nested plain dict; plain dicts pass through."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, path + "."))
        else:
            out[path] = v
    return out


def restore_params(ckpt_dir: str, abstract_model: nnx.Module, *, subtree: str | None = None,
                   shardings: Shardings | None = None, mesh=None, rules=None, dtype: str | None = None,
                   computed: Mapping[str, Any] | None = None) -> nnx.Module:
    """Fill every `nnx.Param` of `abstract_model` (from `nnx.eval_shape`) from the converted checkpoint.

    `subtree` is where the model sits in our tree ("llm", "vision", "vision_proj", "audio"; None: the whole tree,
    i.e. an `OmniModel`). Placement: `shardings` (a pytree of `NamedSharding` matching
    `nnx.state(abstract_model, nnx.Param)`, e.g. `ming_jax.sharding.param_shardings`), or `mesh` + `rules` to
    compute it, or neither for the default device. Each device reads its shard straight from disk.
    Each array is cast to the dtype the model gives that parameter (e.g. float32 router biases in a bfloat16
    model), or every one to `dtype` (never the int8 / fp8 values and float32 scales of quantized weights).
    `computed`: {path: fn(target ShapeDtypeStruct with its sharding) -> jax.Array} for parameters made otherwise
    than read as stored (quantize at load: `ming_jax.checkpoint.quantized`).
    """
    import orbax.checkpoint as ocp

    params_dir = os.path.abspath(os.path.join(ckpt_dir, PARAMS_DIR))
    manifest = Manifest.read(ckpt_dir)
    if shardings is None and mesh is not None:
        shardings = param_shardings(abstract_model, mesh, rules)
    state = nnx.state(abstract_model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    flat_abstract = _flat(abstract)
    prefix = f"{subtree}." if subtree else ""
    flat_shardings = _flat(_pure(shardings)) if shardings is not None else {}
    if shardings is not None and set(flat_shardings) != set(flat_abstract):
        extra, missing = set(flat_shardings) - set(flat_abstract), set(flat_abstract) - set(flat_shardings)
        raise CheckpointFormatError(f"shardings do not match the model's parameters: missing {sorted(missing)[:8]}, "
                                    f"unknown {sorted(extra)[:8]}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    computed = dict(computed or {})
    keep_dtype = quantized_leaves(abstract_model)
    problems = []
    target, made = {}, {}
    for path, leaf in flat_abstract.items():
        if path in computed:
            sharding = flat_shardings.get(path)
            if sharding is not None and isinstance(sharding, nnx.Variable):
                sharding = sharding.get_value()
            made[path] = computed.pop(path)(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding or default))
            continue
        stored = manifest.params.get(prefix + path)
        if stored is None:
            problems.append(f"{prefix + path}: not in the checkpoint")
            continue
        if tuple(stored["shape"]) != tuple(leaf.shape):
            problems.append(f"{prefix + path}: checkpoint shape {tuple(stored['shape'])} != model {tuple(leaf.shape)}")
            continue
        sharding = flat_shardings.get(path)
        if sharding is not None and isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        cast = dtype and path not in keep_dtype
        target[path] = jax.ShapeDtypeStruct(leaf.shape, np_dtype(dtype) if cast else leaf.dtype,
                                            sharding=sharding or default)
    if computed:
        problems.append(f"computed parameters the model does not have: {sorted(computed)[:8]}")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise CheckpointFormatError(f"{ckpt_dir} does not fit the model ({len(problems)} problem(s)): {shown}")
    nested = _unflatten(target)
    item = {subtree: nested} if subtree else nested
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                          partial_restore=True))
    restored = restored[subtree] if subtree else restored
    if made:
        restored = _merge_trees(restored, _unflatten(made))
    nnx.replace_by_pure_dict(state, _restore_keys(abstract, restored))
    nnx.update(abstract_model, state)
    return abstract_model


def quantized_leaves(module: nnx.Module) -> set[str]:
    """Dotted paths of the `.qvalue` / `.scale` leaves of a module's quantized weights."""
    out = set()
    for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if p[-1] in ("qvalue", "scale") and len(p) > 1:
            owner = module
            for k in p[:-1]:
                owner = owner[k] if isinstance(owner, (nnx.List, list)) else getattr(owner, str(k))
            if isinstance(owner, QuantizedParam):
                out.add(".".join(map(str, p)))
    return out


def _merge_trees(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_trees(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


def _restore_keys(like, tree):
    """Give `tree` (string keys, from our flat paths) the key types of `like` (nnx.List indices are ints)."""
    if not isinstance(like, Mapping):
        return tree
    return {k: _restore_keys(v, tree[str(k)]) for k, v in like.items()}




# --- the one loader -------------------------------------------------------------------------------------------------

CONVERTED, RELEASE = "converted", "release"
DEFAULT_RULES = "ep_fsdp"


@dataclasses.dataclass
class Loaded:
    """What `load` returns: the folder's official config.json, and every loaded component as a registry `Part`
    whose modules hold the weights (placed on `mesh` when one was given)."""

    path: str
    format: str  # CONVERTED or RELEASE
    config: dict  # the official config.json dict
    parts: dict[str, registry.Part]  # loaded components, COMPONENTS order; `.modules` filled, `.config` as used
    deepstack: bool = False
    mesh: jax.sharding.Mesh | None = None
    rules: ShardingRules | None = None

    @property
    def modules(self) -> dict[str, nnx.Module]:
        """Subtree key ("llm", "vision", "vision_proj", "audio") -> filled module."""
        return {k: m for part in self.parts.values() for k, m in part.modules.items()}

    @property
    def llm(self):
        """The `BailingMoeV2` language model."""
        return self._module("llm")

    def _module(self, key: str):
        if key not in self.modules:
            raise CheckpointFormatError(f"{self.path}: {key!r} was not loaded (loaded: {', '.join(self.modules)})")
        return self.modules[key]

    def omni(self) -> OmniModel:
        """An `OmniModel` of the loaded components: the LLM and whichever towers were loaded (the others None)."""
        llm = self._module("llm")
        kind = registry.release_kind(self.config)
        base = (OmniConfig.from_official(self.config) if kind == "omni"
                else OmniConfig(llm=self.parts["llm"].config, vision=None, audio=None))
        cfg = dataclasses.replace(base, **{c: (self.parts[c].config if c in self.parts else None)
                                           for c in ("llm", "vision", "audio")})
        runtime = self.parts["llm"].runtime
        model = nnx.eval_shape(lambda: OmniModel(cfg, runtime, deepstack=self.deepstack, rngs=nnx.Rngs(0)))
        model.llm = llm
        for key in ("vision", "vision_proj", "audio"):
            setattr(model, key, self.modules.get(key))
        return model


def detect_format(path: str) -> str:
    """CONVERTED (ming_jax.json), RELEASE (config.json + safetensors), else a clear error."""
    if os.path.exists(os.path.join(path, MANIFEST_FILE)):
        return CONVERTED
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return RELEASE
    raise CheckpointError(f"{path} has no config.json: neither a release folder (config.json + safetensors) nor a "
                          f"converted ming_jax checkpoint ({MANIFEST_FILE})")


def release_dtype(raw: Mapping) -> str:
    """The parameter dtype a release's config.json declares (`torch_dtype`, or transformers' newer `dtype`, at the
    top level or in `llm_config`): "bfloat16" or "float32" (float16 checkpoints are held in float32, which
    represents them exactly; absent: float32)."""
    for section in (raw, raw.get("llm_config") or {}):
        name = section.get("torch_dtype") or section.get("dtype")
        if name is not None:
            if name not in ("bfloat16", "float32", "float16"):
                raise CheckpointError(f"config.json declares torch_dtype={name!r}; expected bfloat16, float16 or "
                                      f"float32")
            return "bfloat16" if name == "bfloat16" else "float32"
    return "float32"


def checkpoint_dtype(path: str) -> str:
    """The parameter dtype `load(path)` keeps by default: the LLM's stored dtype for a converted checkpoint (or the
    first converted component's), `release_dtype` for a release folder."""
    if detect_format(path) == CONVERTED:
        manifest = Manifest.read(path)
        first = "llm" if "llm" in manifest.components else manifest.components[0]
        return _param_dtype(manifest, registry.COMPONENTS[first].subtrees[0])
    return release_dtype(read_config(path))


def _runtime(runtime: Runtime | None, dtype: str | None, compute_dtype: str | None) -> Runtime:
    """`runtime` (default `Runtime()`) with the explicit parameter / compute dtypes applied."""
    runtime = Runtime() if runtime is None else runtime
    kw = {k: v for k, v in (("param_dtype", dtype), ("dtype", compute_dtype)) if v is not None}
    return runtime.replace(**kw) if kw else runtime


def load(path: str, *, components: Sequence[str] | None = None, mesh: jax.sharding.Mesh | None = None,
         rules: ShardingRules | str | None = None, dtype: str | None = None, compute_dtype: str | None = None,
         runtime: Runtime | None = None, deepstack: bool = False,
         shardings: Mapping[str, Any] | None = None, quantize: "quant.QuantConfig | str | None" = None) -> Loaded:
    """Load the `components` (None: all the folder holds) of a release folder or a converted checkpoint.

    mesh / rules: place every parameter with `ming_jax.sharding.param_shardings(module, mesh, rules)` (rules: a
    `ShardingRules` or a preset name, default "ep_fsdp"); no mesh: the default device. `shardings` instead gives,
    per subtree key, a pytree of `NamedSharding` matching `nnx.state(module, nnx.Param)`. `dtype`: parameter dtype
    (default: the checkpoint's, see the module docstring; `runtime.param_dtype` is not used), `compute_dtype`:
    activation dtype (default: `runtime.dtype`); `runtime` gives the other run settings (kernels, remat, expert
    parallelism). `deepstack`: the vision tower also returns its deepstack features.

    Quantized weights (`ming_jax.quant`): a checkpoint converted with `--dtype int8|fp8` loads quantized as stored
    (its int8 / fp8 values and scales restored sharded like any parameter). `quantize` ("int8", "fp8", "fp8:128",
    or a QuantConfig) quantizes the LLM's projections of a float checkpoint at load: a converted one region by region
    from disk (the float weights never reach a device: `ming_jax.checkpoint.quantized`), a release folder on the host
    after the table maps each tensor. Explicit `shardings` of a quantized component must match its quantized tree.
    """
    qcfg = quant.QuantConfig.parse(quantize)
    if isinstance(rules, str):
        rules = ShardingRules.preset(rules)
    if mesh is not None and rules is None and not shardings:
        rules = ShardingRules.preset(DEFAULT_RULES)
    shardings = dict(shardings or {})
    fmt = detect_format(path)
    raw = read_config(path)
    base = _runtime(runtime, None, compute_dtype)
    if fmt == RELEASE and dtype is None:
        dtype = release_dtype(raw)  # the parameters stay in the release's dtype (runtime.param_dtype is not used)
    sections = folders.image_gen_sections(path)
    speech = folders.talker_sections(path)
    described = registry.describe(raw, _runtime(base, dtype, None), deepstack=deepstack, sections=sections,
                                  speech=speech)
    if fmt == CONVERTED:
        manifest = Manifest.read(path)
        chosen = (registry.select(described, components) if components
                  else [c for c in described if c in manifest.components])
        for c in chosen:
            _needs(manifest, c, path)
        parts = _converted_parts(raw, manifest, described, chosen, dtype, base, deepstack, sections, speech)
        stored = stored_quantization(manifest)
        if stored is not None and qcfg is not None and qcfg != stored:
            raise CheckpointFormatError(f"{path} holds {stored} weights; it cannot be loaded as {qcfg} (convert the "
                                        "float release again, or load it without `quantize`)")
        for part in parts.values():
            for key, module in part.modules.items():
                computed = None
                if part.name in quant.COMPONENTS and stored is not None:  # quantized as stored
                    quant.quantize_model(module, stored)
                elif part.name in quant.COMPONENTS and qcfg is not None:  # quantize the float weights at load
                    targets = quant.plan(module, qcfg)
                    quant.quantize_model(module, qcfg)
                    computed = quantized.fillers(path, key, targets, qcfg)
                # each array to the dtype the module gives it: float32 router biases stay float32 in a bf16 model
                restore_params(path, module, subtree=key, shardings=shardings.get(key), mesh=mesh, rules=rules,
                               computed=computed)
    else:
        parts = {c: described[c] for c in registry.select(described, components)}
        _fill_from_release(path, described, parts, shardings, mesh, rules, qcfg)
    return Loaded(path, fmt, raw, parts, deepstack, mesh, rules)


def stored_quantization(manifest: Manifest) -> "quant.QuantConfig | None":
    """The quantization a converted checkpoint was written with (`--dtype int8|fp8`), or None."""
    q = manifest.options.get("quantization")
    return None if q is None else quant.QuantConfig.from_json(q)


def _param_dtype(manifest: Manifest, subtree: str) -> str:
    """The dtype most of a subtree's parameters are stored in (bfloat16 or float32: what the configs accept)."""
    counts: dict[str, int] = {}
    q = manifest.options.get("quantization") or {}
    skip = {f"{t}.{leaf}" for t in q.get("params", ()) for leaf in ("qvalue", "scale")}  # quantized: not "the dtype"
    for path, p in manifest.params.items():
        if path.split(".", 1)[0] == subtree and path not in skip:
            counts[p["dtype"]] = counts.get(p["dtype"], 0) + int(np.prod(p["shape"], dtype=np.int64))
    if not counts:
        raise CheckpointFormatError(f"the checkpoint holds no {subtree!r} parameters (converted components: "
                                    f"{', '.join(manifest.components)})")
    main = max(counts, key=counts.get)
    return "bfloat16" if main == "bfloat16" else "float32"


def _needs(manifest: Manifest, component: str, ckpt_dir: str) -> None:
    if component not in manifest.components:
        raise CheckpointFormatError(f"{ckpt_dir} holds no {component} (converted: {', '.join(manifest.components)}); "
                                    f"re-run the converter with --components including {component}")


def _converted_parts(raw: dict, manifest: Manifest, described: Mapping[str, registry.Part], chosen: list[str],
                     dtype: str | None, base: Runtime, deepstack: bool,
                     sections: Mapping[str, Any] | None = None,
                     speech: Mapping[str, Any] | None = None) -> dict[str, registry.Part]:
    """The chosen parts, each built in the dtype most of its parameters are stored in (unless `dtype`)."""
    by_dtype: dict[str, list[str]] = {}
    for c in chosen:
        pdt = dtype or _param_dtype(manifest, registry.COMPONENTS[c].subtrees[0])
        by_dtype.setdefault(pdt, []).append(c)
    parts: dict[str, registry.Part] = {}
    for pdt, names in by_dtype.items():
        if any(described[c].runtime.param_dtype != pdt for c in names):
            described = registry.describe(raw, base.replace(param_dtype=pdt), deepstack=deepstack,
                                          sections=sections, speech=speech)
        parts.update({c: described[c] for c in names})
    return {c: parts[c] for c in chosen}


def load_tensors(raw: Mapping, tensors: Mapping[str, Any], *, components: Sequence[str] | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: ShardingRules | str | None = None,
                 dtype: str | None = None, compute_dtype: str | None = None, runtime: Runtime | None = None,
                 deepstack: bool = False, source: str = "tensors",
                 sections: Mapping[str, Any] | None = None, speech: Mapping[str, Any] | None = None,
                 quantize: "quant.QuantConfig | str | None" = None) -> Loaded:
    """`load` for official tensors already at hand: `raw` a config.json dict, `tensors` {official name: array}
    (e.g. a golden case's weights, or a lazy `TensorMapping`). Strict like the release path of `load`.
    `sections`: image-generation sub-folder configs (their tensors named as `registry.IMAGE_GEN_WEIGHT_FOLDERS`
    joins them); `speech`: the talker configs (tensors named as `registry.TALKER_WEIGHT_FOLDERS` joins them)."""
    if isinstance(rules, str):
        rules = ShardingRules.preset(rules)
    if mesh is not None and rules is None:
        rules = ShardingRules.preset(DEFAULT_RULES)
    described = registry.describe(raw, _runtime(runtime, dtype, compute_dtype), deepstack=deepstack,
                                  sections=sections, speech=speech)
    parts = {c: described[c] for c in registry.select(described, components)}
    _fill_from_tensors(source, tensors, described, parts, {}, mesh, rules, quant.QuantConfig.parse(quantize))
    return Loaded(source, RELEASE, dict(raw), parts, deepstack, mesh, rules)


def _fill_from_release(path: str, described: Mapping[str, registry.Part], parts: Mapping[str, registry.Part],
                       shardings: Mapping[str, Any], mesh, rules, qcfg=None) -> None:
    """Fill the parts' modules from the folder's safetensors, tensor by tensor (strict, like the converter)."""
    _fill_from_tensors(path, TensorMapping(folders.open_source(path, list(parts))), described, parts, shardings, mesh,
                       rules, qcfg)


def _fill_from_tensors(path: str, tensors: Mapping[str, Any], described: Mapping[str, registry.Part],
                       parts: Mapping[str, registry.Part], shardings: Mapping[str, Any], mesh, rules,
                       qcfg: "quant.QuantConfig | None" = None) -> None:
    owned: dict[str, list[str]] = {c: [] for c in described}
    orphans = []
    for name in tensors:
        owners = [c for c, p in described.items() if p.owns(name)]
        (owned[owners[0]].append(name) if owners else orphans.append(name))
    if orphans:
        raise WeightError(f"{len(orphans)} tensor(s) of {path} belong to no component of this release "
                          f"({', '.join(described)}): {', '.join(sorted(orphans)[:12])}")
    for c, part in parts.items():
        shapes = part.shapes
        arrays = load_arrays(part.table, tensors, shapes, names=owned[c])
        not_filled = sorted(set(shapes) - set(arrays))
        if not_filled:
            raise WeightError(f"{c}: parameters not filled by any official tensor: {', '.join(not_filled[:12])}")
        for key, module in part.modules.items():
            if qcfg is not None and c in quant.COMPONENTS:  # quantize on the host, each weight as the table made it
                for p, t in quant.plan(module, qcfg).items():
                    q = quant.quantize_slot(arrays.pop(f"{key}.{p}"), t, qcfg, 0)
                    arrays[f"{key}.{p}.qvalue"], arrays[f"{key}.{p}.scale"] = q.qvalue, q.scale
                quant.quantize_model(module, qcfg)
            sh = shardings.get(key)
            if sh is None and mesh is not None:
                sh = param_shardings(module, mesh, rules)
            flat_sh = {p: (v.get_value() if isinstance(v, nnx.Variable) else v)
                       for p, v in _flat(_pure(sh)).items()} if sh is not None else {}
            state = nnx.state(module, nnx.Param)
            like = nnx.to_pure_dict(state)
            values = {}
            for p, leaf in _flat(like).items():
                arr = arrays.pop(f"{key}.{p}").astype(leaf.dtype, copy=False)
                values[p] = jax.device_put(arr, flat_sh[p]) if p in flat_sh else jax.numpy.asarray(arr)
            nnx.replace_by_pure_dict(state, _restore_keys(like, _unflatten(values)))
            nnx.update(module, state)


# --- the per-component wrappers (kept for their callers) ------------------------------------------------------------


def load_llm(ckpt_dir: str, *, shardings: Shardings | None = None, mesh=None, rules=None, dtype: str | None = None,
             compute_dtype: str | None = None):
    """The `BailingMoeV2` of a converted checkpoint (omni or LLM-only release): `load(..., components=["llm"]).llm`."""
    _expect_converted(ckpt_dir)
    return load(ckpt_dir, components=["llm"], mesh=mesh, rules=rules, dtype=dtype, compute_dtype=compute_dtype,
                shardings=None if shardings is None else {"llm": shardings}).llm


def load_vision(ckpt_dir: str, *, use_deepstack: bool = False, shardings: Mapping[str, Shardings] | None = None,
                mesh=None, rules=None, dtype: str | None = None):
    """(VisionTransformer, VisionProjector or None): the tower, and in an omni release its projector into the LLM.
    `shardings` maps "vision" / "vision_proj" to each module's shardings."""
    _expect_converted(ckpt_dir)
    modules = load(ckpt_dir, components=["vision"], mesh=mesh, rules=rules, dtype=dtype, deepstack=use_deepstack,
                   shardings=shardings).modules
    return modules["vision"], modules.get("vision_proj")


def load_audio(ckpt_dir: str, *, shardings: Shardings | None = None, mesh=None, rules=None,
               dtype: str | None = None):
    """The `AudioTower` (whisper encoder + projector) of a converted checkpoint."""
    _expect_converted(ckpt_dir)
    return load(ckpt_dir, components=["audio"], mesh=mesh, rules=rules, dtype=dtype,
                shardings=None if shardings is None else {"audio": shardings}).modules["audio"]


def load_omni(ckpt_dir: str, *, deepstack: bool = False, shardings: Shardings | None = None, mesh=None, rules=None,
              dtype: str | None = None):
    """The whole `OmniModel` of a converted omni release (every tower it has must have been converted).
    `shardings`: the whole model's tree (top-level keys = subtrees)."""
    _expect_converted(ckpt_dir)
    return load(ckpt_dir, components=list(registry.describe(read_config(ckpt_dir))), mesh=mesh, rules=rules,
                dtype=dtype, deepstack=deepstack, shardings=None if shardings is None else _pure(shardings)).omni()


def _expect_converted(ckpt_dir: str) -> None:
    Manifest.read(ckpt_dir)  # the error naming the missing manifest


