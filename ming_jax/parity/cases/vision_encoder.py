"""Golden kind `vision_encoder`: the ViT with deepstack on each sub-case `<name>_pixel_values` / `<name>_grid_thw`.

Outputs per sub-case: `<name>_last_hidden` (merger output) and `<name>_deepstack_<j>` (one per deepstack index, in
block order). Sub-cases, sizes and the number of deepstack features all come from the case files.
"""

from __future__ import annotations

import re


from ming_jax.parity import numerics
from ming_jax.checkpoint import restore
from ming_jax.config.runtime import Runtime
from ming_jax.parity.numerics import runtime_for as _runtime
from ming_jax.parity.golden import GoldenCase
from ming_jax.models.vision import VisionTransformer, as_grid, vision_forward


def build(config: dict, tensors, runtime: Runtime | None = None) -> VisionTransformer:
    """The case's tower (deepstack on) with every parameter loaded from the official tensors (strict)."""
    return restore.load_tensors(config, tensors, components=("vision",), deepstack=True,
                                runtime=runtime).modules["vision"]


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    model = build(case.config, case.weights, _runtime(mode))
    names = sorted({m.group(1) for k in case.inputs if (m := re.fullmatch(r"(.+)_pixel_values", k))})
    if not names:
        raise ValueError(f"{case.path}: no '<name>_pixel_values' inputs")
    rows = []
    for name in names:
        hidden, deepstack = vision_forward(model, case.inputs[f"{name}_pixel_values"],
                                           as_grid(case.inputs[f"{name}_grid_thw"]))
        rows.append(numerics.compare(f"{name}_last_hidden", hidden, case.outputs[f"{name}_last_hidden"], dtype=mode))
        for j, feature in enumerate(deepstack):
            key = f"{name}_deepstack_{j}"
            if key in case.outputs:
                rows.append(numerics.compare(key, feature, case.outputs[key], dtype=mode))
            else:
                rows.append(numerics.Comparison(key, float("nan"), float("nan"), float("nan"), 0.0, False, False,
                                                "we produce it, the case lacks it"))
    return rows
