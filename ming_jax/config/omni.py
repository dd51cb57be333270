"""Config of the whole omni model (official `BailingMM2Config`): the LLM, the vision tower, the audio tower, and the
depth of the two projectors that carry the towers' outputs into the LLM's embedding space.

Official layout (`config.json`): top-level `mlp_depth`, `model_type = "bailingmm_moe_v2_lite"` and one section per
sub-model (`llm_config`, `vision_config`, `audio_config`). A null `vision_config` / `audio_config` means the release
was built without that tower; we read that as `None` and the omni model then has no such tower.

Two numbers are shared between sections and must agree, which `__post_init__` checks: the projectors' depth
(`mlp_depth`, also kept in `AudioConfig.mlp_depth`) and their output width (the LLM's `hidden_size`, also
`AudioConfig.out_dim`). The vision projector's input width is the tower's `out_hidden_size`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.audio import AudioConfig
from ming_jax.config.base import ConfigError, check_keys, replace
from ming_jax.config.llm import check_quantization_config
from ming_jax.config.llm import LLMConfig
from ming_jax.config.vision import VisionConfig

MODEL_TYPE = "bailingmm_moe_v2_lite"
ARCHITECTURE = "BailingMM2NativeForConditionalGeneration"
_SECTIONS = ("llm_config", "vision_config", "audio_config")
# Top-level keys of a config.json dump that are bookkeeping of the release, not part of the network.
_BOOKKEEPING = frozenset({"architectures", "auto_map", "model_type", "torch_dtype", "transformers_version"})


@dataclasses.dataclass(frozen=True)
class OmniConfig:
    llm: LLMConfig
    vision: VisionConfig | None
    audio: AudioConfig | None
    mlp_depth: int = 2  # Linear / (GELU, Linear) stages of both projectors (official default 1; the release: 2)

    def __post_init__(self):
        problems = []
        if not isinstance(self.llm, LLMConfig):
            problems.append(f"llm must be an LLMConfig, got {type(self.llm).__name__}")
        if self.vision is not None and not isinstance(self.vision, VisionConfig):
            problems.append(f"vision must be a VisionConfig or None, got {type(self.vision).__name__}")
        if self.audio is not None and not isinstance(self.audio, AudioConfig):
            problems.append(f"audio must be an AudioConfig or None, got {type(self.audio).__name__}")
        if problems:
            raise ConfigError("OmniConfig: " + "; ".join(problems))
        if self.mlp_depth < 1:
            problems.append(f"mlp_depth={self.mlp_depth} must be >= 1")
        if self.audio is not None:
            if self.audio.out_dim != self.llm.hidden_size:
                problems.append(f"audio projector width out_dim={self.audio.out_dim} != LLM hidden_size="
                                f"{self.llm.hidden_size}")
            if self.audio.mlp_depth != self.mlp_depth:
                problems.append(f"audio.mlp_depth={self.audio.mlp_depth} != mlp_depth={self.mlp_depth} (the release "
                                "builds both projectors from the one top-level mlp_depth)")
        if self.vision is not None:
            if self.vision.spatial_merge_size != self.llm.spatial_merge_size:
                problems.append(f"vision spatial_merge_size={self.vision.spatial_merge_size} != the LLM's "
                                f"{self.llm.spatial_merge_size} (video-rope positions assume the tower's merge)")
            missing = [k for k in ("image_patch_token", "video_patch_token", "image_start_token")
                       if getattr(self.llm, k) is None]
            if missing:
                problems.append(f"a vision tower needs the LLM's placeholder ids {missing}")
        if problems:
            raise ConfigError("OmniConfig: " + "; ".join(problems))

    def replace(self, **overrides) -> "OmniConfig":
        """`replace` where `llm` / `vision` / `audio` may also be dicts of overrides for that component. A new LLM
        width or `mlp_depth` is carried into the audio tower's copy of them unless an `AudioConfig` is passed too."""
        explicit_audio = isinstance(overrides.get("audio"), AudioConfig)
        for name in ("llm", "vision", "audio"):
            if isinstance(overrides.get(name), Mapping):
                current = getattr(self, name)
                if current is None:
                    raise ConfigError(f"OmniConfig: cannot override fields of the absent {name} tower")
                overrides[name] = current.replace(**overrides[name])
        audio = overrides.get("audio", self.audio)
        if audio is not None and not explicit_audio and ("llm" in overrides or "mlp_depth" in overrides):
            llm = overrides.get("llm", self.llm)
            overrides["audio"] = audio.replace(out_dim=llm.hidden_size,
                                               mlp_depth=overrides.get("mlp_depth", self.mlp_depth))
        return replace(self, **overrides)

    # --- official config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any]) -> "OmniConfig":
        """Read a whole official omni `config.json` dict (strict at every level). Dtypes and kernels are run
        settings (`ming_jax.config.runtime.Runtime`), not part of this config."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"omni config must be a dict, got {type(d).__name__}")
        check_keys(d, set(_SECTIONS) | {"mlp_depth", "quantization_config"} | _BOOKKEEPING, "config.json")
        check_quantization_config(d, "config.json")
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"config.json: model_type={d['model_type']!r}, expected {MODEL_TYPE!r}")
        if not isinstance(d.get("llm_config"), Mapping):
            raise ConfigError("config.json: required section 'llm_config' is missing or not a dict")
        llm = LLMConfig.from_official(d["llm_config"])
        vision = VisionConfig.from_official(d["vision_config"]) if d.get("vision_config") else None
        audio = AudioConfig.from_official(d) if d.get("audio_config") else None
        cfg = cls(llm=llm, vision=vision, audio=audio, mlp_depth=int(d.get("mlp_depth", 1)))
        return cfg

    def to_official(self) -> dict[str, Any]:
        """The official config.json dict (model keys of every section)."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "mlp_depth": self.mlp_depth,
            "llm_config": self.llm.to_official(),
            "vision_config": None if self.vision is None else self.vision.to_official(),
            "audio_config": None if self.audio is None else self.audio.to_official(),
        }

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def ming_flash_omni_2(cls, **overrides) -> "OmniConfig":
        """Ming-flash-omni 2.0 (the numbers of the release's config.json; run it with `Runtime.bf16()`)."""
        base = cls(llm=LLMConfig.ming_flash_omni_2(), vision=VisionConfig.ming_flash_omni_2(),
                   audio=AudioConfig.ming_flash_omni_2(mlp_depth=2), mlp_depth=2)
        return base.replace(**overrides) if overrides else base

    @classmethod
    def tiny(cls, **overrides) -> "OmniConfig":
        """A few-MB omni model with every feature of the full one: the golden `full_mm_forward` sizes, except a
        longer audio position table (n_ctx 1500, i.e. 30 s clips instead of 6 s) so real recordings fit.

        The audio tower takes 128 mel bins, the width the release's whisper front end produces."""
        audio = AudioConfig.tiny(n_mels=128, n_ctx=1500, n_state=64, n_head=4, n_layer=2, out_dim=128, mlp_depth=2)
        base = cls(llm=LLMConfig.tiny(), vision=VisionConfig.tiny(), audio=audio, mlp_depth=2)
        return base.replace(**overrides) if overrides else base


PRESETS = {"ming-flash-omni-2.0": OmniConfig.ming_flash_omni_2, "tiny": OmniConfig.tiny}
