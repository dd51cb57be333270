"""Configs of the ByT5 glyph branch of Ming-flash-omni 2.0's image generation (the release's `byt5/` folder).

When an image prompt carries text to render, the release also encodes that text byte by byte with a ByT5 encoder
(a T5 encoder stack: relative-position buckets, RMS layer norms, gated-GELU FFN) and maps it to the caption width
with a few more T5 blocks and a linear layer (`T5EncoderBlockByT5Mapper`). Two configs describe it:

    byt5/<byt5_ckpt_path>/config.json   T5EncoderConfig   the encoder (a transformers T5Config dump; ByT5-small)
    byt5/byt5.json                      GlyphConfig       the mapper's size, the token budget, the special tokens

Release layout (what the release's `load_byt5` reads, relative to `byt5/`; the names are constants below):
    byt5.json                          this GlyphConfig
    <byt5_ckpt_path>/                  tokenizer files + config.json of the base ByT5 (a copy of google/byt5-small)
    byt5_model/base.pt                 {"state_dict": {"module.text_tower.encoder.<T5Stack name>": ...}, ...}
    byt5_model/byt5_model.pt           {<T5Stack name>: tensor}: the fine-tuned encoder, loaded strictly AFTER
                                       base.pt, so it replaces every value base.pt put there
    byt5_mapper/byt5_mapper.pt         {<mapper name>: tensor}
    <font_ann_path>, <color_ann_path>  JSON dicts whose entries become added special tokens (see processors.glyph)
The encoder's embedding table has `len(tokenizer)` rows (the config's vocab_size plus the added tokens; the
release resizes it before loading), so the loader builds the encoder with `T5EncoderConfig.replace(vocab_size=...)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ming_jax.config.base import ConfigError, check_keys, replace, require

# --- the release's byt5/ folder ---------------------------------------------------------------------------------

CONFIG_FILE = "byt5.json"
BASE_CKPT = "byt5_model/base.pt"  # superseded by FINETUNED_CKPT (both loaded strictly, that one last)
BASE_PREFIX = "module.text_tower.encoder."  # base.pt's names: this prefix + the T5Stack name
FINETUNED_CKPT = "byt5_model/byt5_model.pt"
MAPPER_CKPT = "byt5_mapper/byt5_mapper.pt"
MAPPER_TYPE = "T5EncoderBlockByT5Mapper"  # the only mapper the release builds (whatever byt5.json says)

# --- the encoder: a transformers T5Config ------------------------------------------------------------------------

# feed_forward_proj -> (gated?, activation of transformers' ACT2FN name). "gated-gelu" is the tanh GELU ("gelu_new"),
# a special case in T5Config; ByT5 uses it. Others (gated-silu, gelu, ...) are not modelled.
FEED_FORWARD = {"gated-gelu": (True, "gelu_new"), "relu": (False, "relu")}

# T5Config keys that do not change the encoder we build: the decoder's depth, dropout (inference and dropout-free
# training), init scales, old bookkeeping. `dense_act_fn` / `is_gated_act` are derived and checked below.
_IGNORED = frozenset({"num_decoder_layers", "dropout_rate", "classifier_dropout", "initializer_factor",
                      "gradient_checkpointing", "n_positions", "dense_act_fn", "is_gated_act"})
_KEYS = frozenset({"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                   "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj",
                   "layer_norm_epsilon"})


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """A T5 encoder stack. Attention inner width is num_heads * d_kv, which need not equal d_model."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        problems = [f"{n}={getattr(self, n)} must be positive" for n in
                    ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance") if getattr(self, n) <= 0]
        if self.feed_forward_proj not in FEED_FORWARD:
            problems.append(f"feed_forward_proj={self.feed_forward_proj!r} (modelled: {', '.join(FEED_FORWARD)})")
        if self.relative_attention_num_buckets < 4:  # bidirectional halves them, then half of a half is exact
            problems.append(f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4")
        if problems:
            raise ConfigError("T5EncoderConfig: " + "; ".join(problems))

    @property
    def gated(self) -> bool:
        return FEED_FORWARD[self.feed_forward_proj][0]

    @property
    def activation(self) -> str:
        """transformers' ACT2FN name: "gelu_new" (tanh GELU) or "relu"."""
        return FEED_FORWARD[self.feed_forward_proj][1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **overrides) -> "T5EncoderConfig":
        return replace(self, **overrides)

    @classmethod
    def tiny(cls, **override) -> "T5EncoderConfig":
        return cls(**dict(dict(vocab_size=400, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_heads=3,
                               relative_attention_num_buckets=8, relative_attention_max_distance=12), **override))

    @classmethod
    def byt5_small(cls, **override) -> "T5EncoderConfig":
        """google/byt5-small's encoder (the release's base; its table grows by the added special tokens)."""
        return cls(**dict(dict(vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6),
                          **override))

    @classmethod
    def from_official(cls, d: Mapping[str, Any], section: str = "byt5 config.json") -> "T5EncoderConfig":
        check_keys(d, _KEYS | _IGNORED, section)
        if d.get("model_type", "t5") != "t5":
            raise ConfigError(f"{section}: model_type={d['model_type']!r}, expected 't5'")
        proj = d.get("feed_forward_proj", "relu")  # T5Config's default
        if proj not in FEED_FORWARD:
            raise ConfigError(f"{section}: feed_forward_proj={proj!r} is not modelled (only {', '.join(FEED_FORWARD)})")
        gated, act = FEED_FORWARD[proj]
        if d.get("dense_act_fn", act) != act or bool(d.get("is_gated_act", gated)) != gated:
            raise ConfigError(f"{section}: dense_act_fn={d.get('dense_act_fn')!r} / is_gated_act="
                              f"{d.get('is_gated_act')!r} contradict feed_forward_proj={proj!r}")
        return cls(
            vocab_size=int(require(d, "vocab_size", section)),
            d_model=int(require(d, "d_model", section)),
            d_kv=int(require(d, "d_kv", section)),
            d_ff=int(require(d, "d_ff", section)),
            num_layers=int(require(d, "num_layers", section)),
            num_heads=int(require(d, "num_heads", section)),
            relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
            feed_forward_proj=proj,
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
        )

    def to_official(self) -> dict[str, Any]:
        return {
            "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": self.vocab_size,
            "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "feed_forward_proj": self.feed_forward_proj, "layer_norm_epsilon": self.layer_norm_epsilon,
        }


# --- byt5.json ---------------------------------------------------------------------------------------------------

_TOP_KEYS = frozenset({"byt5_config", "byt5_mapper_config", "byt5_max_length", "byt5_mapper_type"})
# The keyword arguments of the release's `load_byt5_and_byt5_tokenizer` (anything else is a TypeError there).
_ENCODER_KEYS = frozenset({"byt5_ckpt_path", "byt5_name", "special_token", "color_special_token",
                           "font_special_token", "align_special_token", "train_text_encoder_lora",
                           "text_encoder_lora_rank", "font_ann_path", "color_ann_path", "multilingual"})
_MAPPER_KEYS = frozenset({"num_layers", "sdxl_channels"})  # T5EncoderBlockByT5Mapper's keyword arguments


@dataclasses.dataclass(frozen=True)
class GlyphConfig:
    """What byt5.json says. Paths are relative to the `byt5/` folder, as written there.

    `special_tokens` gates the added tokens; within it `color_tokens` adds `<color-i>` per entry of the color
    annotation file, then `font_tokens` one font token per entry of the font file (`multilingual`: language-prefixed
    names). `align_tokens` is read but the release never adds align tokens (it does not pass the flag on).
    """

    max_length: int  # byt5_max_length: every text is padded / truncated to this many byte tokens (</s> included)
    ckpt_path: str  # byt5_ckpt_path: the base ByT5 folder (config.json + tokenizer files)
    mapper_layers: int  # T5 blocks of the mapper (the first holds its own relative-position table)
    mapper_channels: int | None = None  # sdxl_channels: the caption width; None: no channel mapper (d_model out)
    special_tokens: bool = False
    color_tokens: bool = False
    font_tokens: bool = False
    align_tokens: bool = False
    multilingual: bool = True
    font_ann_path: str = "glyph/font_uni_10-lang_idx.json"
    color_ann_path: str = "glyph/color_idx.json"
    base_name: str = "google/byt5-small"  # byt5_name: informational (the release loads ckpt_path)
    mapper_type: str | None = None  # byt5_mapper_type when byt5.json has one

    def __post_init__(self):
        problems = []
        if self.max_length <= 0:
            problems.append(f"byt5_max_length={self.max_length} must be positive")
        if self.mapper_layers < 0:
            problems.append(f"num_layers={self.mapper_layers} must be >= 0")
        if self.mapper_channels is not None and self.mapper_channels <= 0:
            problems.append(f"sdxl_channels={self.mapper_channels} must be positive or null")
        if self.mapper_type not in (None, MAPPER_TYPE):
            problems.append(f"byt5_mapper_type={self.mapper_type!r}: the release builds {MAPPER_TYPE} only")
        if problems:
            raise ConfigError("GlyphConfig: " + "; ".join(problems))

    @property
    def adds_colors(self) -> bool:
        return self.special_tokens and self.color_tokens

    @property
    def adds_fonts(self) -> bool:
        return self.special_tokens and self.font_tokens

    def replace(self, **overrides) -> "GlyphConfig":
        return replace(self, **overrides)

    @classmethod
    def tiny(cls, **override) -> "GlyphConfig":
        return cls(**dict(dict(max_length=32, ckpt_path="base", mapper_layers=2, mapper_channels=20,
                               special_tokens=True, color_tokens=True, font_tokens=True), **override))

    @classmethod
    def from_official(cls, d: Mapping[str, Any], section: str = CONFIG_FILE) -> "GlyphConfig":
        unknown = sorted(set(d) - _TOP_KEYS)
        if unknown:
            raise ConfigError(f"{section}: unknown key(s) {unknown}")
        enc = require(d, "byt5_config", section)
        mapper = require(d, "byt5_mapper_config", section)
        bad = sorted(set(enc) - _ENCODER_KEYS) + sorted(set(mapper) - _MAPPER_KEYS)
        if bad:
            raise ConfigError(f"{section}: unknown byt5_config / byt5_mapper_config key(s) {bad}")
        if enc.get("train_text_encoder_lora", False):
            raise ConfigError(f"{section}: train_text_encoder_lora=true (a LoRA adapter on the encoder) is not "
                              f"modelled")
        channels = mapper.get("sdxl_channels")
        return cls(
            max_length=int(require(d, "byt5_max_length", section)),
            ckpt_path=str(require(enc, "byt5_ckpt_path", section + " byt5_config")),
            mapper_layers=int(require(mapper, "num_layers", section + " byt5_mapper_config")),
            mapper_channels=None if channels is None else int(channels),
            special_tokens=bool(enc.get("special_token", False)),
            color_tokens=bool(enc.get("color_special_token", False)),
            font_tokens=bool(enc.get("font_special_token", False)),
            align_tokens=bool(enc.get("align_special_token", False)),
            multilingual=bool(enc.get("multilingual", True)),
            font_ann_path=str(enc.get("font_ann_path", cls.font_ann_path)),
            color_ann_path=str(enc.get("color_ann_path", cls.color_ann_path)),
            base_name=str(enc.get("byt5_name", cls.base_name)),
            mapper_type=d.get("byt5_mapper_type"),
        )

    def to_official(self) -> dict[str, Any]:
        out = {
            "byt5_max_length": self.max_length,
            "byt5_mapper_config": {"num_layers": self.mapper_layers, "sdxl_channels": self.mapper_channels},
            "byt5_config": {
                "byt5_ckpt_path": self.ckpt_path, "byt5_name": self.base_name, "special_token": self.special_tokens,
                "color_special_token": self.color_tokens, "font_special_token": self.font_tokens,
                "align_special_token": self.align_tokens, "multilingual": self.multilingual,
                "font_ann_path": self.font_ann_path, "color_ann_path": self.color_ann_path,
            },
        }
        if self.mapper_type is not None:
            out["byt5_mapper_type"] = self.mapper_type
        return out
