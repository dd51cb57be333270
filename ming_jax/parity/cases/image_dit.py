"""Golden kind `image_dit`: the Z-Image DiT forward on each sub-case `<name>_x`, `<name>_t`, `<name>_cap_feats`
(+ `<name>_ref_x` for editing).

Outputs per sub-case: `<name>_out` and the intermediates `dit_forward(..., taps=True)` returns under the same names
(`<name>_x_tokens`, `<name>_x_pos_ids`, ...). The official code concatenates the batch rows before the x / caption
embedders, so the case stores those two as [B * L, dim]; ours are [B, L, dim] and are flattened to compare (the
rows of a stacked batch all have the same length). Sub-cases, sizes and patch sizes all come from the case files.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from ming_jax.config.dit import DiTConfig
from ming_jax.config.runtime import Runtime
from ming_jax.models.image_gen.dit import ZImageDiT, dit_forward
from ming_jax.parity import numerics
from ming_jax.parity.golden import GoldenCase
from ming_jax.parity.numerics import runtime_for as _runtime
from ming_jax.weights.dit import dit_table
from ming_jax.weights.table import load_state_dict

_FLAT = ("x_embed", "cap_embed")  # stored with the batch rows concatenated


def build(config: dict, tensors, runtime: Runtime | None = None) -> ZImageDiT:
    """The case's DiT with every parameter loaded from the official tensors (strict)."""
    cfg = DiTConfig.from_official(config)
    model = nnx.eval_shape(lambda: ZImageDiT(cfg, runtime, rngs=nnx.Rngs(0)))
    return load_state_dict(model, dit_table(cfg), tensors)


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    model = build(case.config, case.weights, _runtime(mode))
    names = sorted({m.group(1) for k in case.inputs if (m := re.fullmatch(r"(.+)_cap_feats", k))})
    if not names:
        raise ValueError(f"{case.path}: no '<name>_cap_feats' inputs")
    rows = []
    for name in names:
        ref_x = case.inputs.get(f"{name}_ref_x")
        out, taps = dit_forward(model, case.inputs[f"{name}_x"], case.inputs[f"{name}_t"],
                                case.inputs[f"{name}_cap_feats"], ref_x=ref_x, taps=True)
        ours = dict(taps, out=out)
        for key in sorted(k for k in case.outputs if k.startswith(f"{name}_")):
            tap = key[len(name) + 1:]
            if tap not in ours:
                rows.append(numerics.Comparison(key, float("nan"), float("nan"), float("nan"), 0.0, False, False,
                                                "the case has it, we do not produce it"))
                continue
            value = ours[tap]
            if tap in _FLAT:
                value = value.reshape(-1, value.shape[-1])
            if jnp.issubdtype(value.dtype, jnp.floating):
                value = value.astype(jnp.float32)
            rows.append(numerics.compare(key, value, case.outputs[key], dtype=mode))
    return rows
