"""Reading a released (PyTorch) checkpoint folder: config.json + safetensors shards (with or without an index).

Headers, index and byte ranges are checked up front (`ming_jax.checkpoint.safetensors`); tensors are then read lazily,
one at a time, so mapping a checkpoint onto our parameters never holds the whole source in memory. The name mapping
itself is the component tables in `ming_jax.weights`, read through `ming_jax.models.registry`; the loading is
`ming_jax.checkpoint.restore.load` (one loader for release folders and converted checkpoints, onto a mesh or not).
`load_llm` / `load_omni` below are thin wrappers over it.
"""

from __future__ import annotations

import json
import os

from ming_jax.checkpoint.restore import load
from ming_jax.checkpoint.safetensors import INDEX_FILE, CheckpointError, SourceCheckpoint, TensorMapping  # noqa: F401
from ming_jax.models import registry


def release_tensors(path: str) -> TensorMapping:
    """name -> numpy array over every shard of a release folder (checked: index, headers, byte ranges)."""
    return TensorMapping(SourceCheckpoint(path))


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} has no config.json")
    with open(cfg_path) as f:
        return json.load(f)


def llm_prefix(official_config: dict) -> str:
    """Inside the omni checkpoint the language model lives under `model.`; an LLM-only checkpoint has no prefix."""
    return registry.LLM_PREFIX if "llm_config" in official_config else ""


def load_llm(path: str, *, mesh=None, rules=None, dtype: str | None = None, param_dtype: str | None = None):
    """The `BailingMoeV2` of an official checkpoint folder (omni or LLM-only), weights read tensor by tensor:
    `load(path, components=["llm"]).llm`. Here `dtype` is the compute dtype (default float32) and `param_dtype` the
    parameter dtype (default: the release's `torch_dtype`); `load` itself calls them `compute_dtype` / `dtype`."""
    read_config(path)
    return load(path, components=["llm"], mesh=mesh, rules=rules, dtype=param_dtype, compute_dtype=dtype).llm


def load_omni(path: str, *, dtype: str | None = None, param_dtype: str | None = None, deepstack: bool = False,
              mesh=None, rules=None):
    """The whole omni model (`ming_jax.models.omni.OmniModel`) of an official release folder: every component its
    config.json has, each tensor mapped by its component's table (strict: a tensor no table knows, or a parameter
    no tensor fills, raises `WeightError` naming it). `load(path, deepstack=...).omni()`."""
    raw = read_config(path)
    if "llm_config" not in raw:
        raise CheckpointError(f"{path}/config.json is not an omni config (no llm_config section); "
                              "for an LLM-only checkpoint use load_llm")
    return load(path, mesh=mesh, rules=rules, dtype=param_dtype, compute_dtype=dtype, deepstack=deepstack).omni()
