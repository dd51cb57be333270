"""Configs of the image-generation path of Ming-flash-omni 2.0, one per release sub-folder:

    mlp/config.json                 ImageGenHeadConfig   learned query tokens, proj_in / proj_out, the DiT wrapper's
                                                         caption handling (L2 x 1000, identity or ToClip MLP)
    connector/config.json           Qwen2Config          the bidirectional Qwen2 connector (`ming_jax.config.qwen2`)
    transformer/config.json         DiTConfig            the Z-Image DiT (`ming_jax.config.dit`)
    vae/config.json                 VAEConfig            the Flux-layout AutoencoderKL (`ming_jax.config.vae`)
    scheduler/scheduler_config.json FlowMatchConfig      FlowMatchEulerDiscreteScheduler's sigma schedule

`ImageGenConfig` holds the five. The thinker (the LLM whose hidden states condition the image) is the omni
config's `llm`; the optional ByT5 glyph branch (`byt5/byt5.json`) has its own config, `ming_jax.config.glyph`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, replace
from ming_jax.config.dit import DiTConfig
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.vae import VAEConfig

# mlp/config.json keys; defaults are the release loader's (`load_image_gen_modules`) when a key is absent.
_HEAD_DEFAULTS = dict(diffusion_c_input_dim=2048, img_gen_scales=(4, 8, 16), dit_type="sd3", use_identity_mlp=False,
                      text_encoder_norm=False)
CLIP_MLP_HIDDEN = 2048  # the ToClip MLP's hidden width, fixed in the release
CLIP_MLP_OUT = 2560  # ... and its output width (the Z-Image caption width), fixed in the release


@dataclasses.dataclass(frozen=True)
class ImageGenHeadConfig:
    """What mlp/config.json says: the query-token scales, the condition width and the DiT wrapper's caption path."""

    diffusion_c_input_dim: int  # width of the condition (proj_out's output) = the caption width the DiT sees
    img_gen_scales: tuple[int, ...] = (16,)  # one query block of s*s tokens per scale; only the LAST conditions
    dit_type: str = "zimage"
    use_identity_mlp: bool = True  # False: the ToClip MLP (Linear-LN-ReLU-Linear-LN to 2560) after the L2 x 1000
    text_encoder_norm: bool = True  # the DiT wrapper re-normalises the caption and scales it by 1000

    CAPTION_SCALE = 1000.0  # the wrapper's factor after the L2 normalisation (`text_encoder_norm`)

    def __post_init__(self):
        if isinstance(self.img_gen_scales, list):
            object.__setattr__(self, "img_gen_scales", tuple(self.img_gen_scales))
        problems = []
        if self.diffusion_c_input_dim <= 0:
            problems.append(f"diffusion_c_input_dim={self.diffusion_c_input_dim} must be positive")
        if not self.img_gen_scales or any(int(s) <= 0 for s in self.img_gen_scales):
            problems.append(f"img_gen_scales={list(self.img_gen_scales)} must be a non-empty list of positive sizes")
        if "zimage" not in self.dit_type:
            problems.append(f"dit_type={self.dit_type!r}: only the Z-Image DiT ('zimage') is implemented (the "
                            f"release's SD3 / SANA branches are not)")
        if problems:
            raise ConfigError("ImageGenHeadConfig: " + "; ".join(problems))

    @property
    def num_query_tokens(self) -> int:
        """Query tokens of all scales (each scale's block is <image> + s*s patches + </image>)."""
        return sum(s * s for s in self.img_gen_scales)

    @property
    def caption_dim(self) -> int:
        """Width of the caption the DiT receives (after the identity or ToClip MLP)."""
        return self.diffusion_c_input_dim if self.use_identity_mlp else CLIP_MLP_OUT

    def replace(self, **overrides) -> "ImageGenHeadConfig":
        return replace(self, **overrides)

    @classmethod
    def from_official(cls, d: Mapping[str, Any]) -> "ImageGenHeadConfig":
        unknown = sorted(set(d) - set(_HEAD_DEFAULTS))
        if unknown:
            raise ConfigError(f"mlp/config.json: unknown key(s) {unknown}")
        v = {k: d.get(k, default) for k, default in _HEAD_DEFAULTS.items()}
        return cls(diffusion_c_input_dim=int(v["diffusion_c_input_dim"]),
                   img_gen_scales=tuple(int(s) for s in v["img_gen_scales"]), dit_type=str(v["dit_type"]),
                   use_identity_mlp=bool(v["use_identity_mlp"]), text_encoder_norm=bool(v["text_encoder_norm"]))

    def to_official(self) -> dict[str, Any]:
        return {"diffusion_c_input_dim": self.diffusion_c_input_dim, "img_gen_scales": list(self.img_gen_scales),
                "dit_type": self.dit_type, "use_identity_mlp": self.use_identity_mlp,
                "text_encoder_norm": self.text_encoder_norm}


# scheduler_config.json keys of diffusers' FlowMatchEulerDiscreteScheduler, with the class defaults (diffusers 0.36).
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
                           shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                           use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)
_SCHEDULER_IGNORED = frozenset({"_class_name", "_diffusers_version"})
# Options we refuse (with their off value): the release's scheduler uses none of them.
_SCHEDULER_UNSUPPORTED = dict(invert_sigmas=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                              use_beta_sigmas=False, stochastic_sampling=False)


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """The sigma schedule of the flow-matching Euler sampler (diffusers' FlowMatchEulerDiscreteScheduler keys)."""

    num_train_timesteps: int = 1000
    shift: float = 3.0  # the static shift of the scheduler file Z-Image ships (diffusers' class default is 1.0)
    use_dynamic_shifting: bool = False  # True: resolution-dependent shift mu(image tokens) instead of `shift`
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    def __post_init__(self):
        problems = []
        if self.num_train_timesteps <= 0:
            problems.append(f"num_train_timesteps={self.num_train_timesteps} must be positive")
        if self.shift <= 0:
            problems.append(f"shift={self.shift} must be positive")
        if self.time_shift_type not in ("exponential", "linear"):
            problems.append(f"time_shift_type={self.time_shift_type!r} (exponential or linear)")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            problems.append(f"shift_terminal={self.shift_terminal} must lie in [0, 1)")
        if self.max_image_seq_len == self.base_image_seq_len:
            problems.append("max_image_seq_len == base_image_seq_len leaves the dynamic shift undefined")
        if problems:
            raise ConfigError("FlowMatchConfig: " + "; ".join(problems))

    def replace(self, **overrides) -> "FlowMatchConfig":
        return replace(self, **overrides)

    @classmethod
    def from_official(cls, d: Mapping[str, Any]) -> "FlowMatchConfig":
        section = "scheduler_config.json"
        unknown = sorted(set(d) - set(_SCHEDULER_DEFAULTS) - _SCHEDULER_IGNORED)
        if unknown:
            raise ConfigError(f"{section}: unknown key(s) {unknown}")
        if d.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            raise ConfigError(f"{section}: _class_name={d['_class_name']!r}; only FlowMatchEulerDiscreteScheduler "
                              f"is implemented")
        on = sorted(k for k, off in _SCHEDULER_UNSUPPORTED.items() if d.get(k, off) != off)
        if on:
            raise ConfigError(f"{section}: {on} not implemented (the release's scheduler uses none of them)")
        v = {k: d.get(k, _SCHEDULER_DEFAULTS[k]) for k in
             ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
              "max_image_seq_len", "shift_terminal", "time_shift_type")}
        return cls(**v)

    def to_official(self) -> dict[str, Any]:
        out = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
        out.update(_SCHEDULER_DEFAULTS)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return out


@dataclasses.dataclass(frozen=True)
class ImageGenConfig:
    """The whole image-generation path below the thinker."""

    head: ImageGenHeadConfig
    connector: Qwen2Config
    dit: DiTConfig
    vae: VAEConfig
    scheduler: FlowMatchConfig = FlowMatchConfig()

    def __post_init__(self):
        problems = []
        if self.head.caption_dim != self.dit.cap_feat_dim:
            problems.append(f"the caption width {self.head.caption_dim} (mlp/config.json) != the DiT's cap_feat_dim "
                            f"{self.dit.cap_feat_dim}")
        if self.vae.latent_channels != self.dit.in_channels:
            problems.append(f"the VAE's latent_channels {self.vae.latent_channels} != the DiT's in_channels "
                            f"{self.dit.in_channels}")
        if problems:
            raise ConfigError("ImageGenConfig: " + "; ".join(problems))

    def replace(self, **overrides) -> "ImageGenConfig":
        return replace(self, **overrides)

    @classmethod
    def tiny(cls, **override) -> "ImageGenConfig":
        dit = DiTConfig.tiny()
        parts = dict(head=ImageGenHeadConfig(diffusion_c_input_dim=dit.cap_feat_dim, img_gen_scales=(4,)),
                     connector=Qwen2Config.tiny(), dit=dit, vae=VAEConfig.tiny(latent_channels=dit.in_channels))
        parts.update(override)
        return cls(**parts)

    @classmethod
    def from_official(cls, sections: Mapping[str, Mapping[str, Any]]) -> "ImageGenConfig":
        """sections: {"mlp": mlp/config.json, "connector": ..., "transformer": ..., "vae": ..., "scheduler":
        scheduler/scheduler_config.json}; every one is required, as the release's loaders require them."""
        missing = [k for k in ("mlp", "connector", "transformer", "vae", "scheduler") if k not in sections]
        if missing:
            raise ConfigError(f"image generation needs the release sub-folders {missing} (their config files)")
        return cls(head=ImageGenHeadConfig.from_official(sections["mlp"]),
                   connector=Qwen2Config.from_official(sections["connector"], "connector/config.json"),
                   dit=DiTConfig.from_official(sections["transformer"]),
                   vae=VAEConfig.from_official(sections["vae"]),
                   scheduler=FlowMatchConfig.from_official(sections["scheduler"]))

    def to_official(self) -> dict[str, dict[str, Any]]:
        return {"mlp": self.head.to_official(), "connector": self.connector.to_official(),
                "transformer": self.dit.to_official(), "vae": self.vae.to_official(),
                "scheduler": self.scheduler.to_official()}
