"""Official state-dict names of the audio tower <-> `ming_jax.models.audio.AudioTower` parameter paths.

Official layout (`BailingMM2NativeForConditionalGeneration`): the whisper encoder under `audio.` (torch Conv1d
weights [out, in, k], Linear weights [out, in], the sinusoid table saved as `audio.positional_embedding`) and the
projector `linear_proj_audio`, an `nn.Sequential` of [Conv1d, Transpose, (GELU, Linear) x (mlp_depth - 1),
Transpose], so its Linear layers sit at indices 3, 5, 7, ...
"""

from __future__ import annotations

import numpy as np

from ming_jax.config.audio import AudioConfig
from ming_jax.weights.table import IDENTITY, LINEAR, Rule, Table, Transform, linear_from, linear_to

# torch Conv1d [out, in, k] <-> our kernel [k, in, out].
CONV1D = Transform("conv1d_oik_to_kio", lambda a: np.transpose(a, (2, 1, 0)), lambda a: np.transpose(a, (2, 1, 0)))


def _split_heads(n: int, h: int) -> Transform:
    """A bias [n * h] <-> [n, h]."""
    return Transform("bias_split_heads", lambda a: a.reshape(n, h), lambda a: a.reshape(n * h))


def audio_table(cfg: AudioConfig, prefix: str = "", ours: str = "") -> Table:
    """Rules for the encoder (`{prefix}audio.*`) and projector (`{prefix}linear_proj_audio.*`).

    `prefix` is prepended to the official names, `ours` to our paths (for an AudioTower nested in a bigger model).
    Block tensors land in the `layers`-stacked parameters of `encoder.blocks`.
    """
    enc = cfg.encoder
    n, h = enc.n_head, enc.head_dim
    a, o = f"{prefix}audio.", f"{ours}encoder."
    blocks = {"i": range(enc.n_layer)}

    def block(official: str, path: str, transform: Transform = IDENTITY) -> Rule:
        return Rule(f"{a}blocks.{{i}}.{official}", f"{o}blocks.{path}", transform, blocks, ("i",))

    rules = [
        Rule(f"{a}conv1.weight", f"{o}conv1_kernel", CONV1D),
        Rule(f"{a}conv1.bias", f"{o}conv1_bias"),
        Rule(f"{a}conv2.weight", f"{o}conv2_kernel", CONV1D),
        Rule(f"{a}conv2.bias", f"{o}conv2_bias"),
        Rule(f"{a}positional_embedding", f"{o}positional_embedding"),
        block("attn.query.weight", "attn.q_kernel", linear_to((n, h))),
        block("attn.query.bias", "attn.q_bias", _split_heads(n, h)),
        block("attn.key.weight", "attn.k_kernel", linear_to((n, h))),
        block("attn.value.weight", "attn.v_kernel", linear_to((n, h))),
        block("attn.value.bias", "attn.v_bias", _split_heads(n, h)),
        block("attn.out.weight", "attn.o_kernel", linear_from((n, h))),
        block("attn.out.bias", "attn.o_bias"),
        block("attn_ln.weight", "attn_ln.scale"),
        block("attn_ln.bias", "attn_ln.bias"),
        block("mlp.0.weight", "mlp.w_in", LINEAR),
        block("mlp.0.bias", "mlp.b_in"),
        block("mlp.2.weight", "mlp.w_out", LINEAR),
        block("mlp.2.bias", "mlp.b_out"),
        block("mlp_ln.weight", "mlp_ln.scale"),
        block("mlp_ln.bias", "mlp_ln.bias"),
        Rule(f"{a}ln_post.weight", f"{o}ln_post.scale"),
        Rule(f"{a}ln_post.bias", f"{o}ln_post.bias"),
        Rule(f"{prefix}linear_proj_audio.0.weight", f"{ours}projector.conv_kernel", CONV1D),
        Rule(f"{prefix}linear_proj_audio.0.bias", f"{ours}projector.conv_bias"),
    ]
    for m in range(cfg.mlp_depth - 1):
        idx = 3 + 2 * m  # Sequential index of the m-th Linear
        rules += [
            Rule(f"{prefix}linear_proj_audio.{idx}.weight", f"{ours}projector.linears.{m}.kernel", LINEAR),
            Rule(f"{prefix}linear_proj_audio.{idx}.bias", f"{ours}projector.linears.{m}.bias"),
        ]
    return Table(rules)
