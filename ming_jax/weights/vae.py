"""Official state-dict names of the image VAE (diffusers `AutoencoderKL`, the release's `vae/` folder) <->
`ming_jax.models.image_gen.vae.AutoencoderKL` parameter paths.

Official layout: torch Conv2d weights [out, in, kh, kw] (ours [kh, kw, in, out], the HWIO layout of a channels-last
conv), GroupNorm `weight` / `bias` (ours `scale` / `bias`), and the mid-block attention as four nn.Linear
(`to_q`, `to_k`, `to_v`, `to_out.0`, [out, in]; ours [in, out]). Our paths keep the official module names, except
that the single sampler of a block (`downsamplers.0.conv` / `upsamplers.0.conv`) is `downsample` / `upsample` and the
single mid-block attention (`attentions.0`) is `attention`. Nothing is stacked: each level has its own widths.

Which tensors exist depends on the config (1x1 `conv_shortcut` where a resnet changes width, samplers on every level
but the last, mid-block attention, quant convs), and the table derives all of it from `VAEConfig`, so a checkpoint
of another layout fails as missing / unexpected tensors rather than loading partially.
"""

from __future__ import annotations

import numpy as np

from ming_jax.config.vae import VAEConfig
from ming_jax.weights.table import LINEAR, Rule, Table, Transform

# torch Conv2d [out, in, kh, kw] <-> our kernel [kh, kw, in, out].
CONV2D = Transform("conv2d_oihw_to_hwio", lambda a: np.transpose(a, (2, 3, 1, 0)),
                   lambda a: np.transpose(a, (3, 2, 0, 1)))


def _conv(official: str, ours: str) -> list[Rule]:
    return [Rule(f"{official}.weight", f"{ours}.kernel", CONV2D), Rule(f"{official}.bias", f"{ours}.bias")]


def _norm(official: str, ours: str) -> list[Rule]:
    return [Rule(f"{official}.weight", f"{ours}.scale"), Rule(f"{official}.bias", f"{ours}.bias")]


def _linear(official: str, ours: str) -> list[Rule]:
    return [Rule(f"{official}.weight", f"{ours}.kernel", LINEAR), Rule(f"{official}.bias", f"{ours}.bias")]


def _resnet(official: str, ours: str, shortcut: bool) -> list[Rule]:
    rules = _norm(f"{official}.norm1", f"{ours}.norm1") + _conv(f"{official}.conv1", f"{ours}.conv1")
    rules += _norm(f"{official}.norm2", f"{ours}.norm2") + _conv(f"{official}.conv2", f"{ours}.conv2")
    if shortcut:
        rules += _conv(f"{official}.conv_shortcut", f"{ours}.conv_shortcut")
    return rules


def _mid_block(cfg: VAEConfig, official: str, ours: str) -> list[Rule]:
    rules = _resnet(f"{official}.resnets.0", f"{ours}.resnets.0", False)
    if cfg.mid_block_add_attention:
        a, o = f"{official}.attentions.0", f"{ours}.attention"
        rules += _norm(f"{a}.group_norm", f"{o}.group_norm")
        for name, path in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
            rules += _linear(f"{a}.{name}", f"{o}.{path}")
    return rules + _resnet(f"{official}.resnets.1", f"{ours}.resnets.1", False)


def _levels(blocks, n_resnets: int, official: str, ours: str, sampler: str) -> list[Rule]:
    """The resnets and sampler ("downsample" / "upsample") of every level; `blocks` the (input, output) widths of
    each level, the last without a sampler."""
    rules = []
    for i, (c_in, c_out) in enumerate(blocks):
        for j in range(n_resnets):
            rules += _resnet(f"{official}.{i}.resnets.{j}", f"{ours}.{i}.resnets.{j}", j == 0 and c_in != c_out)
        if i < len(blocks) - 1:
            rules += _conv(f"{official}.{i}.{sampler}rs.0.conv", f"{ours}.{i}.{sampler}")
    return rules


def vae_table(cfg: VAEConfig, prefix: str = "", ours: str = "") -> Table:
    """Every tensor of the AutoencoderKL: encoder, decoder and the optional quant / post-quant convs.

    `prefix` is prepended to the official names (e.g. "vae." inside a pipeline's state dict), `ours` to our paths.
    """
    e, oe = f"{prefix}encoder", f"{ours}encoder"
    rules = _conv(f"{e}.conv_in", f"{oe}.conv_in")
    rules += _levels(cfg.down_block_channels(), cfg.layers_per_block, f"{e}.down_blocks", f"{oe}.down_blocks",
                     "downsample")
    rules += _mid_block(cfg, f"{e}.mid_block", f"{oe}.mid_block")
    rules += _norm(f"{e}.conv_norm_out", f"{oe}.conv_norm_out") + _conv(f"{e}.conv_out", f"{oe}.conv_out")

    d, od = f"{prefix}decoder", f"{ours}decoder"
    rules += _conv(f"{d}.conv_in", f"{od}.conv_in")
    rules += _mid_block(cfg, f"{d}.mid_block", f"{od}.mid_block")
    rules += _levels(cfg.up_block_channels(), cfg.layers_per_block + 1, f"{d}.up_blocks", f"{od}.up_blocks",
                     "upsample")
    rules += _norm(f"{d}.conv_norm_out", f"{od}.conv_norm_out") + _conv(f"{d}.conv_out", f"{od}.conv_out")

    if cfg.use_quant_conv:
        rules += _conv(f"{prefix}quant_conv", f"{ours}quant_conv")
    if cfg.use_post_quant_conv:
        rules += _conv(f"{prefix}post_quant_conv", f"{ours}post_quant_conv")
    return Table(rules)
