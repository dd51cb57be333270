"""Config of the vision tower: the Qwen3-VL-MoE-style ViT of Ming-flash-omni 2.0 (official `Qwen3VLMoeVisionConfig`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, check_keys, replace

# Official keys that a `vision_config` dump carries but that do not change the tower's computation:
#  - tie_word_embeddings: a PretrainedConfig default written into the dump; the ViT has no word embeddings.
_IGNORED_OFFICIAL = frozenset({"tie_word_embeddings"})

# The release's own type, and the type transformers' Qwen3VLMoeVisionConfig dumps (same keys, same network).
_MODEL_TYPES = frozenset({"qwen3_moe_vit", "qwen3_vl_moe"})

# hidden_act values of the block MLP we implement -> whether GELU uses the tanh approximation.
GELU_ACTS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}

# Defaults of the official config class; a dump always carries every key, so these only fill hand-written dicts.
_OFFICIAL_DEFAULTS = dict(
    depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16, in_channels=3,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, num_position_embeddings=2304,
    deepstack_visual_indexes=(8, 16, 24),
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # width of the merged tokens the tower emits (the projector maps it to the LLM width)
    num_position_embeddings: int  # learned table of a square grid, side sqrt(this), interpolated to each image
    deepstack_visual_indexes: tuple[int, ...] = ()  # blocks whose output also goes through a deepstack merger
    hidden_act: str = "gelu_pytorch_tanh"  # of the block MLP; the mergers always use erf GELU
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    # Constants the release hard-codes (kept as fields so that nothing reads a magic number).
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if isinstance(self.deepstack_visual_indexes, list):
            object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))
        problems = []
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                     "num_position_embeddings", "in_channels", "patch_size", "temporal_patch_size",
                     "spatial_merge_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        elif self.num_heads > 0 and self.head_dim % 4:
            # 2-D rotary: a quarter of each head rotates with the row, a quarter with the column, and each half of
            # rotate_half must hold both.
            problems.append(f"head_dim={self.head_dim} must be a multiple of 4 for the 2-D rotary embedding")
        if self.num_position_embeddings > 0 and math.isqrt(self.num_position_embeddings) ** 2 != \
                self.num_position_embeddings:
            problems.append(f"num_position_embeddings={self.num_position_embeddings} is not a square (the learned "
                            f"position table is a side x side grid)")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            problems.append(f"deepstack_visual_indexes {list(bad)} outside the blocks [0, {self.depth})")
        if len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            problems.append(f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} repeat a block")
        if self.hidden_act not in GELU_ACTS:
            problems.append(f"hidden_act={self.hidden_act!r} (supported: {', '.join(GELU_ACTS)})")
        if problems:
            raise ConfigError("VisionConfig: " + "; ".join(problems))

    # --- derived sizes ---------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one flattened patch row as the image processor emits it: C * Tp * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token (a spatial_merge_size x spatial_merge_size window)."""
        return self.spatial_merge_size**2

    @property
    def merged_size(self) -> int:
        return self.hidden_size * self.merge_unit

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def gelu_approximate(self) -> bool:
        return GELU_ACTS[self.hidden_act]

    def replace(self, **overrides) -> "VisionConfig":
        return replace(self, **overrides)

    # --- official config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any], **overrides) -> "VisionConfig":
        """Read the official `vision_config` section (or a whole omni config.json holding one)."""
        if "vision_config" in d:
            d = d["vision_config"]
        section = "vision_config"
        official = set(_OFFICIAL_DEFAULTS)
        check_keys(d, official | _IGNORED_OFFICIAL, section)
        if d.get("model_type", "qwen3_moe_vit") not in _MODEL_TYPES:
            raise ConfigError(f"{section}: model_type={d['model_type']!r}, expected one of {sorted(_MODEL_TYPES)}")
        v = {k: d.get(k, default) for k, default in _OFFICIAL_DEFAULTS.items()}
        if not isinstance(v["deepstack_visual_indexes"], (list, tuple)):
            raise ConfigError(f"{section}: deepstack_visual_indexes={v['deepstack_visual_indexes']!r} is not a list")
        v["deepstack_visual_indexes"] = tuple(int(i) for i in v["deepstack_visual_indexes"])
        v.update(overrides)
        return cls(**v)

    def to_official(self) -> dict[str, Any]:
        """The official `vision_config` dict (model keys only)."""
        return {
            "architectures": ["Qwen3MoeVisionTransformer"],
            "model_type": "qwen3_moe_vit",
            "depth": self.depth,
            "hidden_size": self.hidden_size,
            "hidden_act": self.hidden_act,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "out_hidden_size": self.out_hidden_size,
            "num_position_embeddings": self.num_position_embeddings,
            "deepstack_visual_indexes": list(self.deepstack_visual_indexes),
        }

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def ming_flash_omni_2(cls, **overrides) -> "VisionConfig":
        """The ViT of Ming-flash-omni 2.0 (numbers of the release's config.json `vision_config`)."""
        kw = dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
            num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24), hidden_act="gelu_pytorch_tanh",
            in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "VisionConfig":
        """A ~0.5M-parameter tower with every feature of the full one (the golden `vision_encoder` sizes)."""
        kw = dict(
            depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
            num_position_embeddings=64, deepstack_visual_indexes=(1, 2),
        )
        kw.update(overrides)
        return cls(**kw)


PRESETS = {"ming-flash-omni-2.0": VisionConfig.ming_flash_omni_2, "tiny": VisionConfig.tiny}
