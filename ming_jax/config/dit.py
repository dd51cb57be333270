"""Config of the Z-Image DiT, the image-generation transformer of Ming-flash-omni 2.0 (official
`diffusion/transformer_z_image.ZImageTransformer2DModel`, whose constructor arguments are exactly the keys of the
release's `transformer/config.json`).

Where the numbers come from:
* Field defaults = the official constructor's defaults (the same in diffusers 0.36's `ZImageTransformer2DModel`):
  patch 2 / frame patch 1, in_channels 16, dim 3840, 30 layers, 2 refiner layers, 30 heads (30 kv heads), eps 1e-5,
  qk_norm, cap_feat_dim 2560, rope theta 256, t_scale 1000, axes_dims (32, 48, 48), axes_lens (1024, 512, 512).
* `z_image()` = those defaults except axes_lens (1536, 512, 512), the value of the `transformer/config.json` that
  Tongyi-MAI/Z-Image-Turbo publishes (as quoted by several public ports; the Ming source snapshot does not carry a
  transformer config, so this is the one number taken from outside the official code). axes_lens only bounds the
  rope tables, so it limits the caption length + frames (axis 0) and the latent grid (axes 1, 2), nothing else.
* The trailing fields are constants the official code hard-codes (not config keys): the sequence multiple 32, the
  adaLN width cap 256, the timestep MLP (256 sinusoid channels, hidden 1024, max period 1e4), the q/k RMSNorm eps
  1e-5 (fixed inside the attention, whatever norm_eps says) and the final LayerNorm eps 1e-6.

`n_kv_heads` is read and written back but changes nothing: the official attention builds k / v with `n_heads` heads
(diffusers' `Attention(heads=n_heads)`), so a config with fewer kv heads still has full-width k / v projections.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, check_keys, replace

# The official class; diffusers' `ConfigMixin` dumps it with its own bookkeeping keys.
CLASS_NAME = "ZImageTransformer2DModel"
_DIFFUSERS_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})

# Official constructor defaults (= the keys a config.json may hold).
_OFFICIAL_DEFAULTS = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512),
)
_TUPLES = ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    all_patch_size: tuple[int, ...] = (2,)  # spatial patch of each (patch, frame patch) pair, zipped with the next
    all_f_patch_size: tuple[int, ...] = (1,)  # frame patch of each pair; each pair has its own embedder / final layer
    in_channels: int = 16  # latent channels (= output channels)
    dim: int = 3840
    n_layers: int = 30  # main (joint image + caption) blocks
    n_refiner_layers: int = 2  # noise refiner (image, modulated) and context refiner (caption, unmodulated) each
    n_heads: int = 30
    n_kv_heads: int = 30  # unused by the official attention (see the module docstring)
    norm_eps: float = 1e-5  # the blocks' RMSNorms and the caption embedder's RMSNorm
    qk_norm: bool = True  # per-head RMSNorm of q and k before the rotary embedding
    cap_feat_dim: int = 2560  # width of the caption features the condition path delivers
    rope_theta: float = 256.0
    t_scale: float = 1000.0  # the model time t (= 1 - sigma) is multiplied by this before the sinusoid
    axes_dims: tuple[int, int, int] = (32, 48, 48)  # rotary channels per position axis (frame, row, column)
    axes_lens: tuple[int, int, int] = (1024, 512, 512)  # rope table length per axis: positions must stay below
    # Constants of the official code (not config keys).
    seq_multiple: int = 32  # both streams are padded to a multiple of this (SEQ_MULTI_OF)
    adaln_embed_dim: int = 256  # the time embedding is min(dim, this) wide (ADALN_EMBED_DIM)
    t_freq_dim: int = 256  # sinusoid channels of the timestep embedder
    t_mid_dim: int = 1024  # hidden width of the timestep MLP
    t_max_period: float = 10000.0
    qk_norm_eps: float = 1e-5
    final_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in _TUPLES:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        problems = []
        for name in ("in_channels", "dim", "n_heads", "n_kv_heads", "cap_feat_dim", "seq_multiple",
                     "adaln_embed_dim", "t_freq_dim", "t_mid_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        for name in ("n_layers", "n_refiner_layers"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("norm_eps", "rope_theta", "t_max_period", "qk_norm_eps", "final_norm_eps"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if len(self.all_patch_size) != len(self.all_f_patch_size) or not self.all_patch_size:
            problems.append(f"all_patch_size {list(self.all_patch_size)} and all_f_patch_size "
                            f"{list(self.all_f_patch_size)} must be non-empty and of equal length (they are zipped)")
        elif any(p <= 0 for p in self.all_patch_size + self.all_f_patch_size):
            problems.append(f"patch sizes {list(self.all_patch_size)} / {list(self.all_f_patch_size)} must be positive")
        elif len(set(self.patch_pairs)) != len(self.patch_pairs):
            problems.append(f"(patch, frame patch) pairs {list(self.patch_pairs)} repeat (each names one embedder)")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            problems.append(f"axes_dims {list(self.axes_dims)} and axes_lens {list(self.axes_lens)} must have 3 "
                            f"entries (frame, row, column positions)")
        else:
            if any(d <= 0 or d % 2 for d in self.axes_dims):
                problems.append(f"axes_dims {list(self.axes_dims)} must be positive and even (rotary pairs)")
            if any(n <= 0 for n in self.axes_lens):
                problems.append(f"axes_lens {list(self.axes_lens)} must be positive")
        if self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        elif self.n_heads > 0 and len(self.axes_dims) == 3 and sum(self.axes_dims) != self.head_dim:
            problems.append(f"sum(axes_dims)={sum(self.axes_dims)} != head_dim={self.head_dim} (the rotary "
                            f"embedding covers each head exactly)")
        if problems:
            raise ConfigError("DiTConfig: " + "; ".join(problems))

    # --- derived sizes ---------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU width: the official `int(dim / 3 * 8)` (float arithmetic, truncated: 170 for dim 64)."""
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, self.adaln_embed_dim)

    @property
    def patch_pairs(self) -> tuple[tuple[int, int], ...]:
        """(patch, frame patch) pairs, in config order (the embedder / final layer index)."""
        return tuple(zip(self.all_patch_size, self.all_f_patch_size))

    def patch_dim(self, patch: int, f_patch: int) -> int:
        """Width of one patchified token: f_patch * patch * patch * in_channels."""
        return f_patch * patch * patch * self.in_channels

    def replace(self, **overrides) -> "DiTConfig":
        return replace(self, **overrides)

    # --- official config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any], **overrides) -> "DiTConfig":
        """Read the official constructor kwargs / `transformer/config.json`; unknown keys are a `ConfigError`."""
        section = "transformer config"
        check_keys(d, set(_OFFICIAL_DEFAULTS) | _DIFFUSERS_KEYS, section)
        if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ConfigError(f"{section}: _class_name={d['_class_name']!r}, expected {CLASS_NAME!r}")
        v = {k: d.get(k, default) for k, default in _OFFICIAL_DEFAULTS.items()}
        for name in _TUPLES:
            if not isinstance(v[name], (list, tuple)):
                raise ConfigError(f"{section}: {name}={v[name]!r} is not a list")
            v[name] = tuple(int(x) for x in v[name])
        for name in ("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim"):
            v[name] = int(v[name])
        for name in ("norm_eps", "rope_theta", "t_scale"):
            v[name] = float(v[name])
        v["qk_norm"] = bool(v["qk_norm"])
        v.update(overrides)
        return cls(**v)

    def to_official(self) -> dict[str, Any]:
        """The official constructor kwargs (what `transformer/config.json` holds, without diffusers bookkeeping)."""
        out = {k: getattr(self, k) for k in _OFFICIAL_DEFAULTS}
        for name in _TUPLES:
            out[name] = list(out[name])
        return out

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def z_image(cls, **overrides) -> "DiTConfig":
        """The full-size Z-Image DiT (~6B parameters): official defaults, axes_lens of Z-Image-Turbo's config."""
        kw = dict(_OFFICIAL_DEFAULTS, axes_lens=(1536, 512, 512))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "DiTConfig":
        """A ~0.6M-parameter DiT with every feature of the full one (the golden `image_dit` sizes)."""
        kw = dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=(8, 12, 12), axes_lens=(256, 64, 64),
        )
        kw.update(overrides)
        return cls(**kw)


PRESETS = {"z-image": DiTConfig.z_image, "tiny": DiTConfig.tiny}
