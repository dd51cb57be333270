"""Reading golden parity cases: a folder with config.json, weights/inputs/outputs .safetensors (see MANIFEST.md)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load_file

CASE_FILES = ("config.json", "weights.safetensors", "inputs.safetensors", "outputs.safetensors")


@dataclasses.dataclass
class GoldenCase:
    path: str
    kind: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def case_kind(path: str) -> str:
    """The kind of a case is its folder name (`llm_backbone`, `vision_encoder`, ...)."""
    return os.path.basename(os.path.normpath(path))


def load_case(path: str) -> GoldenCase:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"golden case folder not found: {path}")
    missing = [f for f in CASE_FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"golden case {path} lacks {missing}")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    load = lambda name: load_file(os.path.join(path, name))  # noqa: E731
    return GoldenCase(path, case_kind(path), config, load("weights.safetensors"), load("inputs.safetensors"),
                      load("outputs.safetensors"))
