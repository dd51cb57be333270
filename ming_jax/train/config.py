"""What a training run optimises and how: the optimizer, its schedule, the loss terms, MoE balancing, which
parameters train. The architecture stays in `ming_jax.config` and the run settings of the kernels (dtypes, remat,
gmm / attention implementations) in `ming_jax.config.runtime.Runtime`; data, mesh and paths are the CLI's
(`ming_jax.cli.train`, `configs/train/*.flags`).

    cfg = TrainConfig(learning_rate=3e-4, warmup_steps=100, total_steps=10_000, grad_accum=4)
"""

from __future__ import annotations

import dataclasses
import re

from ming_jax.config.base import ConfigError, replace

# Default bias-update rate of the auxiliary-loss-free balancing (`expert_bias`): 1e-3, the gamma of the
# DeepSeek-V3 technical report (arXiv 2412.19437, section 2.1.2, "bias update speed 0.001" for most of
# pre-training) and the `bias_update_coeff` the release's `BailingMoeV2Gate` holds (its `update_bias` rule:
# bias += coeff * sign(mean load - load)). The Ling 2.0 report (arXiv 2510.22115) keeps this loss-free scheme.
BIAS_UPDATE_RATE = 1e-3
# Expert biases never take gradients or weight decay: only the balancing rule writes them.
NEVER_TRAINED = (r"expert_bias$",)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # optimizer: optax AdamW with linear warmup then cosine decay to `final_lr_ratio` x peak
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only (>= 2-D per layer); norms, biases and expert biases are not decayed
    max_grad_norm: float | None = 1.0  # global-norm clipping (None: off)
    # loss
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) over the loss tokens (PaLM: 1e-4)
    loss_chunk: int = 512  # tokens per chunk of the chunked cross-entropy (no [B, T, V] logits)
    grad_accum: int = 1  # micro-batches per step: the batch's rows are split in this many, gradients summed
    # MoE balancing (per MoE layer and router): bias_e += rate * sign(mean_e' load - load_e) after each step
    bias_update_rate: float = BIAS_UPDATE_RATE  # 0: off
    seq_aux_loss: float = 0.0  # alpha of the sequence-wise balance loss (DeepSeek-V3 eq. 17-20; 0: off)
    # which parameters train: regexes over '/'-joined parameter paths (e.g. "llm/embed", "moe/router/kernel")
    freeze: tuple[str, ...] = ()  # these do not train (kept, no optimizer state)
    train_only: tuple[str, ...] = ()  # if given, only these train (then `freeze` removes more)
    # a model with LoRA adapters (`ming_jax.lora`) trains only their factors (base frozen); False: freeze /
    # train_only choose among all float parameters, adapters included
    adapters_only: bool = True

    def __post_init__(self):
        problems = []
        for name in ("learning_rate", "eps"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if self.warmup_steps < 0 or self.total_steps < 1 or self.warmup_steps >= self.total_steps:
            problems.append(f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}: need "
                            "0 <= warmup_steps < total_steps (the cosine needs at least one step)")
        if not 0 <= self.final_lr_ratio <= 1:
            problems.append(f"final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            problems.append(f"b1={self.b1}, b2={self.b2} must be in [0, 1)")
        if self.weight_decay < 0 or self.z_loss < 0 or self.seq_aux_loss < 0 or self.bias_update_rate < 0:
            problems.append("weight_decay, z_loss, seq_aux_loss and bias_update_rate must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm={self.max_grad_norm} must be > 0 (None: no clipping)")
        if self.grad_accum < 1 or self.loss_chunk < 1:
            problems.append(f"grad_accum={self.grad_accum} and loss_chunk={self.loss_chunk} must be >= 1")
        for pattern in self.freeze + self.train_only:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"parameter pattern {pattern!r}: {e}")
        if problems:
            raise ConfigError("TrainConfig: " + "; ".join(problems))

    def replace(self, **overrides) -> "TrainConfig":
        return replace(self, **overrides)

    def trains(self, path: str) -> bool:
        """Whether the parameter at '/'-joined `path` is optimised."""
        if any(re.search(p, path) for p in NEVER_TRAINED):
            return False
        if self.train_only and not any(re.search(p, path) for p in self.train_only):
            return False
        return not any(re.search(p, path) for p in self.freeze)
