"""Config of the audio tower: a Whisper-style encoder and the conv projector into the LLM's embedding space.

Official layout (`config.json`): the `audio_config` section holds the projector's down-sampling conv
(`ds_kernel_size`, `ds_stride`), the `norm_query_embeds` switch and, nested, `whisper_encoder_config` with the five
constructor numbers of the encoder (`n_mels`, `n_ctx`, `n_state`, `n_head`, `n_layer`). Two projector numbers live
outside that section: its depth (top-level `mlp_depth`) and its output width (the LLM's `hidden_size`). We keep them
in `AudioConfig` as `mlp_depth` / `out_dim` so that the audio tower is described by one object.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, check_keys, replace, require

_ENCODER_KEYS = ("n_mels", "n_ctx", "n_state", "n_head", "n_layer")
# `tie_word_embeddings` is written by `PretrainedConfig.to_dict()` into every section; it has no meaning here.
_AUDIO_KEYS = frozenset({"ds_kernel_size", "ds_stride", "norm_query_embeds", "whisper_encoder_config",
                         "tie_word_embeddings"})


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """The encoder's constructor numbers, named as the official `whisper_encoder_config`.

    `n_ctx` is the length of the stored positional table, i.e. the most encoder frames (after the stride-2 conv) a
    clip may have: 15000 in the release, ten times Whisper's 1500, so clips up to 300 s.
    """

    n_mels: int = 128
    n_ctx: int = 15000
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 32
    layer_norm_eps: float = 1e-5  # fixed by whisper's LayerNorm; not an official key

    def __post_init__(self):
        problems = [f"{k}={getattr(self, k)} must be positive" for k in _ENCODER_KEYS if getattr(self, k) <= 0]
        if self.n_head > 0 and self.n_state % self.n_head:
            problems.append(f"n_state={self.n_state} is not a multiple of n_head={self.n_head}")
        if self.n_state % 2 or self.n_state < 4:
            # The sinusoid table splits channels into sin/cos halves and divides by (n_state // 2 - 1).
            problems.append(f"n_state={self.n_state} must be even and >= 4 (sinusoidal positions)")
        if problems:
            raise ConfigError("whisper_encoder_config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head

    @property
    def mlp_dim(self) -> int:
        return 4 * self.n_state  # whisper's residual MLP is always 4x wide

    def to_official(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _ENCODER_KEYS}


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    encoder: WhisperEncoderConfig
    out_dim: int  # projector output width = LLM hidden_size
    mlp_depth: int = 2  # projector: conv, then (mlp_depth - 1) x [GELU, Linear(out_dim, out_dim)]
    ds_kernel_size: int = 3
    ds_stride: int = 2
    norm_query_embeds: bool = True  # L2-normalise the projected embeddings

    def __post_init__(self):
        if not isinstance(self.encoder, WhisperEncoderConfig):
            raise ConfigError(f"AudioConfig.encoder must be a WhisperEncoderConfig, got {type(self.encoder).__name__}")
        problems = []
        for name in ("out_dim", "mlp_depth", "ds_kernel_size", "ds_stride"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.ds_kernel_size % 2 == 0:
            # The official conv pads kernel // 2 on both sides and reads the clip lengths with the matching formula;
            # with an even kernel and stride 1 it would promise more frames than the encoder has.
            problems.append(f"ds_kernel_size={self.ds_kernel_size} must be odd")
        if problems:
            raise ConfigError("AudioConfig: " + "; ".join(problems))

    # --- derived sizes -------------------------------------------------------------------------------------------
    def encoder_frames(self, mel_frames: int) -> int:
        """Frames after whisper's stride-2 conv (kernel 3, padding 1)."""
        return (mel_frames - 1) // 2 + 1

    def projector_frames(self, encoder_frames: int) -> int:
        """Frames after the projector conv (padding ds_kernel_size // 2), the official length formula."""
        k, s = self.ds_kernel_size, self.ds_stride
        return (encoder_frames - k + 2 * (k // 2)) // s + 1

    def output_frames(self, mel_frames: int) -> int:
        """Audio tokens one clip of `mel_frames` mel frames becomes."""
        return self.projector_frames(self.encoder_frames(mel_frames))

    @property
    def max_mel_frames(self) -> int:
        """Longest clip the positional table allows: 2 * n_ctx mel frames."""
        return 2 * self.encoder.n_ctx

    def replace(self, **overrides) -> "AudioConfig":
        """`replace` that also accepts encoder field names (`n_layer=4`) and routes them to `encoder`."""
        enc_names = {f.name for f in dataclasses.fields(WhisperEncoderConfig)}
        enc = {k: overrides.pop(k) for k in list(overrides) if k in enc_names}
        if enc:
            overrides["encoder"] = replace(overrides.get("encoder", self.encoder), **enc)
        return replace(self, **overrides)

    # --- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def ming_flash_omni_2(cls, **override) -> "AudioConfig":
        """Ming-flash-omni 2.0: Whisper-large-v3 sized encoder (32 x 1280, 20 heads), 4096-wide LLM."""
        return cls(encoder=WhisperEncoderConfig(), out_dim=4096).replace(**override)

    @classmethod
    def tiny(cls, **override) -> "AudioConfig":
        """A few-thousand-parameter tower for tests."""
        enc = WhisperEncoderConfig(n_mels=16, n_ctx=64, n_state=32, n_head=4, n_layer=2)
        return cls(encoder=enc, out_dim=48).replace(**override)

    # --- official config.json ------------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any], **overrides) -> "AudioConfig":
        """Read the official `audio_config` section, or a whole omni config.json holding one.

        From a whole config, `mlp_depth` is read from the top level (official default 1) and `out_dim` from
        `llm_config.hidden_size` (or a top-level `llm_hidden_size`, as the golden cases write it). From the section
        alone, pass `out_dim=` (and `mlp_depth=`) as overrides.
        """
        top: Mapping[str, Any] = {}
        if "audio_config" in d:
            top, d = d, d["audio_config"]
        if d is None:
            raise ConfigError("audio_config is null: this config has no audio tower")
        section = "audio_config"
        check_keys(d, _AUDIO_KEYS, section)
        enc_d = require(d, "whisper_encoder_config", section)
        if not isinstance(enc_d, Mapping):
            raise ConfigError(f"{section}.whisper_encoder_config must be a dict, got {type(enc_d).__name__}")
        check_keys(enc_d, _ENCODER_KEYS, f"{section}.whisper_encoder_config")
        enc = WhisperEncoderConfig(**{k: int(require(enc_d, k, f"{section}.whisper_encoder_config"))
                                      for k in _ENCODER_KEYS})
        kw: dict[str, Any] = dict(
            encoder=enc,
            ds_kernel_size=int(d.get("ds_kernel_size", 3)),
            ds_stride=int(d.get("ds_stride", 2)),
            # The official code reads this attribute unconditionally, so a config without it cannot run there.
            norm_query_embeds=bool(require(d, "norm_query_embeds", section)),
        )
        if top:
            kw["mlp_depth"] = int(top.get("mlp_depth", 1))
            if "llm_hidden_size" in top:
                kw["out_dim"] = int(top["llm_hidden_size"])
            elif isinstance(top.get("llm_config"), Mapping):
                kw["out_dim"] = int(require(top["llm_config"], "hidden_size", "llm_config"))
        kw.update(overrides)
        if "out_dim" not in kw:
            raise ConfigError(f"{section}: the projector width (LLM hidden_size) is not in this section; "
                              "pass out_dim= or give the whole config")
        return cls(**kw)

    def to_official(self) -> dict[str, Any]:
        """The official `audio_config` section (model keys only). `mlp_depth` / `out_dim` belong to the omni config
        (top-level `mlp_depth`, `llm_config.hidden_size`) and are written by its composer."""
        return {
            "ds_kernel_size": self.ds_kernel_size,
            "ds_stride": self.ds_stride,
            "norm_query_embeds": self.norm_query_embeds,
            "whisper_encoder_config": self.encoder.to_official(),
        }
