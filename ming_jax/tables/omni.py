"""Official state-dict names of the whole omni model (`BailingMM2NativeForConditionalGeneration`) <-> the parameter
paths of `ming_jax.omni.OmniModel`: the component tables, each under its checkpoint prefix and our submodule.

| official prefix        | component table                  | our submodule          |
|------------------------|----------------------------------|------------------------|
| `model.`               | `llm_table` (BailingMoeV2)        | `llm.`                 |
| `vision.`              | `vision_table` (ViT + deepstack)  | `vision.`              |
| `linear_proj.`         | `projector_table`                 | `vision_proj.`         |
| `audio.`, `linear_proj_audio.` | `audio_table`            | `audio.encoder.`, `audio.projector.` |

The vision tower's deepstack mergers are in the release's state dict (the official omni model builds the tower
without deepstack, so they are never run there); the table maps them like every other tensor, so loading stays
strict over the whole state dict.
"""

from __future__ import annotations

import dataclasses

from ming_jax.config.omni import OmniConfig
from ming_jax.tables.audio import audio_table
from ming_jax.tables.llm import llm_table
from ming_jax.tables.vision import OMNI_PROJECTOR_PREFIX, OMNI_VISION_PREFIX, projector_table, vision_table
from ming_jax.weights import Table

LLM_PREFIX = "model."  # BailingMoeV2ForCausalLM's own names (`model.`, `lm_head.`) follow it
OURS = {"llm": "llm.", "vision": "vision.", "vision_proj": "vision_proj.", "audio": "audio."}


def nested(table: Table, ours: str) -> Table:
    """The same rules with our paths under the submodule `ours` (e.g. "llm.")."""
    return Table(dataclasses.replace(r, ours=ours + r.ours) for r in table.rules)


def omni_table(cfg: OmniConfig) -> Table:
    table = nested(llm_table(cfg.llm, LLM_PREFIX), OURS["llm"])
    if cfg.vision is not None:
        table = table + vision_table(cfg.vision, OMNI_VISION_PREFIX, OURS["vision"])
        table = table + projector_table(cfg.mlp_depth, OMNI_PROJECTOR_PREFIX, OURS["vision_proj"])
    if cfg.audio is not None:
        table = table + audio_table(cfg.audio, "", OURS["audio"])
    return table
