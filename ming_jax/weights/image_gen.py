"""Official names of the image-generation head <-> `ming_jax.models.image_gen.condition.ImageGenHead` paths.

The release keeps the head in two sub-folders: `mlp/model.safetensors` holds `query_tokens_dict.{s}x{s}` (one per
scale), `proj_in.*`, `proj_out.*` and, without the identity MLP, the DiT wrapper's ToClip MLP as `mlp.fc1.*`,
`mlp.layer_norm1.*`, `mlp.fc2.*`, `mlp.layer_norm2.*`; `connector/` is a Qwen2ForCausalLM checkpoint (names without
a prefix). In the official module's own state dict the connector's names carry `connector.`: `connector_prefix`
says which (the golden `image_condition` case uses the module's names).
"""

from __future__ import annotations

from ming_jax.config.image_gen import ImageGenHeadConfig
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.weights.qwen2 import qwen2_table
from ming_jax.weights.table import LINEAR, Rule, Table


def _linear(official: str, ours: str) -> list[Rule]:
    return [Rule(f"{official}.weight", f"{ours}.kernel", LINEAR), Rule(f"{official}.bias", f"{ours}.bias")]


def _layer_norm(official: str, ours: str) -> list[Rule]:
    return [Rule(f"{official}.weight", f"{ours}.scale"), Rule(f"{official}.bias", f"{ours}.bias")]


def head_table(cfg: ImageGenHeadConfig, connector: Qwen2Config, *, prefix: str = "", connector_prefix: str = "",
               ours: str = "") -> Table:
    """`prefix` precedes the mlp/ names, `connector_prefix` the connector's, `ours` our paths."""
    rules = [Rule(f"{prefix}query_tokens_dict.{s}x{s}", f"{ours}queries.{j}") for j, s in enumerate(cfg.img_gen_scales)]
    rules += _linear(f"{prefix}proj_in", f"{ours}proj_in") + _linear(f"{prefix}proj_out", f"{ours}proj_out")
    table = Table(rules) + qwen2_table(connector, connector_prefix, f"{ours}connector.")
    return table if cfg.use_identity_mlp else table + clip_mlp_table(f"{prefix}mlp.", f"{ours}clip_mlp.")


def clip_mlp_table(prefix: str = "mlp.", ours: str = "") -> Table:
    """The DiT wrapper's ToClip MLP (`ming_jax.models.image_gen.condition.ClipMLP`)."""
    m, o = prefix, ours
    return Table(_linear(f"{m}fc1", f"{o}fc1") + _layer_norm(f"{m}layer_norm1", f"{o}ln1") +
                 _linear(f"{m}fc2", f"{o}fc2") + _layer_norm(f"{m}layer_norm2", f"{o}ln2"))
