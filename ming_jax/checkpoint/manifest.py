"""A converted checkpoint's folder layout and its manifest (`ming_jax.json`): what was converted, every parameter's
shape and stored dtype, the source tensors' CRC32, what was skipped. Also the one error type for such folders and the
atomic JSON writer every file of ours goes through.

Layout of a converted folder DIR (written by `ming_jax.checkpoint.convert`):

    DIR/config.json       the release's config.json, verbatim: every sub-model config is read from it
    DIR/ming_jax.json     manifest (see `Manifest`)
    DIR/params/           an orbax checkpoint in `StandardCheckpointer` layout: OCDBT database + zarr arrays
                          (`ming_jax.checkpoint.orbax_tree`), top-level keys = the components' subtrees
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = "ming_jax.orbax.v1"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "ming_jax.json"
PARAMS_DIR = "params"

_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
              "bfloat16": np.dtype(ml_dtypes.bfloat16),
              # the values of quantized weights (`ming_jax.quant`): <param>.qvalue beside its float32 <param>.scale
              "int8": np.dtype(np.int8), "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn)}


class CheckpointFormatError(ValueError):
    """A converted checkpoint folder that is incomplete, of another format, or does not fit the model asked for."""


def np_dtype(name: str) -> np.dtype:
    if name not in _NP_DTYPES:
        raise CheckpointFormatError(f"dtype {name!r} is not a parameter dtype we store ({', '.join(_NP_DTYPES)})")
    return _NP_DTYPES[name]


@dataclasses.dataclass
class Manifest:
    """What `ming_jax.json` records about a conversion."""

    components: list[str]
    params: dict[str, dict[str, Any]]  # dotted path -> {"shape": [...], "dtype": "bfloat16"}
    source: dict[str, Any]  # path, tensor / byte counts, {name: {"dtype", "crc32"}} of the source tensors
    skipped: dict[str, Any]  # components not converted, sub-folders not implemented, their sizes
    options: dict[str, Any]  # dtype, compression
    format: str = FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, ckpt_dir: str) -> "Manifest":
        path = os.path.join(ckpt_dir, MANIFEST_FILE)
        if not os.path.exists(path):
            raise CheckpointFormatError(f"{ckpt_dir} is not a converted ming_jax checkpoint (no {MANIFEST_FILE}); "
                                        f"convert a release with tools/convert_torch.py")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointFormatError(f"{path} is not valid JSON ({e})") from None
        if d.get("format") != FORMAT:
            raise CheckpointFormatError(f"{path}: format {d.get('format')!r}, this code reads {FORMAT!r}")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def read_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{ckpt_dir} has no {CONFIG_FILE}")
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write-then-rename, fsynced: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=None if path.endswith("_METADATA") else 1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
