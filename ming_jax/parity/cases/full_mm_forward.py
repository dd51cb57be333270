"""Golden kind `full_mm_forward`: the official `BailingMM2NativeForConditionalGeneration.forward` on one prompt
with text, images, audio and video (any subset), compared tensor by tensor.

Case layout: config.json (whole omni config), weights (whole omni state dict), inputs named as the official forward's
arguments (`input_ids`, `pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `audio_feats`,
`audio_feats_lengths`, `audio_placeholder_loc_lens`). Outputs: the towers' embeddings, then everything the LLM part
of the forward produces (named as in the `llm_backbone` kind, without prefix), all derived from the case itself.
"""

from __future__ import annotations

import numpy as np

from ming_jax.parity import golden, numerics
from ming_jax.gen import omni
from ming_jax.checkpoint import restore
from ming_jax.parity.cases.llm_backbone import forward_rows


def build(case: golden.GoldenCase, mode: str = "float32") -> omni.OmniModel:
    return restore.load_tensors(case.config, case.weights, source=case.path,
                                runtime=numerics.runtime_for(mode)).omni()


def inputs_of(case: golden.GoldenCase) -> omni.OmniInputs:
    x = case.inputs
    return omni.OmniInputs(
        input_ids=x["input_ids"], attention_mask=x.get("attention_mask"), pixel_values=x.get("pixel_values"),
        image_grid_thw=x.get("image_grid_thw"), pixel_values_videos=x.get("pixel_values_videos"),
        video_grid_thw=x.get("video_grid_thw"), audio_feats=x.get("audio_feats"),
        audio_feats_lengths=x.get("audio_feats_lengths"),
        audio_placeholder_loc_lens=x.get("audio_placeholder_loc_lens"))


def run(case: golden.GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    model = build(case, mode)
    inputs = inputs_of(case)
    want = case.outputs
    # omni.forward = encode_media -> prepare -> backbone; the backbone rows come from the llm_backbone runner, which
    # runs the same backbone forward on the same prepared prompt and names every per-layer / router tensor.
    media = omni.encode_media(model, inputs)
    prep = omni.prepare(model, inputs, media)
    ours = {"image_embeds": media.image_embeds, "video_embeds": media.video_embeds}
    if media.audio is not None:
        ours["audio_embeds"] = media.audio.embeds
        ours["audio_embeds_lengths"] = media.audio.lengths
    rows = [numerics.compare(k, np.asarray(v, np.float32) if np.asarray(v).dtype.kind not in "iub" else v, want[k],
                             dtype=mode) for k, v in ours.items() if v is not None and k in want]
    return rows + forward_rows(model.llm, prep, "", want, mode)
