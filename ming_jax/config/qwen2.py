"""Config of a Qwen2 decoder stack (transformers `Qwen2Config`): the image-generation connector of Ming-flash-omni 2.0
(bidirectional, fed with embeddings) and, later, the talker's LM and the AudioVAE backbones.

Qwen2: GQA attention with biases on q / k / v (none on o), 1-D rotate-half RoPE over the whole head, SwiGLU MLP,
pre-RMSNorm, a final RMSNorm. Only what changes the computation is read; sliding windows are refused (the release
does not use them and a silent full attention would be wrong).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, check_keys, replace, require

# Keys a Qwen2Config dump carries that do not change the network we build.
#  max_window_layers / layer_types: sliding-window bookkeeping (refused below when a window is actually on);
#  max_position_embeddings: RoPE has no table to size; attention_dropout: inference / dropout-free training.
_IGNORED = frozenset({"max_window_layers", "layer_types", "max_position_embeddings", "attention_dropout"})
_KEYS = frozenset({"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "hidden_act", "rope_scaling",
                   "use_sliding_window", "sliding_window", "attention_bias"})


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    head_dim_override: int | None = None  # `head_dim` of the config when given; else hidden / heads

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads > 0 and self.num_key_value_heads > 0 and \
                self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim_override is None and self.num_attention_heads > 0 and \
                self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                            f"{self.num_attention_heads} (and no head_dim is given)")
        elif self.num_attention_heads > 0 and self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if problems:
            raise ConfigError("Qwen2Config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def num_q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **overrides) -> "Qwen2Config":
        return replace(self, **overrides)

    @classmethod
    def tiny(cls, **override) -> "Qwen2Config":
        return cls(**dict(dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2), **override))

    @classmethod
    def from_official(cls, d: Mapping[str, Any], section: str = "qwen2_config") -> "Qwen2Config":
        check_keys(d, _KEYS | _IGNORED, section)
        if d.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(f"{section}: model_type={d['model_type']!r}, expected 'qwen2'")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{section}: hidden_act={d['hidden_act']!r}; Qwen2 here is SwiGLU ('silu')")
        if d.get("use_sliding_window", False):
            raise ConfigError(f"{section}: use_sliding_window=true (sliding_window={d.get('sliding_window')}) is "
                              f"not implemented; the release's connector and talker use full attention")
        if d.get("rope_scaling") not in (None, {}):
            raise ConfigError(f"{section}: rope_scaling={d['rope_scaling']!r} is not implemented (plain RoPE only)")
        if d.get("attention_bias", True) is not True:
            raise ConfigError(f"{section}: attention_bias={d['attention_bias']!r}; Qwen2 has q/k/v biases")
        return cls(
            vocab_size=int(require(d, "vocab_size", section)),
            hidden_size=int(require(d, "hidden_size", section)),
            intermediate_size=int(require(d, "intermediate_size", section)),
            num_hidden_layers=int(require(d, "num_hidden_layers", section)),
            num_attention_heads=int(require(d, "num_attention_heads", section)),
            num_key_value_heads=int(d.get("num_key_value_heads", d.get("num_attention_heads"))),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim_override=None if d.get("head_dim") is None else int(d["head_dim"]),
        )

    def to_official(self) -> dict[str, Any]:
        out = {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "use_sliding_window": False,
        }
        if self.head_dim_override is not None:
            out["head_dim"] = self.head_dim_override
        return out
