"""Config of the talker's AudioVAE (release folder `talker/vae/`): the acoustic-latent <-> 44.1 kHz waveform codec
of Ming-flash-omni 2.0's speech output.

Official layout (`AudioVAEconfig.to_dict()`): top-level `sample_rate`, `patch_size`, `init_method`, and two sections
    enc_kwargs: {backbone: <Qwen2Config dict>, input_dim, hop_size (official default 320), latent_dim}
    dec_kwargs: {backbone: <Qwen2Config dict>, output_dim, latent_dim}
plus the generic `PretrainedConfig` keys. The decoder's iSTFT sizes follow from `output_dim` (= the hop): n_fft =
window = 4 * hop, "same" padding trims (window - hop) // 2 samples at each end. `patch_size` is the number of
backbone frames per latent (the decoder's linear upsampling factor, the encoder's pooling factor); -1 means none.

Backbone dicts go to `Qwen2Config.from_official` after one pre-filter, documented here because it is a choice: the
official Encoder / Decoder force `_attn_implementation = "sdpa"` and switch sliding windows off (`use_sliding_window
= False`, `sliding_window = None`) whatever the dict says, so `attn_implementation`, `_attn_implementation`,
`use_sliding_window`, `sliding_window`, `max_window_layers` and `layer_types` never change the network. They are
taken out before the Qwen2 reader (which refuses a sliding window that would really be on) and kept verbatim, as
are `max_position_embeddings` and the training-only top-level keys, so that `to_official` writes back what was read.

Two structural facts of the official Encoder live here as derived numbers, below both the modules and the table:
  * the aggregator is a Qwen2 stack of `AGGREGATOR_LAYERS` = 4 layers with the encoder backbone's other sizes;
  * it is built by setting `num_hidden_layers = 4` on the very config object the encoder backbone already holds,
    and transformers' Qwen2Model runs `layers[:config.num_hidden_layers]`, so the encoder backbone runs only its
    first min(num_hidden_layers, 4) layers (all of them are stored and loaded). `encoder_layers_run` says how many.
    (With fewer than 4 encoder layers the official constructor itself fails, in transformers' per-layer
    `layer_types`; such a config is still accepted here and builds a 4-layer aggregator.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ming_jax.config.base import ConfigError, check_keys, replace, require
from ming_jax.config.qwen2 import Qwen2Config

AGGREGATOR_LAYERS = 4  # fixed by the official Encoder
NO_PATCH = -1  # `patch_size` value meaning "no up-/down-sampling between latents and frames"

# Backbone keys the official code overrides or that only size tables we do not build (see the module docstring).
_BACKBONE_PASSTHROUGH = frozenset({"attn_implementation", "_attn_implementation", "use_sliding_window",
                                   "sliding_window", "max_window_layers", "layer_types", "max_position_embeddings"})
# Training-only keys of the release's AudioVAE config (discriminators, loss weights, an unused semantic module), as
# peer ports of the release describe it (not in the source snapshot): accepted, kept, never read.
_TRAINING_KEYS = frozenset({"hifi_gan_disc_kwargs", "spec_disc_kwargs", "semantic_module_kwargs", "lambda_adv",
                            "lambda_disc", "lambda_feat_match_loss", "lambda_mel_loss", "lambda_semantic"})
_TOP_KEYS = frozenset({"sample_rate", "patch_size", "init_method", "enc_kwargs", "dec_kwargs"})
_ENC_KEYS = frozenset({"backbone", "input_dim", "hop_size", "latent_dim"})
_DEC_KEYS = frozenset({"backbone", "output_dim", "latent_dim"})

Extras = tuple[tuple[str, str], ...]  # (key, JSON of the value), sorted: hashable, so configs stay static for jit


def _freeze(d: Mapping[str, Any]) -> Extras:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in d.items()))


def _thaw(extras: Extras) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in extras}


def _read_backbone(d: Any, section: str) -> tuple[Qwen2Config, Extras]:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{section}: expected a Qwen2Config dict, got {type(d).__name__}")
    core = {k: v for k, v in d.items() if k not in _BACKBONE_PASSTHROUGH}
    kept = {k: v for k, v in d.items() if k in _BACKBONE_PASSTHROUGH}
    return Qwen2Config.from_official(core, section), _freeze(kept)


def _write_backbone(cfg: Qwen2Config, extras: Extras) -> dict[str, Any]:
    out = {k: v for k, v in cfg.to_official().items() if k not in _BACKBONE_PASSTHROUGH and k != "architectures"}
    out.update(_thaw(extras))
    return out


def _positive(obj, names) -> list[str]:
    return [f"{n}={getattr(obj, n)} must be positive" for n in names if getattr(obj, n) <= 0]


@dataclasses.dataclass(frozen=True)
class AudioVAEEncoderConfig:
    """waveform -> frames of `input_dim` samples every `hop_size` -> fc1 -> fc2 -> Qwen2 -> (aggregator) -> fc3."""

    backbone: Qwen2Config
    input_dim: int  # samples per analysis frame
    hop_size: int = 320  # official default when the key is absent
    latent_dim: int = 64  # fc3 emits 2 * latent_dim (mean, scale)
    backbone_extras: Extras = ()

    def __post_init__(self):
        problems = _positive(self, ("input_dim", "hop_size", "latent_dim"))
        if problems:
            raise ConfigError("enc_kwargs: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def aggregator(self) -> Qwen2Config:
        return self.backbone.replace(num_hidden_layers=AGGREGATOR_LAYERS)


@dataclasses.dataclass(frozen=True)
class AudioVAEDecoderConfig:
    """latents -> fc1 -> linear upsampling -> causal Qwen2 -> iSTFT head (hop `output_dim`, n_fft 4 * hop)."""

    backbone: Qwen2Config
    output_dim: int  # the iSTFT hop: samples per backbone frame
    latent_dim: int = 64
    backbone_extras: Extras = ()

    def __post_init__(self):
        problems = _positive(self, ("output_dim", "latent_dim"))
        if problems:
            raise ConfigError("dec_kwargs: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def hop(self) -> int:
        return self.output_dim

    @property
    def n_fft(self) -> int:  # also the window length
        return 4 * self.output_dim

    @property
    def n_bins(self) -> int:  # one-sided spectrum
        return self.n_fft // 2 + 1

    @property
    def pad(self) -> int:  # samples "same" padding trims at each end of the whole signal
        return (self.n_fft - self.hop) // 2

    @property
    def overlap(self) -> int:  # samples a streaming call carries into the next one
        return self.n_fft - self.hop


@dataclasses.dataclass(frozen=True)
class AudioVAEConfig:
    encoder: AudioVAEEncoderConfig
    decoder: AudioVAEDecoderConfig
    patch_size: int = NO_PATCH  # backbone frames per latent; -1: none (official default)
    sample_rate: int = 16000  # official default; the math never reads it (the talker's silence trim does)
    init_method: str = "normal"  # training-time init only
    extras: Extras = ()  # training-only keys, verbatim

    def __post_init__(self):
        problems = _positive(self, ("sample_rate",))
        if self.patch_size != NO_PATCH and self.patch_size < 1:
            problems.append(f"patch_size={self.patch_size} must be >= 1, or -1 for none")
        if problems:
            raise ConfigError("AudioVAEConfig: " + "; ".join(problems))

    # --- derived sizes ---------------------------------------------------------------------------------------
    @property
    def has_patch(self) -> bool:
        return self.patch_size != NO_PATCH

    @property
    def frames_per_latent(self) -> int:
        return self.patch_size if self.has_patch else 1

    @property
    def samples_per_latent(self) -> int:
        return self.frames_per_latent * self.decoder.hop

    @property
    def encoder_layers_run(self) -> int:
        """Encoder backbone layers the official forward runs (module docstring: the shared-config quirk)."""
        n = self.encoder.backbone.num_hidden_layers
        return min(n, AGGREGATOR_LAYERS) if self.has_patch else n

    def replace(self, **overrides) -> AudioVAEConfig:
        return replace(self, **overrides)

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **override) -> AudioVAEConfig:
        """The golden case's shape: hop 24 (n_fft 96), patch 4, latent 64, 32-wide Qwen2 backbones."""
        bb = Qwen2Config(vocab_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
        return cls(encoder=AudioVAEEncoderConfig(bb.replace(num_hidden_layers=4), input_dim=24, hop_size=24),
                   decoder=AudioVAEDecoderConfig(bb, output_dim=24), patch_size=4,
                   sample_rate=44100).replace(**override)

    @classmethod
    def ming_flash_omni_2(cls, **override) -> AudioVAEConfig:
        """The release's talker VAE. Confirmed (golden README, peer ports): 44.1 kHz, hop = input_dim = output_dim =
        882 (50 frames/s), patch 4 (12.5 latents/s), latent 64; the mstar port asserts sample rate 44100 and latent
        64 against the released talker/vae/config.json (test/modular/test_ming_flash_omni_config.py) and quotes its
        `enc_kwargs: {hop_size: 882, input_dim: 882, latent_dim: 64}` (PORTING_NOTES step 6d). INFERRED, unconfirmed
        (the release's talker/vae/config.json is not in the source snapshot, and no port found quotes the backbone
        dicts): both backbones take the talker LM's Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads / 2 kv,
        intermediate 4864, theta 1e6) with vocab 1. Replace them from the real config before loading weights; the
        strict weight table will refuse a mismatch."""
        bb = Qwen2Config(vocab_size=1, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
        return cls(encoder=AudioVAEEncoderConfig(bb, input_dim=882, hop_size=882),
                   decoder=AudioVAEDecoderConfig(bb, output_dim=882), patch_size=4,
                   sample_rate=44100).replace(**override)

    # --- official config.json --------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any]) -> AudioVAEConfig:
        check_keys(d, _TOP_KEYS | _TRAINING_KEYS, "audio_vae")
        enc = require(d, "enc_kwargs", "audio_vae")
        dec = require(d, "dec_kwargs", "audio_vae")
        for name, section, keys in (("enc_kwargs", enc, _ENC_KEYS), ("dec_kwargs", dec, _DEC_KEYS)):
            if not isinstance(section, Mapping):
                raise ConfigError(f"audio_vae.{name}: expected a dict, got {type(section).__name__}")
            unknown = sorted(set(section) - keys)
            if unknown:
                raise ConfigError(f"audio_vae.{name}: unknown key(s) {unknown} (known: {sorted(keys)})")
        enc_bb, enc_extra = _read_backbone(require(enc, "backbone", "enc_kwargs"), "enc_kwargs.backbone")
        dec_bb, dec_extra = _read_backbone(require(dec, "backbone", "dec_kwargs"), "dec_kwargs.backbone")
        encoder = AudioVAEEncoderConfig(enc_bb, input_dim=int(require(enc, "input_dim", "enc_kwargs")),
                                        hop_size=int(enc.get("hop_size", 320)),
                                        latent_dim=int(require(enc, "latent_dim", "enc_kwargs")),
                                        backbone_extras=enc_extra)
        decoder = AudioVAEDecoderConfig(dec_bb, output_dim=int(require(dec, "output_dim", "dec_kwargs")),
                                        latent_dim=int(require(dec, "latent_dim", "dec_kwargs")),
                                        backbone_extras=dec_extra)
        patch = d.get("patch_size", NO_PATCH)
        return cls(encoder=encoder, decoder=decoder, patch_size=NO_PATCH if patch is None else int(patch),
                   sample_rate=int(d.get("sample_rate", 16000)), init_method=str(d.get("init_method", "normal")),
                   extras=_freeze({k: v for k, v in d.items() if k in _TRAINING_KEYS}))

    def to_official(self) -> dict[str, Any]:
        enc, dec = self.encoder, self.decoder
        out = {
            "sample_rate": self.sample_rate, "patch_size": self.patch_size, "init_method": self.init_method,
            "enc_kwargs": {"backbone": _write_backbone(enc.backbone, enc.backbone_extras), "input_dim": enc.input_dim,
                           "hop_size": enc.hop_size, "latent_dim": enc.latent_dim},
            "dec_kwargs": {"backbone": _write_backbone(dec.backbone, dec.backbone_extras),
                           "output_dim": dec.output_dim, "latent_dim": dec.latent_dim},
        }
        out.update(_thaw(self.extras))
        return out
