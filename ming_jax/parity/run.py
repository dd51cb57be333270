"""Run one golden case through ming_jax and compare with the official PyTorch outputs.

The case kind is the folder name. Each kind's runner lives in `ming_jax/parity/cases/<kind>.py` and returns a list
of `numerics.Comparison`; this module only dispatches. The CLI (`python -m ming_jax.parity CASE_DIR`) is
`ming_jax.cli.parity`.
"""

from __future__ import annotations

import importlib

from ming_jax.parity import golden, numerics

KINDS = ("llm_backbone", "vision_encoder", "audio_encoder", "preprocessing", "full_mm_forward", "image_condition",
         "image_dit", "image_vae", "image_sampler", "audio_vae", "talker_step", "talker_generate")


class UnsupportedKind(Exception):
    pass


def runner_for(kind: str):
    if kind not in KINDS:
        raise UnsupportedKind(f"unknown golden case kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        module = importlib.import_module(f"ming_jax.parity.cases.{kind}")
    except ModuleNotFoundError as e:
        if e.name == f"ming_jax.parity.cases.{kind}":
            raise UnsupportedKind(f"golden case kind {kind!r} is not supported yet") from None
        raise
    return module.run


def run_case(path: str, dtype: str = "float32") -> list[numerics.Comparison]:
    """dtype "float32": the parity bar (relative max-abs 1e-4, integers exact). "bfloat16": the model runs with
    bfloat16 parameters and compute and is judged against the float32 reference by `numerics.BF16_MODEL`."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"parity dtype {dtype!r} (float32 or bfloat16)")
    kind = golden.case_kind(path)
    run = runner_for(kind)
    case = golden.load_case(path)
    rows = run(case, numerics.MODEL_BF16 if dtype == "bfloat16" else "float32")
    # Every tensor the case holds must be compared: an output the runner skipped is a failure, not a pass.
    compared = {r.name for r in rows}
    for name in sorted(set(case.outputs) - compared):
        rows.append(numerics.Comparison(name, float("nan"), float("nan"), float("nan"), 0.0, False, False,
                                        "not compared"))
    return rows
