"""Config dataclasses: one per sub-model, read strictly from the official config.json sections."""

from ming_jax.config.base import ConfigError
from ming_jax.config.llm import LLMConfig

__all__ = ["ConfigError", "LLMConfig"]
