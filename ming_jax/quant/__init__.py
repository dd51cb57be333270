"""Weight-only int8 / fp8 quantization of the language model (`model.py`); the quantized grouped matmuls are in
`ming_jax.pallas.gmm` (`quant.py`), the quantized checkpoints in `ming_jax.checkpoint`."""

from ming_jax.quant.model import (COMPONENTS, LLM_RULES, QTYPES, QuantConfig, Rule, Target, config_of, plan,
                                  manifest_entry, quantize_model, quantize_slot, target_of,
                                  weight_bytes)

__all__ = ["COMPONENTS", "LLM_RULES", "QTYPES", "QuantConfig", "Rule", "Target", "config_of", "plan",
           "manifest_entry", "quantize_model", "quantize_slot", "target_of", "weight_bytes"]
