"""Run settings, apart from the architecture: dtypes, kernel implementations, remat, layer scanning, expert
parallelism. One object for every tower, one vocabulary per choice; the architecture configs (`LLMConfig`,
`VisionConfig`, `AudioConfig`, `OmniConfig`) hold only what an official config.json says.

    rt = Runtime(dtype="bfloat16", param_dtype="bfloat16", remat=True)
    model = ming_jax.models.llm.create(LLMConfig.tiny(), runtime=rt)

The implementation names are the ones the kernel folders' `api.py` accept (`ming_jax.pallas.attention.api`,
`ming_jax.pallas.gmm.api` take their lists from here).
"""

from __future__ import annotations

import dataclasses

from ming_jax.config.base import ConfigError, replace

DTYPES = ("float32", "bfloat16", "float16")  # activation / compute dtypes
PARAM_DTYPES = ("float32", "bfloat16")
# Attention backends: splash (Pallas TPU kernel), cudnn (GPU flash attention), xla (the reference: any mask).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
# Grouped-matmul backends of the routed experts: pallas (TPU kernels), portable (chunked per-expert dots, any
# backend: what "auto" picks off TPU), xla (jax.lax.ragged_dot, dense off TPU: for comparison only).
GMM_IMPLEMENTATIONS = ("auto", "xla", "pallas", "portable")
# Expert parallelism under an active mesh: "auto" (when the mesh's experts axis is > 1: the ragged exchange on
# TPU / GPU, the padded one on CPU), "off", or "ragged" / "padded" to force that exchange.
EXPERT_PARALLEL_MODES = ("auto", "off", "ragged", "padded")


@dataclasses.dataclass(frozen=True)
class Runtime:
    dtype: str = "float32"  # activations and compute (matmul inputs); softmax, norms and routing stay float32
    param_dtype: str = "float32"  # parameters as stored on device (router expert biases are always float32)
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
    gmm: str = "auto"  # one of GMM_IMPLEMENTATIONS
    remat: bool = False  # recompute each scanned layer's activations in the backward pass
    scan_layers: bool = True  # False: the stacked MoE layers run as a Python loop (same parameters; for qwix)
    expert_parallel: str = "auto"  # one of EXPERT_PARALLEL_MODES
    capacity_factor: float | None = None  # expert-parallel path: rows per expert <= factor x mean; None: dropless

    def __post_init__(self):
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} (supported: {', '.join(DTYPES)})")
        if self.param_dtype not in PARAM_DTYPES:
            problems.append(f"param_dtype={self.param_dtype!r} (supported: {', '.join(PARAM_DTYPES)})")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention={self.attention!r} (known: {', '.join(ATTENTION_IMPLEMENTATIONS)})")
        if self.gmm not in GMM_IMPLEMENTATIONS:
            problems.append(f"gmm={self.gmm!r} (known: {', '.join(GMM_IMPLEMENTATIONS)})")
        if self.expert_parallel not in EXPERT_PARALLEL_MODES:
            problems.append(f"expert_parallel={self.expert_parallel!r} (known: {', '.join(EXPERT_PARALLEL_MODES)})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            problems.append(f"capacity_factor={self.capacity_factor} must be > 0 (None: dropless)")
        if problems:
            raise ConfigError("Runtime: " + "; ".join(problems))

    def replace(self, **overrides) -> "Runtime":
        return replace(self, **overrides)

    @classmethod
    def bf16(cls, **overrides) -> "Runtime":
        """bfloat16 parameters and compute: what the release ships (`torch_dtype: bfloat16`)."""
        return cls(**dict(dict(dtype="bfloat16", param_dtype="bfloat16"), **overrides))
