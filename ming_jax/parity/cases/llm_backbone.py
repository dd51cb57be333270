"""`llm_backbone` golden case: the official BailingMoeV2ForCausalLM on a mixed text / image / audio / video prompt
(with every router's decisions) and on a text prompt, plus greedy KV-cache decoding from both."""

from __future__ import annotations

import numpy as np

from ming_jax.gen import text as generation
from ming_jax.parity import golden, numerics
from ming_jax.models import llm as model_lib, inputs as multimodal
from ming_jax.checkpoint import restore
from ming_jax.config.modality import AUDIO, GATE_NAMES, VISION


def load_model(case: golden.GoldenCase) -> model_lib.BailingMoeV2:
    return restore.load_tensors(case.config, case.weights, components=("llm",), source=case.path).llm


def sorted_topk(experts, weights_):
    """The release's top-k uses sorted=False, which (on CPU) returns experts in id order: sort ours to compare."""
    order = np.argsort(experts, axis=-1, kind="stable")
    return np.take_along_axis(experts, order, -1), np.take_along_axis(weights_, order, -1)


def forward_rows(model, prep, prefix: str, want: dict) -> list[numerics.Comparison]:
    cfg = model.cfg
    emb, out = generation.as_numpy(generation.forward(model, prep, collect=True))
    b, s = prep.input_ids.shape
    ours = {f"{prefix}logits": out.logits, f"{prefix}embeddings": emb, f"{prefix}final_norm_output": out.hidden,
            f"{prefix}position_ids": prep.positions}
    for i in range(cfg.num_layers):
        ours[f"{prefix}layer_{i}_output"] = out.layer_outputs[i]
    for j in range(cfg.num_moe_layers):
        li = j + cfg.num_dense_layers
        r = out.routing
        idx, w = sorted_topk(r.experts[j], r.weights[j])
        ours[f"{prefix}layer_{li}_router_logits"] = r.logits[j].reshape(b, s, -1)
        ours[f"{prefix}layer_{li}_topk_idx"] = idx.reshape(b, s, -1)
        ours[f"{prefix}layer_{li}_topk_weight"] = w.reshape(b, s, -1)
        g = out.gate_routing
        for gi in range(g.experts.shape[1]):
            idx, w = sorted_topk(g.experts[j, gi], g.weights[j, gi])
            name = f"{prefix}layer_{li}_{GATE_NAMES[gi]}"
            ours[f"{name}_logits"], ours[f"{name}_topk_idx"], ours[f"{name}_topk_weight"] = g.logits[j, gi], idx, w
    if prep.modality is not None:
        ours[f"{prefix}router_mask_vision"] = (prep.modality == VISION).astype(np.int64)
        ours[f"{prefix}router_mask_audio"] = (prep.modality == AUDIO).astype(np.int64)
    if not prefix:
        ours["rope_deltas"] = prep.rope_deltas[:, None]
    return [numerics.compare(k, ours[k], want[k]) for k in sorted(ours) if k in want]


def decode_rows(model, prep, prefix: str, want: dict) -> list[numerics.Comparison]:
    n = want[f"{prefix}decode_tokens"].shape[1]
    sampling = generation.SamplingConfig(max_new_tokens=n)  # greedy, no stop tokens: the release ran n steps
    gen = generation.as_numpy(generation.generate(model, prep, sampling, return_logits=True))
    rows = [numerics.compare(f"{prefix}decode_tokens", gen.tokens, want[f"{prefix}decode_tokens"]),
            numerics.compare(f"{prefix}decode_step_logits", gen.step_logits, want[f"{prefix}decode_step_logits"])]
    key = f"{prefix}decode_position_ids"
    if key in want:  # positions of decode steps 2..n, on all three rope rows
        rows.append(numerics.compare(key, np.broadcast_to(gen.positions[None, :, 1:], want[key].shape), want[key]))
    return rows


def multimodal_inputs(inputs: dict) -> multimodal.MultimodalInputs:
    """The case's media features, from its input tensors by their official names (absent ones stay None)."""
    x = inputs
    return multimodal.MultimodalInputs(
        image_embeds=x.get("query_embeds_image"), video_embeds=x.get("query_embeds_video"),
        audio_embeds=x.get("query_embeds_audio"), audio_lengths=x.get("query_embeds_audio_lengths"),
        audio_spans=x.get("placeholder_audio_loc_lens"), image_grid_thw=x.get("image_grid_thw"),
        video_grid_thw=x.get("image_grid_thw_video"))


def run(case: golden.GoldenCase) -> list[numerics.Comparison]:
    model = load_model(case)
    cfg, x, want = model.cfg, case.inputs, case.outputs
    mm_prep = multimodal.prepare(cfg, x["input_ids"], mm=multimodal_inputs(x))
    text_prep = multimodal.prepare(cfg, x["text_input_ids"])
    rows = forward_rows(model, mm_prep, "", want)
    rows += forward_rows(model, text_prep, "text_", want)
    rows += decode_rows(model, mm_prep, "mm_", want)
    rows += decode_rows(model, text_prep, "text_", want)
    return rows
