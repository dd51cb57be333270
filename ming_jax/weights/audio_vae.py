"""Official state-dict names of the talker's AudioVAE (`talker/vae/`) <-> `ming_jax.models.talker.audio_vae` paths.

Official layout (`AudioVAE.state_dict()`), torch Linear weights [out, in]:
  encoder.fc1.weight (no bias), encoder.fc2.{weight,bias}, encoder.fc3.{weight,bias}, encoder.norm.{weight,bias}
  (a LayerNorm the official forward never calls: loaded and exported all the same), encoder.cls_embed [1, 1, H],
  encoder.encoder.* and encoder.aggregator.* (transformers `Qwen2Model`s: `embed_tokens`, `layers.{i}.*`, `norm`,
  with no `model.` level and no lm_head), decoder.fc1.{weight,bias}, decoder.decoder.* (a Qwen2Model),
  decoder.head.out.{weight,bias} and decoder.head.istft.window (the periodic Hann buffer, kept as a parameter and
  used as stored, as the official iSTFT does).

The backbones reuse `ming_jax.weights.qwen2.qwen2_table` (its rules and transforms) with the official names moved:
that table writes `{prefix}model.layers...` for a Qwen2ForCausalLM, so `backbone_table` drops the `model.` level
and the tied lm_head alias. (A `model_prefix` argument on `qwen2_table` would say the same in one place.)
"""

from __future__ import annotations

import dataclasses

from ming_jax.config.audio_vae import AudioVAEConfig
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.weights.qwen2 import qwen2_table
from ming_jax.weights.table import LINEAR, Rule, Table, Transform


def _squeeze_token(width: int) -> Transform:
    """The learned cls token [1, 1, H] <-> [H]."""
    return Transform("squeeze_token", lambda a: a.reshape(width), lambda a: a.reshape(1, 1, width))


def backbone_table(cfg: Qwen2Config, prefix: str, ours: str) -> Table:
    """A bare transformers `Qwen2Model` under `prefix` (`{prefix}layers.{i}...`, `{prefix}embed_tokens.weight`,
    `{prefix}norm.weight`) <-> a `ming_jax.models.qwen2.Qwen2Model` under `ours`."""
    # qwen2_table insists on tied embeddings because it models a CausalLM's head; a bare Qwen2Model has no head, so
    # the flag is irrelevant here and its tied alias is dropped.
    lm = qwen2_table(cfg.replace(tie_word_embeddings=True), prefix="", ours=ours)
    rules = []
    for r in lm.rules:
        if not r.official.startswith("model."):
            raise AssertionError(f"qwen2_table rule {r.official!r} is not under model.: the rename below is stale")
        rules.append(dataclasses.replace(r, official=prefix + r.official[len("model."):]))
    return Table(rules)


def audio_vae_table(cfg: AudioVAEConfig, prefix: str = "", ours: str = "") -> Table:
    """Every tensor of the official AudioVAE state dict, each exactly once (`prefix`: official, `ours`: our paths)."""
    p, o = prefix, ours
    enc, dec = cfg.encoder, cfg.decoder

    def linear(name: str, path: str, bias: bool = True) -> list[Rule]:
        rules = [Rule(f"{p}{name}.weight", f"{o}{path}.kernel", LINEAR)]
        return rules + [Rule(f"{p}{name}.bias", f"{o}{path}.bias")] if bias else rules

    rules = [
        Rule(f"{p}encoder.fc1.weight", f"{o}encoder.fc1_kernel", LINEAR),
        *linear("encoder.fc2", "encoder.fc2"),
        *linear("encoder.fc3", "encoder.fc3"),
        Rule(f"{p}encoder.norm.weight", f"{o}encoder.norm.scale"),
        Rule(f"{p}encoder.norm.bias", f"{o}encoder.norm.bias"),
        *linear("decoder.fc1", "decoder.fc1"),
        *linear("decoder.head.out", "decoder.head.out"),
        Rule(f"{p}decoder.head.istft.window", f"{o}decoder.head.window"),
    ]
    table = (Table(rules) + backbone_table(enc.backbone, f"{p}encoder.encoder.", f"{o}encoder.backbone.")
             + backbone_table(dec.backbone, f"{p}decoder.decoder.", f"{o}decoder.backbone."))
    if cfg.has_patch:
        table = table + Table([Rule(f"{p}encoder.cls_embed", f"{o}encoder.cls_embed",
                                    _squeeze_token(enc.hidden_size))])
        table = table + backbone_table(enc.aggregator, f"{p}encoder.aggregator.", f"{o}encoder.aggregator.")
    return table
