"""Golden kind `vision_encoder`: the ViT with deepstack on each sub-case `<name>_pixel_values` / `<name>_grid_thw`.

Outputs per sub-case: `<name>_last_hidden` (merger output) and `<name>_deepstack_<j>` (one per deepstack index, in
block order). Sub-cases, sizes and the number of deepstack features all come from the case files.
"""

from __future__ import annotations

import re

from flax import nnx

from ming_jax.parity import numerics
from ming_jax import weights
from ming_jax.config.vision import VisionConfig
from ming_jax.parity.golden import GoldenCase
from ming_jax.weights.vision import vision_table
from ming_jax.models.vision import VisionTransformer, as_grid, vision_forward


def build(config: dict, tensors) -> VisionTransformer:
    """The case's tower (deepstack on) with every parameter loaded from the official tensors (strict)."""
    cfg = VisionConfig.from_official(config)
    # Abstract first: no random initialisation to compute (or compile), every leaf comes from the tensors.
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, use_deepstack=True, rngs=nnx.Rngs(0)))
    weights.load_state_dict(model, vision_table(cfg), tensors)
    return model


def run(case: GoldenCase) -> list[numerics.Comparison]:
    model = build(case.config, case.weights)
    names = sorted({m.group(1) for k in case.inputs if (m := re.fullmatch(r"(.+)_pixel_values", k))})
    if not names:
        raise ValueError(f"{case.path}: no '<name>_pixel_values' inputs")
    rows = []
    for name in names:
        hidden, deepstack = vision_forward(model, case.inputs[f"{name}_pixel_values"],
                                           as_grid(case.inputs[f"{name}_grid_thw"]))
        rows.append(numerics.compare(f"{name}_last_hidden", hidden, case.outputs[f"{name}_last_hidden"]))
        for j, feature in enumerate(deepstack):
            key = f"{name}_deepstack_{j}"
            if key in case.outputs:
                rows.append(numerics.compare(key, feature, case.outputs[key]))
            else:
                rows.append(numerics.Comparison(key, float("nan"), float("nan"), float("nan"), 0.0, False, False,
                                                "we produce it, the case lacks it"))
    return rows
