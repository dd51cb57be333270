"""Reading a released (PyTorch) checkpoint folder: config.json + safetensors shards (with or without an index).

Tensors are read lazily, one at a time, through memory-mapped `safetensors` handles, so mapping a checkpoint onto
our parameters never holds the whole source in memory. The name mapping itself is the component tables in
`ming_jax.tables`.
"""

from __future__ import annotations

import collections.abc
import glob
import json
import os

import numpy as np
from safetensors import safe_open

from ming_jax.config.llm import LLMConfig

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or inconsistent."""


class SafetensorsFolder(collections.abc.Mapping):
    """name -> numpy array over every shard of a folder; `index` (model.safetensors.index.json) when present."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index_path} is not a safetensors index ({e})") from None
            missing = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(path, s))})
            if missing:
                raise CheckpointError(f"{index_path} names shard(s) that do not exist: {missing}")
            self._where = dict(weight_map)
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in {path}")
            self._where = {}
            for fpath in files:
                for name in self._handle(os.path.basename(fpath)).keys():
                    if name in self._where:
                        raise CheckpointError(f"tensor {name} appears in both {self._where[name]} and {fpath}")
                    self._where[name] = os.path.basename(fpath)
        self._handles: dict[str, object] = {}

    def _handle(self, shard: str):
        if not hasattr(self, "_handles"):
            self._handles = {}
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(os.path.join(self.path, shard), framework="np")
            except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
                raise CheckpointError(f"cannot read shard {shard} of {self.path}: {e}") from None
        return self._handles[shard]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(name)
        handle = self._handle(self._where[name])
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from shard {self._where[name]}: {e}") from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


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
    from ming_jax import model as model_lib, weights
    from ming_jax.tables.llm import llm_table

    raw = read_config(path)
    cfg = LLMConfig.from_official(raw, **overrides)
    tensors = SafetensorsFolder(path)
    prefix = llm_prefix(raw)
    names = [n for n in tensors if n.startswith((prefix + "model.", prefix + "lm_head."))]
    return weights.load_state_dict(model_lib.create_abstract(cfg), llm_table(cfg, prefix), tensors, names=names)


def load_omni(path: str, *, dtype: str | None = None, param_dtype: str | None = None, deepstack: bool = False):
    """Build the whole omni model (`ming_jax.omni.OmniModel`) from an official release folder: config.json read with
    `OmniConfig.from_official`, every tensor of the folder's safetensors mapped by `omni_table` (strict: a tensor the
    table does not know, or a parameter no tensor fills, raises `WeightError` naming it).

    Host-memory assembly, like `load_llm`: for the full release use the converter and a sharded restore."""
    from ming_jax import omni
    from ming_jax.config.omni import OmniConfig

    raw = read_config(path)
    if "llm_config" not in raw:
        raise CheckpointError(f"{path}/config.json is not an omni config (no llm_config section); "
                              "for an LLM-only checkpoint use load_llm")
    cfg = OmniConfig.from_official(raw, dtype=dtype, param_dtype=param_dtype)
    return omni.load(cfg, SafetensorsFolder(path), deepstack=deepstack)
