"""Golden kind `audio_encoder`: the audio tower on wrapped clips (official `extract_audio_feature`).

Case layout: config.json {audio_config, llm_hidden_size, mlp_depth}; weights `audio.*` + `linear_proj_audio.*`;
inputs `audio_feats` [B, T, n_mels], `audio_feats_lengths` [B, N]; outputs as named below.
"""

from __future__ import annotations


from ming_jax.parity import numerics
from ming_jax.checkpoint import restore
from ming_jax.config.runtime import Runtime
from ming_jax.parity.numerics import runtime_for as _runtime
from ming_jax.models.audio import AudioTower, encode_audio
from ming_jax.parity.golden import GoldenCase


def build(config: dict, tensors, runtime: Runtime | None = None) -> AudioTower:
    """An AudioTower for `config` (whole or case config) with the official `tensors` loaded (strict)."""
    return restore.load_tensors(config, tensors, components=("audio",), runtime=runtime).modules["audio"]


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    model = build(case.config, case.weights, _runtime(mode))
    out = encode_audio(model, case.inputs["audio_feats"], case.inputs["audio_feats_lengths"])
    ours = {
        "encoder_padded_output": out.encoder_padded,
        "encoder_output_wrapped": out.encoder_wrapped,
        "projected_wrapped": out.projected,
        "audio_embeds": out.embeds,
        "audio_embeds_lengths": out.lengths,
    }
    return [numerics.compare(name, ours[name], ref, dtype=mode) if name in ours else
            numerics.Comparison(name, float("nan"), float("nan"), float("nan"), 0.0, False, False,
                                "no such output in the audio tower")
            for name, ref in case.outputs.items()]
