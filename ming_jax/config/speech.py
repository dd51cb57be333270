"""Config of the speech-generation component: the talker and its AudioVAE, as the release's `talker/` folder holds
them.

    talker/config.json          the talker (`TalkerConfig`: flow head, aggregator, steps, patch sizes)
    talker/llm/config.json      its Qwen2 LM (read into `TalkerConfig.llm`)
    talker/vae/config.json      the AudioVAE (`AudioVAEConfig`) that turns latents into 44.1 kHz audio

`SpeechConfig.from_official(sections)` takes the three dicts under the keys "talker", "llm" and "vae"
(`ming_jax.checkpoint.folders.talker_sections` reads them) and checks that the two halves fit each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.audio_vae import AudioVAEConfig
from ming_jax.config.base import ConfigError
from ming_jax.config.talker import TalkerConfig

SECTIONS = ("talker", "llm", "vae")


@dataclasses.dataclass(frozen=True)
class SpeechConfig:
    talker: TalkerConfig
    vae: AudioVAEConfig

    def __post_init__(self):
        problems = []
        if self.vae.encoder.latent_dim != self.talker.latent_dim:
            problems.append(f"the VAE encoder's latent_dim={self.vae.encoder.latent_dim} != the talker's "
                            f"latent_dim={self.talker.latent_dim}")
        if self.vae.decoder.latent_dim != self.talker.latent_dim:
            problems.append(f"the VAE decoder's latent_dim={self.vae.decoder.latent_dim} != the talker's "
                            f"latent_dim={self.talker.latent_dim}")
        if problems:
            raise ConfigError("SpeechConfig: " + "; ".join(problems))

    @classmethod
    def tiny(cls, **override) -> "SpeechConfig":
        talker = TalkerConfig.tiny()
        vae = AudioVAEConfig.tiny()
        vae = vae.replace(encoder=dataclasses.replace(vae.encoder, latent_dim=talker.latent_dim),
                          decoder=dataclasses.replace(vae.decoder, latent_dim=talker.latent_dim))
        return dataclasses.replace(cls(talker=talker, vae=vae), **override)

    @classmethod
    def ming_flash_omni_2(cls, **override) -> "SpeechConfig":
        """The release's talker and AudioVAE (their presets say which values are confirmed and which inferred)."""
        return dataclasses.replace(cls(talker=TalkerConfig.ming_flash_omni_2(), vae=AudioVAEConfig.ming_flash_omni_2()),
                                   **override)

    @classmethod
    def from_official(cls, sections: Mapping[str, Mapping[str, Any]]) -> "SpeechConfig":
        missing = [k for k in SECTIONS if not isinstance(sections.get(k), Mapping)]
        if missing:
            raise ConfigError(f"speech config: section(s) {missing} missing (talker/config.json, "
                              f"talker/llm/config.json, talker/vae/config.json)")
        return cls(talker=TalkerConfig.from_official(sections["talker"], llm=sections["llm"]),
                   vae=AudioVAEConfig.from_official(sections["vae"]))

    def to_official(self) -> dict[str, dict[str, Any]]:
        talker = self.talker.to_official()
        llm = talker.pop("talker_llm_config")
        return {"talker": talker, "llm": llm, "vae": self.vae.to_official()}
