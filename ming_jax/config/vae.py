"""Config of the image VAE: a diffusers `AutoencoderKL` in the Flux.1 layout, which Ming-flash-omni 2.0 uses to decode
generated image latents and to encode reference images for editing (release folder `vae/`).

The official file is a diffusers `config.json` (the constructor arguments of `AutoencoderKL` plus `_class_name`,
`_diffusers_version` and friends). We read the keys that change the computation and refuse every other key, and we
refuse values of known keys whose branch we do not implement (other block types, activations, latents_mean / std).

Two keys are read but change nothing here, on purpose:
  * `sample_size`: diffusers uses it only to pick tile sizes for tiled encode / decode, which we do not implement
    (the decode of one image is one static-shape program);
  * `force_upcast`: a hint to diffusers pipelines to run the VAE in float32 when the rest runs in float16; the
    compute dtype here is the caller's `Runtime.dtype`, so honouring the hint is the caller's choice.
Both are kept so that `to_official()` writes back what was read.

Channel plan (the same numbers drive the modules and the weight table, so they live here, below both):
  encoder  conv_in 3 -> c[0]; block i: layers_per_block resnets c[i-1] -> c[i] (block 0: c[0] -> c[0]), a stride-2
           downsample after every block but the last; mid block at c[-1]; conv_out c[-1] -> 2 * latent_channels
  decoder  conv_in latent -> c[-1]; mid block; block i over reversed(c): layers_per_block + 1 resnets, a nearest x2
           upsample after every block but the last; conv_out c[0] -> out_channels
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, check_keys, replace

# Bookkeeping keys diffusers writes into every config.json; none of them changes the network.
_DIFFUSERS_BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"})
_CLASS_NAME = "AutoencoderKL"

# Activations diffusers' `get_activation` maps to SiLU (it names the same function twice).
SILU_ACTS = frozenset({"silu", "swish"})
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"

# Defaults of diffusers' AutoencoderKL constructor (0.36); a saved config carries every key, so these only fill
# hand-written dicts.
_OFFICIAL_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=(DOWN_BLOCK,), up_block_types=(UP_BLOCK,),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...]  # widths of the resolution levels, finest first
    latent_channels: int
    layers_per_block: int  # resnets per encoder block (decoder blocks hold one more)
    norm_num_groups: int
    scaling_factor: float  # DiT-space latents = (z - shift) * scaling
    shift_factor: float | None = None  # None: no shift (SD-style VAEs); the Flux VAE has one
    in_channels: int = 3
    out_channels: int = 3
    act_fn: str = "silu"
    down_block_types: tuple[str, ...] | None = None  # None: DownEncoderBlock2D at every level
    up_block_types: tuple[str, ...] | None = None  # None: UpDecoderBlock2D at every level
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True  # 1x1 conv on the encoder's moments (2 * latent channels)
    use_post_quant_conv: bool = True  # 1x1 conv on the decoder's input latents
    latents_mean: tuple[float, ...] | None = None  # not implemented: must be None
    latents_std: tuple[float, ...] | None = None  # not implemented: must be None
    force_upcast: bool = True  # read and written back, not acted on (module docstring)
    sample_size: int | tuple[int, ...] = 32  # tiling only: ignored (module docstring)
    # Fixed by diffusers' Encoder / Decoder (every GroupNorm of the VAE); kept as a field, not an official key.
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types", "latents_mean", "latents_std",
                     "sample_size"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        n = len(self.block_out_channels)
        if self.down_block_types is None:
            object.__setattr__(self, "down_block_types", (DOWN_BLOCK,) * n)
        if self.up_block_types is None:
            object.__setattr__(self, "up_block_types", (UP_BLOCK,) * n)
        problems = self._problems()
        if problems:
            raise ConfigError("VAEConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p = []
        if not self.block_out_channels:
            p.append("block_out_channels is empty")
        for name in ("latent_channels", "layers_per_block", "norm_num_groups", "in_channels", "out_channels"):
            if getattr(self, name) <= 0:
                p.append(f"{name}={getattr(self, name)} must be positive")
        bad = [c for c in self.block_out_channels if c <= 0 or (self.norm_num_groups > 0 and c % self.norm_num_groups)]
        if bad:
            p.append(f"block_out_channels {list(self.block_out_channels)}: {bad} not positive multiples of "
                     f"norm_num_groups={self.norm_num_groups} (every level is group-normalised)")
        for name, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, name)
            if len(types) != len(self.block_out_channels):
                p.append(f"{name} has {len(types)} entries, block_out_channels {len(self.block_out_channels)}")
            others = sorted(set(types) - {kind})
            if others:
                p.append(f"{name} {others}: only {kind} is implemented")
        if self.act_fn not in SILU_ACTS:
            p.append(f"act_fn={self.act_fn!r} (supported: {', '.join(sorted(SILU_ACTS))})")
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                p.append(f"{name} is set: per-channel latent statistics are not implemented (the Flux VAE has "
                         f"none; it uses scaling_factor / shift_factor)")
        if not self.scaling_factor:
            p.append(f"scaling_factor={self.scaling_factor} must be non-zero (decode divides by it)")
        return p

    # --- derived sizes ---------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (one stride-2 downsample per level but the last)."""
        return 2 ** (self.num_levels - 1)

    @property
    def shift(self) -> float:
        """The shift as a number: None (no shift) is 0."""
        return 0.0 if self.shift_factor is None else float(self.shift_factor)

    @property
    def encoder_out_channels(self) -> int:
        """The encoder emits mean and log-variance stacked on channels."""
        return 2 * self.latent_channels

    def down_block_channels(self) -> tuple[tuple[int, int], ...]:
        """(input, output) width of each encoder block, finest first."""
        c = self.block_out_channels
        return tuple((c[max(i - 1, 0)], c[i]) for i in range(len(c)))

    def up_block_channels(self) -> tuple[tuple[int, int], ...]:
        """(input, output) width of each decoder block, coarsest first."""
        r = self.block_out_channels[::-1]
        return tuple((r[max(i - 1, 0)], r[i]) for i in range(len(r)))

    def replace(self, **overrides) -> "VAEConfig":
        return replace(self, **overrides)

    # --- official config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any], **overrides) -> "VAEConfig":
        """Read a diffusers AutoencoderKL `config.json` dict (strict: unknown keys raise `ConfigError`)."""
        section = "vae config"
        check_keys(d, set(_OFFICIAL_DEFAULTS) | _DIFFUSERS_BOOKKEEPING, section)
        if d.get("_class_name", _CLASS_NAME) != _CLASS_NAME:
            raise ConfigError(f"{section}: _class_name={d['_class_name']!r}, expected {_CLASS_NAME!r}")
        v = {k: d.get(k, default) for k, default in _OFFICIAL_DEFAULTS.items()}
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            if not isinstance(v[k], (list, tuple)):
                raise ConfigError(f"{section}: {k}={v[k]!r} is not a list")
            v[k] = tuple(v[k])
        v.update(overrides)
        return cls(**v)

    def to_official(self) -> dict[str, Any]:
        """The diffusers config dict (constructor keys and `_class_name`)."""
        listed = lambda t: None if t is None else list(t)  # noqa: E731
        return {
            "_class_name": _CLASS_NAME,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": self.act_fn,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": listed(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": listed(self.latents_mean),
            "latents_std": listed(self.latents_std),
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def flux(cls, **overrides) -> "VAEConfig":
        """The Flux.1 VAE (16 latent channels, x8 downsampling, ~84M parameters) with the release's scaling /
        shift. The release's own vae/config.json is not public; this is the layout its weights name."""
        kw = dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=True, sample_size=1024,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """The Flux layout at tiny widths (the golden `image_vae` sizes): 3 levels, x4 downsampling."""
        kw = dict(
            block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=True,
        )
        kw.update(overrides)
        return cls(**kw)


PRESETS = {"flux": VAEConfig.flux, "tiny": VAEConfig.tiny}
