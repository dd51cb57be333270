"""Official state-dict names of the Z-Image DiT (`ZImageTransformer2DModel`; the release's `transformer/` folder uses
the same names, and so does diffusers' class of that name) <-> `ming_jax.models.image_gen.dit.ZImageDiT` paths.

Official layout: per (patch, frame patch) pair p-f an `all_x_embedder.p-f` Linear and an `all_final_layer.p-f`
(adaLN_modulation = Sequential(SiLU, Linear) so its Linear is `.1`); three block lists `noise_refiner`,
`context_refiner` (no adaLN) and `layers`, each block with diffusers' `Attention` (to_q / to_k / to_v, to_out.0,
norm_q / norm_k when qk_norm), four RMSNorms, a SwiGLU `feed_forward` (w1 gate, w3 up, w2 down) and, when
modulated, `adaLN_modulation.0` (a Sequential holding only the Linear); `t_embedder.mlp` = Sequential(Linear, SiLU,
Linear); `cap_embedder` = Sequential(RMSNorm, Linear); the pad tokens are [1, dim] parameters.
"""

from __future__ import annotations

from ming_jax.config.dit import DiTConfig
from ming_jax.weights.table import IDENTITY, LINEAR, Rule, Table, Transform, linear_from, linear_to


def _row_vector(dim: int) -> Transform:
    """A [1, dim] parameter <-> our [dim]."""
    return Transform("squeeze_row", lambda a: a.reshape(dim), lambda a: a.reshape(1, dim))


def _block_rules(cfg: DiTConfig, official: str, ours: str, count: int, *, modulated: bool) -> list[Rule]:
    """One stacked block list: `{official}{i}.*` -> `{ours}.*[i]`."""
    if count == 0:
        return []
    n, h = cfg.n_heads, cfg.head_dim
    layers = {"i": range(count)}

    def block(name: str, path: str, transform: Transform = IDENTITY) -> Rule:
        return Rule(f"{official}{{i}}.{name}", f"{ours}.{path}", transform, layers, ("i",))

    rules = [
        block("attention.to_q.weight", "attention.q_kernel", linear_to((n, h), "split_heads")),
        block("attention.to_k.weight", "attention.k_kernel", linear_to((n, h), "split_heads")),
        block("attention.to_v.weight", "attention.v_kernel", linear_to((n, h), "split_heads")),
        block("attention.to_out.0.weight", "attention.o_kernel", linear_from((n, h), "attn_out_per_head")),
        block("attention_norm1.weight", "attention_norm1.scale"),
        block("attention_norm2.weight", "attention_norm2.scale"),
        block("ffn_norm1.weight", "ffn_norm1.scale"),
        block("ffn_norm2.weight", "ffn_norm2.scale"),
        block("feed_forward.w1.weight", "feed_forward.gate", LINEAR),
        block("feed_forward.w3.weight", "feed_forward.up", LINEAR),
        block("feed_forward.w2.weight", "feed_forward.down", LINEAR),
    ]
    if cfg.qk_norm:
        rules += [block("attention.norm_q.weight", "attention.q_norm.scale"),
                  block("attention.norm_k.weight", "attention.k_norm.scale")]
    if modulated:
        rules += [block("adaLN_modulation.0.weight", "adaln.kernel", LINEAR),
                  block("adaLN_modulation.0.bias", "adaln.bias")]
    return rules


def dit_table(cfg: DiTConfig, prefix: str = "", ours: str = "") -> Table:
    """Every tensor of the DiT. `prefix` is prepended to the official names (e.g. "transformer." inside the
    sampler's module), `ours` to our paths (a DiT nested in a bigger model)."""
    rules = []
    for k, (p, pf) in enumerate(cfg.patch_pairs):
        key = f"{p}-{pf}"
        rules += [
            Rule(f"{prefix}all_x_embedder.{key}.weight", f"{ours}x_embed.{k}.kernel", LINEAR),
            Rule(f"{prefix}all_x_embedder.{key}.bias", f"{ours}x_embed.{k}.bias"),
            Rule(f"{prefix}all_final_layer.{key}.adaLN_modulation.1.weight", f"{ours}final.{k}.adaln.kernel", LINEAR),
            Rule(f"{prefix}all_final_layer.{key}.adaLN_modulation.1.bias", f"{ours}final.{k}.adaln.bias"),
            Rule(f"{prefix}all_final_layer.{key}.linear.weight", f"{ours}final.{k}.linear.kernel", LINEAR),
            Rule(f"{prefix}all_final_layer.{key}.linear.bias", f"{ours}final.{k}.linear.bias"),
        ]
    rules += [
        Rule(f"{prefix}t_embedder.mlp.0.weight", f"{ours}t_embed.fc1.kernel", LINEAR),
        Rule(f"{prefix}t_embedder.mlp.0.bias", f"{ours}t_embed.fc1.bias"),
        Rule(f"{prefix}t_embedder.mlp.2.weight", f"{ours}t_embed.fc2.kernel", LINEAR),
        Rule(f"{prefix}t_embedder.mlp.2.bias", f"{ours}t_embed.fc2.bias"),
        Rule(f"{prefix}cap_embedder.0.weight", f"{ours}cap_norm.scale"),
        Rule(f"{prefix}cap_embedder.1.weight", f"{ours}cap_proj.kernel", LINEAR),
        Rule(f"{prefix}cap_embedder.1.bias", f"{ours}cap_proj.bias"),
        Rule(f"{prefix}x_pad_token", f"{ours}x_pad_token", _row_vector(cfg.dim)),
        Rule(f"{prefix}cap_pad_token", f"{ours}cap_pad_token", _row_vector(cfg.dim)),
    ]
    rules += _block_rules(cfg, f"{prefix}noise_refiner.", f"{ours}noise_refiner", cfg.n_refiner_layers,
                          modulated=True)
    rules += _block_rules(cfg, f"{prefix}context_refiner.", f"{ours}context_refiner", cfg.n_refiner_layers,
                          modulated=False)
    rules += _block_rules(cfg, f"{prefix}layers.", f"{ours}layers", cfg.n_layers, modulated=True)
    return Table(rules)
