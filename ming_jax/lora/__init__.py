"""LoRA / QLoRA adapters on the language model (`model.py`: config, add / merge / unmerge / remove) and their export
in PEFT's safetensors naming (`peft.py`). The adapted weight itself is `ming_jax.layers.params.LoraWeight`, read
through the one weight-read site."""

from ming_jax.lora.model import (DEFAULT_TARGETS, RANK_AXIS, TARGET_PRESETS, LoraConfig, Target, adapters, add_lora,
                                 config_of, lora_state, merge_lora, param_count, plan, remove_lora, unmerge_lora)
from ming_jax.lora.peft import export_peft, peft_tensors

__all__ = ["DEFAULT_TARGETS", "RANK_AXIS", "TARGET_PRESETS", "LoraConfig", "Target", "adapters", "add_lora",
           "config_of", "export_peft", "lora_state", "merge_lora", "param_count", "peft_tensors", "plan",
           "remove_lora", "unmerge_lora"]
