"""Official names of the vision tower (`Qwen3MoeVisionTransformer` state dict) and of the omni model's vision
projector (`linear_proj`), mapped onto `ming_jax.models.vision`.

Inside the omni checkpoint the tower lives under `vision.` and the projector under `linear_proj.`; a standalone
tower checkpoint has no prefix. `ours` prefixes our paths the same way when the tower is a submodule.
"""

from __future__ import annotations

from ming_jax.config.vision import VisionConfig
from ming_jax.weights.table import IDENTITY, LINEAR, Rule, Table, Transform, linear_from, linear_to

OMNI_VISION_PREFIX = "vision."
OMNI_PROJECTOR_PREFIX = "linear_proj."


def reshape_to(shape, name: str) -> Transform:
    """A flat official vector <-> our array of `shape` (e.g. the fused qkv bias as [3, heads, head_dim])."""
    shape = tuple(shape)
    return Transform(name, lambda a: a.reshape(shape), lambda a: a.reshape(-1))


def conv_patch(cfg: VisionConfig) -> Transform:
    """Conv3d weight [D, C, Tp, P, P] <-> our patch kernel [C*Tp*P*P, D] (rows in the processor's flattening)."""
    full = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    return Transform("conv3d_as_matmul", lambda a: a.reshape(a.shape[0], -1).T, lambda a: a.T.reshape(full))


def vision_table(cfg: VisionConfig, prefix: str = "", ours: str = "") -> Table:
    """Every tensor of the tower: patch embed, position table, stacked blocks, merger, deepstack mergers."""
    h, hd = cfg.num_heads, cfg.head_dim
    layers = {"i": range(cfg.depth)}

    def block(official: str, path: str, transform: Transform = IDENTITY) -> Rule:
        return Rule(f"{prefix}blocks.{{i}}.{official}", f"{ours}blocks.{path}", transform, layers, ("i",))

    rules = [
        Rule(f"{prefix}patch_embed.proj.weight", f"{ours}patch_embed.kernel", conv_patch(cfg)),
        Rule(f"{prefix}patch_embed.proj.bias", f"{ours}patch_embed.bias"),
        Rule(f"{prefix}pos_embed.weight", f"{ours}pos_embed"),
        block("norm1.weight", "norm1.scale"),
        block("norm1.bias", "norm1.bias"),
        block("attn.qkv.weight", "attn.qkv_kernel", linear_to((3, h, hd), "split_fused_qkv")),
        block("attn.qkv.bias", "attn.qkv_bias", reshape_to((3, h, hd), "split_fused_qkv_bias")),
        block("attn.proj.weight", "attn.out_kernel", linear_from((h, hd), "attn_out_per_head")),
        block("attn.proj.bias", "attn.out_bias"),
        block("norm2.weight", "norm2.scale"),
        block("norm2.bias", "norm2.bias"),
        block("mlp.linear_fc1.weight", "mlp.w_in", LINEAR),
        block("mlp.linear_fc1.bias", "mlp.b_in"),
        block("mlp.linear_fc2.weight", "mlp.w_out", LINEAR),
        block("mlp.linear_fc2.bias", "mlp.b_out"),
    ]
    rules += _merger_rules(f"{prefix}merger.", f"{ours}merger.")
    for j in range(len(cfg.deepstack_visual_indexes)):
        rules += _merger_rules(f"{prefix}deepstack_merger_list.{j}.", f"{ours}deepstack_mergers.{j}.")
    return Table(rules)


def _merger_rules(official: str, path: str) -> list[Rule]:
    return [
        Rule(f"{official}norm.weight", f"{path}norm.scale"),
        Rule(f"{official}norm.bias", f"{path}norm.bias"),
        Rule(f"{official}linear_fc1.weight", f"{path}w_in", LINEAR),
        Rule(f"{official}linear_fc1.bias", f"{path}b_in"),
        Rule(f"{official}linear_fc2.weight", f"{path}w_out", LINEAR),
        Rule(f"{official}linear_fc2.bias", f"{path}b_out"),
    ]


def projector_table(mlp_depth: int, prefix: str = OMNI_PROJECTOR_PREFIX, ours: str = "") -> Table:
    """The official `nn.Sequential` interleaves GELUs with the Linears, so Linear k is module index 2k."""
    rules = []
    for k in range(mlp_depth):
        rules.append(Rule(f"{prefix}{2 * k}.weight", f"{ours}layers.{k}.kernel", LINEAR))
        rules.append(Rule(f"{prefix}{2 * k}.bias", f"{ours}layers.{k}.bias"))
    return Table(rules)
