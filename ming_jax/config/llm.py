"""Config of the BailingMoeV2 (Ling-flash-2.0) language backbone."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, check_keys, replace, require

# Official keys that exist in released configs but do not change the computation of the official code:
#  - use_qk_norm: the official attention applies q_norm / k_norm unconditionally;
#  - norm_head, norm_softmax, norm_topk_prob, moe_router_topk_scaling_factor: never read by the official modules
#    (routing always normalises the top-k weights and scales them by `routed_scaling_factor`);
#  - dropouts (inference and our training are dropout-free), max_window_layers / sliding_window (inactive unless
#    use_sliding_window, which we reject), pretraining_tp, tokens_per_second (not used by video rope),
#    audio token ids (audio routing uses placeholder spans, not ids).
_IGNORED_OFFICIAL = frozenset(
    """
    use_qk_norm norm_head norm_softmax norm_topk_prob moe_router_topk_scaling_factor embedding_dropout
    attention_dropout output_dropout max_window_layers sliding_window pretraining_tp tokens_per_second
    image_end_token video_end_token audio_start_token audio_patch_token audio_end_token
    """.split()
)


def check_quantization_config(d: Mapping[str, Any], section: str) -> None:
    """`quantization_config` says how the weights are stored, not the architecture: the only kind read is block-scaled
    FP8 (transformers' fine-grained FP8: `<w>` F8_E4M3 + `<w>_scale_inv`, `ming_jax.checkpoint.safetensors`)."""
    q = d.get("quantization_config")
    if q is None:
        return
    if not isinstance(q, Mapping) or q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{section}: quantization_config={q!r}; only block-scaled fp8 (e4m3) weights are read")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width of the first `first_k_dense_replace` layers
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    router_type: str = "MultiRouter"  # "MultiRouter" (text / image / audio gates) or "topN" (one gate)
    use_expert_bias: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 2_400_000.0
    partial_rotary_factor: float = 0.5
    rope_type: str = "video_rope"  # "video_rope" (3-D positions) or "default" (1-D)
    mrope_section: tuple[int, int, int] = (8, 12, 12)  # hard-coded in the release's attention
    max_position_embeddings: int = 32768
    use_qkv_bias: bool = False
    use_bias: bool = False  # bias of the attention output projection
    tie_word_embeddings: bool = False
    # Special tokens (ids of the release's tokenizer).
    pad_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    image_patch_token: int | None = None
    video_patch_token: int | None = None
    image_start_token: int | None = None
    video_start_token: int | None = None
    spatial_merge_size: int = 2  # the official model forces 2
    use_interleaved_frame_timestamp: bool = True
    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            problems.append(f"first_k_dense_replace={self.first_k_dense_replace} outside [0, {self.num_layers}]")
        if self.num_moe_layers:
            if self.num_experts <= 0 or self.moe_intermediate_size <= 0:
                problems.append("MoE layers need num_experts > 0 and moe_intermediate_size > 0")
            elif self.num_experts % self.n_group:
                problems.append(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
            elif not 1 <= self.topk_group <= self.n_group:
                problems.append(f"topk_group={self.topk_group} outside [1, n_group={self.n_group}]")
            elif self.num_experts // self.n_group < 2:
                problems.append("each expert group needs >= 2 experts (group score = sum of its top-2)")
            elif self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
                                f"topk_group={self.topk_group} groups")
        if self.first_k_dense_replace and self.intermediate_size <= 0:
            problems.append("dense layers need intermediate_size > 0")
        if self.router_type not in ("MultiRouter", "topN"):
            problems.append(f"router_type={self.router_type!r} (known: MultiRouter, topN)")
        if self.rope_type not in ("video_rope", "default"):
            problems.append(f"rope_type={self.rope_type!r} (supported: video_rope, default)")
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            problems.append(f"rotary dim {self.rotary_dim} (head_dim * partial_rotary_factor) must be even and > 0")
        if problems:
            raise ConfigError("LLMConfig: " + "; ".join(problems))

    # --- derived sizes ---------------------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace if self.num_experts else 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_routers(self) -> int:
        return 3 if self.router_type == "MultiRouter" else 1

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (tuple, list)) else (self.eos_token_id,)

    def replace(self, **overrides) -> "LLMConfig":
        return replace(self, **overrides)

    # --- official config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any], **overrides) -> "LLMConfig":
        """Read the official `llm_config` section (or a whole omni config.json holding one)."""
        if "llm_config" in d:
            d = d["llm_config"]
        section = "llm_config"
        known = {f.name for f in dataclasses.fields(cls)} | _IGNORED_OFFICIAL | {
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act", "rope_scaling",
            "use_sliding_window", "spatial_merge_size",
        }
        check_keys(d, known | {"quantization_config"}, section)
        check_quantization_config(d, section)
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{section}: hidden_act={d['hidden_act']!r}; BailingMoeV2 uses silu")
        if d.get("use_sliding_window", False):
            raise ConfigError(f"{section}: use_sliding_window=true is not supported")
        if d.get("model_type", "bailing_moe_v2") != "bailing_moe_v2":
            raise ConfigError(f"{section}: model_type={d['model_type']!r}, expected 'bailing_moe_v2'")
        rope = d.get("rope_scaling")
        if rope is None:
            rope_type = "default"
        else:
            rope_type = rope.get("rope_type", rope.get("type"))
            if rope_type not in ("video_rope",):
                raise ConfigError(f"{section}: rope_scaling type {rope_type!r} is not supported (video_rope)")
        hidden = require(d, "hidden_size", section)
        heads = require(d, "num_attention_heads", section)
        kw = dict(
            vocab_size=require(d, "vocab_size", section),
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size") or 0,
            num_layers=require(d, "num_hidden_layers", section),
            num_heads=heads,
            num_kv_heads=require(d, "num_key_value_heads", section),
            head_dim=d.get("head_dim") or hidden // heads,
            moe_intermediate_size=d.get("moe_intermediate_size") or 0,
            num_experts=d.get("num_experts") or 0,
            num_experts_per_tok=d.get("num_experts_per_tok", 2),
            num_shared_experts=d.get("num_shared_experts") or 0,
            n_group=d.get("n_group", 8),
            topk_group=d.get("topk_group", 4),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 2.5)),
            first_k_dense_replace=d.get("first_k_dense_replace", 0),
            router_type=d.get("router_type", "topN"),
            use_expert_bias=d.get("use_expert_bias", True),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            partial_rotary_factor=float(d.get("partial_rotary_factor", 0.5)),
            rope_type=rope_type,
            max_position_embeddings=d.get("max_position_embeddings", 16384),
            use_qkv_bias=d.get("use_qkv_bias", False),
            use_bias=d.get("use_bias", True),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            pad_token_id=d.get("pad_token_id"),
            eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get(
                "eos_token_id"),
            image_patch_token=d.get("image_patch_token"),
            video_patch_token=d.get("video_patch_token"),
            image_start_token=d.get("image_start_token"),
            video_start_token=d.get("video_start_token"),
            use_interleaved_frame_timestamp=d.get("use_interleaved_frame_timestamp", True),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_official(self) -> dict[str, Any]:
        """The official `llm_config` dict (model keys only; defaults of the official class filled in)."""
        return {
            "architectures": ["BailingMoeV2ForCausalLM"],
            "model_type": "bailing_moe_v2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_shared_experts": self.num_shared_experts,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "first_k_dense_replace": self.first_k_dense_replace,
            "router_type": self.router_type,
            "use_expert_bias": self.use_expert_bias,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_scaling": {"factor": None, "type": "video_rope"} if self.rope_type == "video_rope" else None,
            "max_position_embeddings": self.max_position_embeddings,
            "use_qkv_bias": self.use_qkv_bias,
            "use_bias": self.use_bias,
            "use_qk_norm": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "image_patch_token": self.image_patch_token,
            "video_patch_token": self.video_patch_token,
            "image_start_token": self.image_start_token,
            "video_start_token": self.video_start_token,
            "use_interleaved_frame_timestamp": self.use_interleaved_frame_timestamp,
        }

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def ming_flash_omni_2(cls, **overrides) -> "LLMConfig":
        """Ling-flash-2.0 as configured in Ming-flash-omni 2.0 (numbers of the release's config.json)."""
        kw = dict(
            vocab_size=157184, hidden_size=4096, intermediate_size=9216, num_layers=32, num_heads=32, num_kv_heads=4,
            head_dim=128, moe_intermediate_size=1024, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
            n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1, router_type="MultiRouter",
            use_expert_bias=True, rms_norm_eps=1e-6, rope_theta=2_400_000.0, partial_rotary_factor=0.5,
            rope_type="video_rope", max_position_embeddings=32768, use_qkv_bias=False, use_bias=False,
            tie_word_embeddings=False, pad_token_id=156892, eos_token_id=156895, image_patch_token=157157,
            video_patch_token=157175, image_start_token=157158, video_start_token=157159,
            use_interleaved_frame_timestamp=True,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "LLMConfig":
        """A few-MB model with every feature of the full one (dense + MoE layers, groups, MultiRouter, video rope)."""
        kw = dict(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
            head_dim=128, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4, num_shared_experts=1,
            n_group=4, topk_group=2, first_k_dense_replace=1, router_type="MultiRouter", rms_norm_eps=1e-6,
            rope_theta=2_400_000.0, pad_token_id=999, eos_token_id=989, image_patch_token=990, video_patch_token=991,
            image_start_token=992, video_start_token=993,
        )
        kw.update(overrides)
        return cls(**kw)


PRESETS = {"ming-flash-omni-2.0": LLMConfig.ming_flash_omni_2, "tiny": LLMConfig.tiny}
