"""Restoring a converted checkpoint into (sharded) models: each device reads only its own shard of each array.

`restore_params(DIR, abstract_model, subtree=...)` fills every `nnx.Param` of an abstract model from the orbax tree;
the component loaders below build the abstract model from the folder's config.json first.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from ming_jax.checkpoint.manifest import PARAMS_DIR, CheckpointFormatError, Manifest, np_dtype, read_config

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
                   shardings: Shardings | None = None, mesh=None, rules=None, dtype: str | None = None
                   ) -> nnx.Module:
    """Fill every `nnx.Param` of `abstract_model` (from `nnx.eval_shape`) from the converted checkpoint.

    `subtree` is where the model sits in our tree ("llm", "vision", "vision_proj", "audio"; None: the whole tree,
    i.e. an `OmniModel`). Placement: `shardings` (a pytree of `NamedSharding` matching
    `nnx.state(abstract_model, nnx.Param)`, e.g. `ming_jax.sharding.param_shardings`), or `mesh` + `rules` to
    compute it, or neither for the default device. Each device reads its shard straight from disk.
    Each array is cast to the dtype the model gives that parameter (e.g. float32 router biases in a bfloat16
    model), or every one to `dtype`.
    """
    import orbax.checkpoint as ocp

    params_dir = os.path.abspath(os.path.join(ckpt_dir, PARAMS_DIR))
    manifest = Manifest.read(ckpt_dir)
    if shardings is None and mesh is not None:
        from ming_jax.sharding import param_shardings

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
    problems = []
    target = {}
    for path, leaf in flat_abstract.items():
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
        target[path] = jax.ShapeDtypeStruct(leaf.shape, np_dtype(dtype) if dtype else leaf.dtype,
                                            sharding=sharding or default)
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
    nnx.replace_by_pure_dict(state, _restore_keys(abstract, restored))
    nnx.update(abstract_model, state)
    return abstract_model


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


# --- the sub-models ------------------------------------------------------------------------------------------------


def _param_dtype(manifest: Manifest, subtree: str) -> str:
    """The dtype most of a subtree's parameters are stored in (bfloat16 or float32: what the configs accept)."""
    counts: dict[str, int] = {}
    for path, p in manifest.params.items():
        if path.split(".", 1)[0] == subtree:
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


def load_llm(ckpt_dir: str, *, shardings: Shardings | None = None, mesh=None, rules=None, dtype: str | None = None,
             **overrides):
    """The `BailingMoeV2` of a converted checkpoint (omni or LLM-only release); `overrides` go to `LLMConfig`
    (e.g. `dtype="bfloat16"` for the compute dtype)."""
    from ming_jax.models import llm as model_lib
    from ming_jax.config.llm import LLMConfig

    manifest = Manifest.read(ckpt_dir)
    _needs(manifest, "llm", ckpt_dir)
    overrides.setdefault("param_dtype", dtype or _param_dtype(manifest, "llm"))
    cfg = LLMConfig.from_official(read_config(ckpt_dir), **overrides)
    return restore_params(ckpt_dir, model_lib.create_abstract(cfg), subtree="llm", shardings=shardings, mesh=mesh,
                          rules=rules, dtype=dtype)


def load_vision(ckpt_dir: str, *, use_deepstack: bool = False, shardings: Mapping[str, Shardings] | None = None,
                mesh=None, rules=None, dtype: str | None = None):
    """(VisionTransformer, VisionProjector or None): the tower, and in an omni release its projector into the LLM.
    `shardings` maps "vision" / "vision_proj" to each module's shardings."""
    from ming_jax.config.vision import VisionConfig
    from ming_jax.models.vision import VisionProjector, VisionTransformer

    manifest = Manifest.read(ckpt_dir)
    _needs(manifest, "vision", ckpt_dir)
    raw = read_config(ckpt_dir)
    pdt = dtype or _param_dtype(manifest, "vision")
    cfg = VisionConfig.from_official(raw, param_dtype=pdt)
    tower = nnx.eval_shape(lambda: VisionTransformer(cfg, use_deepstack=use_deepstack, rngs=nnx.Rngs(0)))
    shardings = shardings or {}
    tower = restore_params(ckpt_dir, tower, subtree="vision", shardings=shardings.get("vision"), mesh=mesh,
                           rules=rules, dtype=dtype)
    if not any(p.startswith("vision_proj.") for p in manifest.params):
        return tower, None
    llm_hidden = raw["llm_config"]["hidden_size"]
    proj = nnx.eval_shape(lambda: VisionProjector(cfg.out_hidden_size, llm_hidden, int(raw.get("mlp_depth", 1)),
                                                  param_dtype=np_dtype(pdt), rngs=nnx.Rngs(0)))
    proj = restore_params(ckpt_dir, proj, subtree="vision_proj", shardings=shardings.get("vision_proj"), mesh=mesh,
                          rules=rules, dtype=dtype)
    return tower, proj


def load_audio(ckpt_dir: str, *, shardings: Shardings | None = None, mesh=None, rules=None,
               dtype: str | None = None):
    """The `AudioTower` (whisper encoder + projector) of a converted checkpoint."""
    from ming_jax.models.audio import AudioTower
    from ming_jax.config.audio import AudioConfig

    manifest = Manifest.read(ckpt_dir)
    _needs(manifest, "audio", ckpt_dir)
    cfg = AudioConfig.from_official(read_config(ckpt_dir), param_dtype=dtype or _param_dtype(manifest, "audio"))
    model = nnx.eval_shape(lambda: AudioTower(cfg, rngs=nnx.Rngs(0)))
    return restore_params(ckpt_dir, model, subtree="audio", shardings=shardings, mesh=mesh, rules=rules, dtype=dtype)


def load_omni(ckpt_dir: str, *, deepstack: bool = False, shardings: Shardings | None = None, mesh=None, rules=None,
              dtype: str | None = None):
    """The whole `OmniModel` of a converted omni release (every tower it has must have been converted)."""
    from ming_jax.gen import omni
    from ming_jax.config.omni import OmniConfig

    manifest = Manifest.read(ckpt_dir)
    raw = read_config(ckpt_dir)
    cfg = OmniConfig.from_official(raw, dtype="float32", param_dtype=dtype or _param_dtype(manifest, "llm"))
    for name, present in (("llm", True), ("vision", cfg.vision is not None), ("audio", cfg.audio is not None)):
        if present:
            _needs(manifest, name, ckpt_dir)
    return restore_params(ckpt_dir, omni.create_abstract(cfg, deepstack=deepstack), shardings=shardings, mesh=mesh,
                          rules=rules, dtype=dtype)


LOADERS: dict[str, Callable] = {"llm": load_llm, "vision": load_vision, "audio": load_audio}
