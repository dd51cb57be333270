"""Official names of the glyph branch <-> `ming_jax.models.image_gen.glyph` paths: the ByT5 encoder and the mapper.

Encoder (`t5_encoder_table`), T5Stack names as the release's byt5_model.pt holds them (base.pt: the same names after
`ming_jax.config.glyph.BASE_PREFIX`; transformers' T5EncoderModel: after "encoder.", with `shared.weight` a tied
copy of `encoder.embed_tokens.weight`):

    embed_tokens.weight                                          embed                     [V, D]
    block.0.layer.0.SelfAttention.relative_attention_bias.weight blocks.rel_bias           [buckets, H]
    block.{i}.layer.0.SelfAttention.{q,k,v}.weight               blocks.layers.attn.{q,k,v}  [i, D, H, K]
    block.{i}.layer.0.SelfAttention.o.weight                     blocks.layers.attn.out    [i, H, K, D]
    block.{i}.layer.0.layer_norm.weight                          blocks.layers.attn_norm.scale
    block.{i}.layer.1.DenseReluDense.wi_0 / wi_1 / wo .weight    blocks.layers.ffn.gate / up / down  (gated-gelu)
    block.{i}.layer.1.DenseReluDense.wi / wo .weight             blocks.layers.ffn.up / down         (relu)
    block.{i}.layer.1.layer_norm.weight                          blocks.layers.ffn_norm.scale
    final_layer_norm.weight                                      final_norm.scale

Mapper (`glyph_mapper_table`), the release's byt5_mapper.pt: the same layer names under `blocks.{i}.` (its own
relative table in `blocks.0`), then `layer_norm.weight` -> norm.scale, `channel_mapper.{weight,bias}` ->
proj.{kernel,bias}, `final_layer_norm.weight` -> final_norm.scale.
"""

from __future__ import annotations

from ming_jax.config.glyph import GlyphConfig, T5EncoderConfig
from ming_jax.weights.table import LINEAR, Rule, Table, linear_from, linear_to


def _stack_rules(cfg: T5EncoderConfig, num_layers: int, official: str, ours: str) -> list[Rule]:
    """One T5 layer stack: `official` is the block prefix ("block." / "blocks."), `ours` the T5Blocks path + "."."""
    h, hd = cfg.num_heads, cfg.d_kv
    layers = {"i": range(num_layers)}

    def layer(name: str, path: str, *transform) -> Rule:
        return Rule(f"{official}{{i}}.{name}", f"{ours}layers.{path}", *transform, ranges=layers, index=("i",))

    attn = "layer.0.SelfAttention."
    ffn = "layer.1.DenseReluDense."
    rules = [
        Rule(f"{official}0.{attn}relative_attention_bias.weight", f"{ours}rel_bias"),
        layer(f"{attn}q.weight", "attn.q", linear_to((h, hd))),
        layer(f"{attn}k.weight", "attn.k", linear_to((h, hd))),
        layer(f"{attn}v.weight", "attn.v", linear_to((h, hd))),
        layer(f"{attn}o.weight", "attn.out", linear_from((h, hd))),
        layer("layer.0.layer_norm.weight", "attn_norm.scale"),
        layer("layer.1.layer_norm.weight", "ffn_norm.scale"),
    ]
    if cfg.gated:
        rules += [layer(f"{ffn}wi_0.weight", "ffn.gate", LINEAR), layer(f"{ffn}wi_1.weight", "ffn.up", LINEAR)]
    else:
        rules.append(layer(f"{ffn}wi.weight", "ffn.up", LINEAR))
    rules.append(layer(f"{ffn}wo.weight", "ffn.down", LINEAR))
    return rules


def t5_encoder_table(cfg: T5EncoderConfig, prefix: str = "", ours: str = "", shared: str | None = None) -> Table:
    """The encoder's names after `prefix` ("": byt5_model.pt; "encoder.": transformers' T5EncoderModel).

    `shared` names the official tensor that is a tied copy of the embeddings ("shared.weight" in a T5EncoderModel
    state dict): optional in the source, checked equal when present, left out of exports."""
    rules = [Rule(f"{prefix}embed_tokens.weight", f"{ours}embed")]
    rules += _stack_rules(cfg, cfg.num_layers, f"{prefix}block.", f"{ours}blocks.")
    rules.append(Rule(f"{prefix}final_layer_norm.weight", f"{ours}final_norm.scale"))
    tied = {shared: f"{prefix}embed_tokens.weight"} if shared else None
    return Table(rules, tied=tied)


def glyph_mapper_table(cfg: T5EncoderConfig, glyph: GlyphConfig, prefix: str = "", ours: str = "") -> Table:
    """The mapper's names (byt5_mapper.pt) after `prefix`, for byt5.json's num_layers / sdxl_channels."""
    rules = _stack_rules(cfg, glyph.mapper_layers, f"{prefix}blocks.", f"{ours}blocks.") if glyph.mapper_layers \
        else []
    rules.append(Rule(f"{prefix}layer_norm.weight", f"{ours}norm.scale"))
    if glyph.mapper_channels is not None:
        rules += [Rule(f"{prefix}channel_mapper.weight", f"{ours}proj.kernel", LINEAR),
                  Rule(f"{prefix}channel_mapper.bias", f"{ours}proj.bias"),
                  Rule(f"{prefix}final_layer_norm.weight", f"{ours}final_norm.scale")]
    return Table(rules)
