"""Reading a released (PyTorch) checkpoint folder: config.json + safetensors shards (with or without an index).

Headers, index and byte ranges are checked up front (`ming_jax.checkpoint.safetensors`); tensors are then read lazily, one
at a time, so mapping a checkpoint onto our parameters never holds the whole source in memory. The name mapping itself is the component tables in
`ming_jax.weights`.
"""

from __future__ import annotations

import json
import os

from ming_jax.config.llm import LLMConfig
from ming_jax.checkpoint.safetensors import INDEX_FILE, CheckpointError, SourceCheckpoint, TensorMapping  # noqa: F401


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
    return "model." if "llm_config" in official_config else ""


def load_llm(path: str, **overrides):
    """Build a `BailingMoeV2` from an official checkpoint folder (omni or LLM-only), weights read tensor by tensor.

    The parameters are assembled in host memory, so this suits checkpoints that fit in RAM; the full release goes
    through the converter (`tools/convert_torch.py`) and a sharded orbax restore instead.
    """
    from ming_jax.models import llm as model_lib
    from ming_jax import weights
    from ming_jax.weights.llm import llm_table

    raw = read_config(path)
    cfg = LLMConfig.from_official(raw, **overrides)
    tensors = release_tensors(path)
    prefix = llm_prefix(raw)
    names = [n for n in tensors if n.startswith((prefix + "model.", prefix + "lm_head."))]
    return weights.load_state_dict(model_lib.create_abstract(cfg), llm_table(cfg, prefix), tensors, names=names)


def load_omni(path: str, *, dtype: str | None = None, param_dtype: str | None = None, deepstack: bool = False):
    """Build the whole omni model (`ming_jax.models.omni.OmniModel`) from an official release folder: config.json read with
    `OmniConfig.from_official`, every tensor of the folder's safetensors mapped by `omni_table` (strict: a tensor the
    table does not know, or a parameter no tensor fills, raises `WeightError` naming it).

    Host-memory assembly, like `load_llm`: for the full release use the converter and a sharded restore."""
    from ming_jax.gen import omni
    from ming_jax.config.omni import OmniConfig

    raw = read_config(path)
    if "llm_config" not in raw:
        raise CheckpointError(f"{path}/config.json is not an omni config (no llm_config section); "
                              "for an LLM-only checkpoint use load_llm")
    cfg = OmniConfig.from_official(raw, dtype=dtype, param_dtype=param_dtype)
    return omni.load(cfg, release_tensors(path), deepstack=deepstack)
