"""Golden kind `image_condition`: the thinker with the learned image queries, the Qwen2 connector and the DiT
wrapper's caption scaling (official `get_condition_embeds_for_image_gen` + `ZImageModel_withMLP`).

Case layout: config.json {llm_config, connector_config, mlp_config}; weights `model.*` (the thinker), `connector.*`,
`query_tokens_dict.*`, `proj_in.*`, `proj_out.*`; inputs per sub-case `<name>_input_ids`, `<name>_attention_mask`
and optionally `<name>_image_embeds` / `<name>_image_grid_thw` (an input image's projected ViT rows).
"""

from __future__ import annotations

import re

import numpy as np

from ming_jax.config.image_gen import ImageGenHeadConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.runtime import Runtime
from ming_jax.gen import image as image_gen
from ming_jax.models import llm as llm_lib
from ming_jax.models.image_gen.condition import ImageGenHead
from ming_jax.parity import numerics
from ming_jax.parity.golden import GoldenCase
from ming_jax.weights.image_gen import head_table
from ming_jax.weights.llm import llm_table
from ming_jax.weights.table import load_state_dict
from flax import nnx

THINKER_PREFIX = "model."
CONNECTOR_PREFIX = "connector."


def build(config: dict, tensors, runtime: Runtime) -> tuple[llm_lib.BailingMoeV2, ImageGenHead]:
    llm_cfg = LLMConfig.from_official(config["llm_config"])
    head_cfg = ImageGenHeadConfig.from_official(config["mlp_config"])
    conn_cfg = Qwen2Config.from_official(config["connector_config"], "connector_config")
    thinker = load_state_dict(llm_lib.create_abstract(llm_cfg, runtime), llm_table(llm_cfg, THINKER_PREFIX), tensors,
                              names=[n for n in tensors if n.startswith(THINKER_PREFIX)])
    head = nnx.eval_shape(lambda: ImageGenHead(head_cfg, llm_cfg.hidden_size, conn_cfg, runtime, rngs=nnx.Rngs(0)))
    head = load_state_dict(head, head_table(head_cfg, conn_cfg, connector_prefix=CONNECTOR_PREFIX), tensors,
                           names=[n for n in tensors if not n.startswith(THINKER_PREFIX)])
    return thinker, head


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    thinker, head = build(case.config, case.weights, numerics.runtime_for(mode))
    names = sorted({m.group(1) for k in case.inputs if (m := re.fullmatch(r"(.+)_input_ids", k))})
    if not names:
        raise ValueError(f"{case.path}: no '<name>_input_ids' inputs")
    rows = []
    for name in names:
        x = case.inputs
        inputs = image_gen.prepare_condition(thinker.cfg, head, x[f"{name}_input_ids"], x.get(f"{name}_attention_mask"),
                                             x.get(f"{name}_image_embeds"), x.get(f"{name}_image_grid_thw"),
                                             bucket=1)  # the official shapes, unpadded
        cond, taps = image_gen.condition(thinker, head, inputs, taps=True)
        prep = inputs.prepared
        ours = {
            "input_ids_with_queries": inputs.prompt.input_ids.astype(np.int64),
            "gen_mask": inputs.prompt.gen_mask.astype(np.int64),
            "image_grid_thw_used": inputs.grids,
            "position_ids": prep.positions,
            "rope_deltas": prep.rope_deltas[:, None],
            "condition_embeds": cond,
            "dit_caption_feats": image_gen._wrap(head, cond),
            **taps,
        }
        rows += numerics.compare_outputs(ours, case.outputs, dtype=mode, prefix=f"{name}_",
                                         missing_note="no such output in the condition path")
    return rows
