"""`llm_backbone` golden case: the official BailingMoeV2ForCausalLM on a mixed text / image / audio / video prompt
(with every router's decisions) and on a text prompt, plus greedy KV-cache decoding from both."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from ming_jax.gen import text as generation
from ming_jax.parity import golden, numerics
from ming_jax.models import llm as model_lib, inputs as multimodal
from ming_jax.checkpoint import restore
from ming_jax.config.modality import AUDIO, GATE_NAMES, VISION
from ming_jax.config.runtime import Runtime

# bfloat16 runs: a reference step whose top-2 logits are closer than this fraction of the largest logit is a near-tie
# that a lower-precision run may break the other way; the greedy continuation is compared only before it.
TIE_MARGIN = 0.02


def load_model(case: golden.GoldenCase, runtime: Runtime | None = None) -> model_lib.BailingMoeV2:
    return restore.load_tensors(case.config, case.weights, components=("llm",), source=case.path,
                                runtime=runtime).llm


def sorted_topk(experts, weights_):
    """Top-k pairs in expert-id order, ids and weights moved together. The release's top-k uses sorted=False, whose
    order is an implementation detail (on CPU it happens to be id order); the selection is a set, so both sides are
    put in id order before comparing."""
    experts, weights_ = np.asarray(experts), np.asarray(weights_)
    order = np.argsort(experts, axis=-1, kind="stable")
    return np.take_along_axis(experts, order, -1), np.take_along_axis(weights_, order, -1)


def topk_rows(name: str, experts, weights_, want: dict, mode: str = "float32") -> list[numerics.Comparison]:
    """`{name}_topk_idx` / `{name}_topk_weight` against the reference, both sides sorted by expert id (pairs kept)."""
    ki, kw = f"{name}_topk_idx", f"{name}_topk_weight"
    if ki not in want and kw not in want:
        return []
    if ki not in want or kw not in want:  # one without the other cannot be put in id order: compare it as stored
        k, v = (ki, experts) if ki in want else (kw, weights_)
        return [numerics.compare(k, v, want[k], dtype=mode)]
    idx, w = sorted_topk(experts, weights_)
    ref_idx, ref_w = sorted_topk(want[ki], want[kw])
    return [numerics.compare(ki, idx, ref_idx, dtype=mode), numerics.compare(kw, w, ref_w, dtype=mode)]


def forward_rows(model, prep, prefix: str, want: dict, mode: str = "float32") -> list[numerics.Comparison]:
    cfg = model.cfg
    emb, out = generation.as_numpy(generation.forward(model, prep, collect=True))
    b, s = prep.input_ids.shape
    ours = {f"{prefix}logits": out.logits, f"{prefix}embeddings": emb, f"{prefix}final_norm_output": out.hidden,
            f"{prefix}position_ids": prep.positions}
    for i in range(cfg.num_layers):
        ours[f"{prefix}layer_{i}_output"] = out.layer_outputs[i]
    topk = []
    for j in range(cfg.num_moe_layers):
        li = j + cfg.num_dense_layers
        r = out.routing
        ours[f"{prefix}layer_{li}_router_logits"] = r.logits[j].reshape(b, s, -1)
        topk += topk_rows(f"{prefix}layer_{li}", r.experts[j].reshape(b, s, -1), r.weights[j].reshape(b, s, -1), want,
                          mode)
        g = out.gate_routing
        for gi in range(g.experts.shape[1]):
            name = f"{prefix}layer_{li}_{GATE_NAMES[gi]}"
            ours[f"{name}_logits"] = g.logits[j, gi]
            topk += topk_rows(name, g.experts[j, gi], g.weights[j, gi], want, mode)
    if prep.modality is not None:
        ours[f"{prefix}router_mask_vision"] = (prep.modality == VISION).astype(np.int64)
        ours[f"{prefix}router_mask_audio"] = (prep.modality == AUDIO).astype(np.int64)
    if not prefix:
        ours["rope_deltas"] = prep.rope_deltas[:, None]
    return sorted([numerics.compare(k, np.asarray(ours[k], np.float32) if _is_float(ours[k]) else ours[k], want[k],
                                    dtype=mode) for k in ours if k in want] + topk, key=lambda r: r.name)


def _is_float(a) -> bool:
    return np.asarray(a).dtype.kind == "f" or str(np.asarray(a).dtype) == "bfloat16"


@contextlib.contextmanager
def fed_decode_positions(model: model_lib.BailingMoeV2):
    """Record the positions the rotary embedding receives on every one-token (decode) step, as fed: a list that
    fills with one int [3, B, 1] array per step while the block runs (and the jitted decode loop calls back).

    The model's class is swapped for a subclass whose `rotary` reports its argument and then does the same work, so
    nothing is inferred from the generation loop's own bookkeeping: a decode that fed wrong h / w rows would show."""
    fed: list[np.ndarray] = []
    base = type(model)

    class _Recording(base):
        def rotary(self, positions):
            if positions.shape[-1] == 1:  # static: decode steps only (the prefill feeds the whole prompt)
                jax.debug.callback(lambda p: fed.append(np.array(p)), positions, ordered=True)
            return super().rotary(positions)

    model.__class__ = _Recording
    try:
        yield fed
        jax.effects_barrier()
    finally:
        model.__class__ = base


def decode_rows(model, prep, prefix: str, want: dict, mode: str = "float32") -> list[numerics.Comparison]:
    n = want[f"{prefix}decode_tokens"].shape[1]
    sampling = generation.SamplingConfig(max_new_tokens=n)  # greedy, no stop tokens: the release ran n steps
    with fed_decode_positions(model) as fed:
        gen = generation.as_numpy(generation.generate(model, prep, sampling, return_logits=True))
    tokens, ref_tokens = gen.tokens, want[f"{prefix}decode_tokens"]
    step_logits, ref_logits = gen.step_logits, want[f"{prefix}decode_step_logits"]
    if mode == numerics.MODEL_BF16:  # greedy continuations compared up to each row's first near-tie of the reference
        keep = numerics.tie_free_prefix(ref_logits, TIE_MARGIN * float(np.abs(ref_logits).max()))
        tokens = np.concatenate([t[:k] for t, k in zip(tokens, keep)])
        ref_tokens = np.concatenate([t[:k] for t, k in zip(ref_tokens, keep)])
        step_logits = np.concatenate([t[:k] for t, k in zip(step_logits, keep)])
        ref_logits = np.concatenate([t[:k] for t, k in zip(ref_logits, keep)])
        tokens_mode = "float32"  # before a near-tie every token must agree
        if not keep.sum():  # nothing would be compared: a failure, never an empty pass
            return [numerics.Comparison(f"{prefix}{k}", np.nan, np.nan, np.nan, 0.0, False, False,
                                        "no step before the reference's first near-tie")
                    for k in ("decode_tokens", "decode_step_logits")]
    else:
        tokens_mode = mode
    rows = [numerics.compare(f"{prefix}decode_tokens", tokens, ref_tokens, dtype=tokens_mode),
            numerics.compare(f"{prefix}decode_step_logits", step_logits, ref_logits, dtype=mode)]
    key = f"{prefix}decode_position_ids"
    if key in want:  # positions of decode steps 2..n: the three rope rows the rotary embedding got, step by step
        b = prep.input_ids.shape[0]
        ours = np.concatenate(fed, axis=-1) if fed else np.zeros((3, b, 0), np.int64)
        rows.append(numerics.compare(key, ours, want[key], dtype=mode))
    return rows


def multimodal_inputs(inputs: dict) -> multimodal.MultimodalInputs:
    """The case's media features, from its input tensors by their official names (absent ones stay None)."""
    x = inputs
    return multimodal.MultimodalInputs(
        image_embeds=x.get("query_embeds_image"), video_embeds=x.get("query_embeds_video"),
        audio_embeds=x.get("query_embeds_audio"), audio_lengths=x.get("query_embeds_audio_lengths"),
        audio_spans=x.get("placeholder_audio_loc_lens"), image_grid_thw=x.get("image_grid_thw"),
        video_grid_thw=x.get("image_grid_thw_video"))


def run(case: golden.GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    model = load_model(case, numerics.runtime_for(mode))
    cfg, x, want = model.cfg, case.inputs, case.outputs
    mm_prep = multimodal.prepare(cfg, x["input_ids"], mm=multimodal_inputs(x))
    text_prep = multimodal.prepare(cfg, x["text_input_ids"])
    rows = forward_rows(model, mm_prep, "", want, mode)
    rows += forward_rows(model, text_prep, "text_", want, mode)
    rows += decode_rows(model, mm_prep, "mm_", want, mode)
    rows += decode_rows(model, text_prep, "text_", want, mode)
    return rows
