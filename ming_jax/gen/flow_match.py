"""The sigma schedule of the flow-matching Euler sampler, as the release's Z-Image pipeline sets it up (host, numpy).

The pipeline sets `scheduler.sigma_min = 0` before `set_timesteps(N, mu)`, so the N model times run linearly from
1 to 0 before the shift; the scheduler then appends a terminal sigma 0. Hence N DiT calls and N - 1 effective Euler
updates: the last step has dt = 0 (kept, because its DiT call is part of the release's cost and output).

    sigma_i  = shift(linspace(1, 0, N))_i          static: s * x / (1 + (s - 1) * x)
                                                   dynamic: exp(mu) / (exp(mu) + (1/x - 1))  (or mu / (mu + ...))
               mu = linear in the image token count between (base_image_seq_len, base_shift) and (max_..., max_...)
    t_i      = (1000 - 1000 sigma_i) / 1000        the model time the DiT sees (float32, the pipeline's arithmetic)
    x_{i+1}  = x_i + (sigma_{i+1} - sigma_i) * (-v_i)

Arithmetic follows diffusers' FlowMatchEulerDiscreteScheduler: the grid and the shift in float64, then float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ming_jax.config.image_gen import FlowMatchConfig


PIPELINE_T = 1000.0  # the pipeline's model time is (1000 - timestep) / 1000, whatever num_train_timesteps says


@dataclasses.dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # [N + 1] float32, the last one the appended terminal 0
    timesteps: np.ndarray  # [N] float32 = sigmas[:-1] * num_train_timesteps
    model_times: np.ndarray  # [N] float32 = (1000 - timesteps) / 1000: what the DiT is called with

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def calculate_shift(image_seq_len: int, cfg: FlowMatchConfig) -> float:
    """mu of the resolution-dependent shift: linear in the number of image tokens (after the 2x2 patchify)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def _time_shift(cfg: FlowMatchConfig, mu: float, x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):  # x = 0 -> 1/x - 1 = inf -> sigma 0, as in torch
        tail = 1.0 / x - 1.0
    if cfg.time_shift_type == "exponential":
        return np.exp(mu) / (np.exp(mu) + tail)
    return mu / (mu + tail)


def schedule(cfg: FlowMatchConfig, steps: int, image_seq_len: int) -> Schedule:
    """The release's schedule for `steps` DiT calls on an image of `image_seq_len` tokens ((h / 2) * (w / 2) of the
    latent)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: at least one denoising step")
    n_train = cfg.num_train_timesteps
    x = np.linspace(1.0 * n_train, 0.0, steps) / n_train  # sigma_max = 1 (the unshifted and shifted top), sigma_min 0
    if cfg.use_dynamic_shifting:
        x = _time_shift(cfg, calculate_shift(image_seq_len, cfg), x)
    else:
        x = cfg.shift * x / (1 + (cfg.shift - 1) * x)
    if cfg.shift_terminal is not None:
        one_minus = 1 - x
        if one_minus[-1] == 0:  # one step: the grid is [1] and the stretch 0 / 0 (diffusers returns NaN)
            raise ValueError(f"shift_terminal={cfg.shift_terminal} needs at least 2 steps (got {steps})")
        x = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    sigmas = x.astype(np.float32)
    timesteps = sigmas * np.float32(n_train)
    model_times = (np.float32(PIPELINE_T) - timesteps) / np.float32(PIPELINE_T)
    return Schedule(np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps, model_times.astype(np.float32))
