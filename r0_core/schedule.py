"""Noise levels in the σ convention: a VP model's x_t = α_t x0 + σ^vp_t ε is the scaled x_t / α_t = x0 + σ_t ε,
with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t). Samplers work on x0 + σ ε; denoisers translate back to timesteps."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def uniform_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """K timesteps evenly spaced from the last one down ("trailing"): 1000, 4 -> [999, 749, 499, 249]."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps={steps}; expected 1..{num_train_timesteps}")
    return [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]


def sigmas_for_timesteps(sigma_table: torch.Tensor, timesteps: Sequence[int],
                         final_sigma: float = 0.0) -> torch.Tensor:
    """σ at each timestep (descending) from a table of σ per training timestep, then `final_sigma`
    (0: the last step returns the clean prediction x̂0)."""
    timesteps = [int(t) for t in timesteps]
    if not timesteps or any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps={timesteps}; expected a non-empty, strictly descending list")
    if timesteps[0] >= len(sigma_table) or timesteps[-1] < 0:
        raise ValueError(f"timesteps={timesteps}; expected values in 0..{len(sigma_table) - 1}")
    sigmas = sigma_table.double().cpu()[timesteps]
    return torch.cat([sigmas, sigmas.new_tensor([final_sigma])]).float()


def r0_sigmas(sigma_table: torch.Tensor, steps: int = 4, timesteps: Optional[Sequence[int]] = None):
    """The sampler's schedule: K uniform timesteps (or explicit ones) of a model with this σ table, then 0."""
    timesteps = uniform_timesteps(len(sigma_table), steps) if timesteps is None else timesteps
    return sigmas_for_timesteps(sigma_table, timesteps)


def sigma_to_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep of a σ, interpolating log σ between the training timesteps (`log_sigmas`,
    ascending with t)."""
    log_sigma = sigma.double().clamp(min=1e-10).log().reshape(-1)
    high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    low = high - 1
    w = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
    return (low + w).reshape(sigma.shape).to(sigma.dtype)


def scheduler_sigmas(scheduler, steps: int, timesteps: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The sampler's schedule for a diffusers scheduler's training noise levels."""
    return r0_sigmas(sigmas_from_alphas_cumprod(scheduler.alphas_cumprod), steps, timesteps)


def flow_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """A rectified-flow schedule as diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps makes it: K levels
    evenly spaced from the largest to the smallest shifted training σ, shifted by σ' = s σ / (1 + (s - 1) σ)
    (SD3: s = 3), then 0."""
    if steps < 1:
        raise ValueError(f"steps={steps}; expected at least 1")
    if not shift > 0:
        raise ValueError(f"shift={shift}; expected a positive number (SD3 uses 3.0)")
    return _flow_sigmas(steps, float(shift), num_train_timesteps).clone()


@functools.lru_cache(maxsize=64)
def _flow_sigmas(steps: int, shift: float, num_train_timesteps: int) -> torch.Tensor:
    # made once per schedule: rebuilding it is a visible share of a few-step call on a small model
    top, bottom = flow_shift(torch.tensor([1.0, 1 / num_train_timesteps], dtype=torch.float64), shift)
    sigmas = flow_shift(torch.linspace(float(top), float(bottom), steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def flow_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift σ' = s σ / (1 + (s - 1) σ): more of the schedule (and of training) at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)
