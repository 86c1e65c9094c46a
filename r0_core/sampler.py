"""The R0 few-step sampler, a pure function in the σ convention (`denoised = model(x, sigma)`).

R0's generator is the diffusion model itself run for K steps: at each step predict x̂0, then re-noise to the
next level with a mix of the predicted noise and fresh noise,
    x_next = x̂0 + σ_next (sqrt(1 - η²) ε̂ + η ξ),    ε̂ = (x - x̂0) / σ,    ξ ~ N(0, I),
which is SPEC's α' x̂0 + σ' (...) divided by α'. η = 0 is DDIM; η = 1 re-noises with fresh noise only, as LCM
does. No `no_grad` inside: R0 training backpropagates through the chain.

Rectified-flow models (SD3, Flux) interpolate instead, x = (1 - σ) x0 + σ ε with σ in [0, 1]; the same steps run
with their `noise_scaling` (ComfyUI's name for it): ε̂ = (x - (1 - σ) x̂0) / σ and
x_next = (1 - σ_next) x̂0 + σ_next (sqrt(1 - η²) ε̂ + η ξ). η = 0 is then the flow Euler step, η = 1 the
stochastic one (x̂0, then fresh noise).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from tqdm.auto import trange

from . import checks


class Cancelled(Exception):
    """Raised by a progress callback to stop a sampler or trainer; what was done so far is kept by the caller."""


def seeded_noise(shape, seeds: list[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise [B, ...] where image i depends only on seeds[i], not on the batch it is in."""
    if len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}; pass one seed per image")
    seeds = [checks.seed(s, "seed") for s in seeds]
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(s))
                        for s in seeds]).to(device, dtype)


def seeded_noise_sampler(x: torch.Tensor, seeds: list[int]) -> Callable:
    """A noise_sampler drawing ξ per image from its own seeded stream (offset so it never repeats the start
    noise), so re-noising is reproducible image by image."""
    generators = [torch.Generator("cpu").manual_seed(int(s) + 0x5EED) for s in seeds]

    def sample(sigma, sigma_next):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device, x.dtype)
    return sample


def vp_noise_scaling(sigma, noise, latent):
    """x = x0 + σ ε: the σ convention of ε-, v- and x0-prediction (VP) models."""
    return latent + sigma * noise


def flow_noise_scaling(sigma, noise, latent):
    """x = (1 - σ) x0 + σ ε: rectified flow."""
    return (1 - sigma) * latent + sigma * noise


def sample_r0(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
              callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None, *,
              eta: float = 0.0, noise_sampler: Optional[Callable] = None,
              noise_scaling: Callable = vp_noise_scaling) -> torch.Tensor:
    """Run the K = len(sigmas) - 1 steps from x (already at noise level sigmas[0]); returns the final sample.

    eta: a float, a tensor of K values (one per step, as R0 training randomises it) or of [K, B] (per image too).
    noise_sampler(sigma, sigma_next) -> ξ; defaults to torch.randn_like (pass a seeded one for reproducibility).
    noise_scaling(sigma, noise, latent) -> x at that level: vp_noise_scaling, or flow_noise_scaling.
    callback: called after each step with {"i", "x", "sigma", "sigma_next", "denoised"}; raise Cancelled to stop.
    """
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    etas = torch.as_tensor(eta, dtype=torch.float32)
    etas = etas.reshape(1).expand(steps) if etas.numel() == 1 else etas
    per_image = etas.ndim == 2
    if etas.shape[0] != steps or etas.ndim > 2 or per_image and etas.shape[1] != len(x) \
            or not ((etas >= 0) & (etas <= 1)).all():
        raise ValueError(f"eta={eta}; expected a value in [0, 1], {steps} such values (one per step) or "
                         f"[{steps}, {len(x)}] (one per step and image)")
    noise_sampler = noise_sampler or (lambda sigma, sigma_next: torch.randn_like(x))
    s_in = x.new_ones([x.shape[0]])
    # what each step branches on, as Python values read once rather than a tensor read per step
    last = (sigmas[1:] == 0).tolist()
    renoise = (etas > 0).reshape(steps, -1).any(dim=1).tolist()
    for i in range(steps) if disable is True else trange(steps, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)              # 1. x̂0
        if last[i]:
            x = denoised                                              # last step: the clean prediction
        else:
            eps = (x - noise_scaling(sigma, torch.zeros_like(x), denoised)) / sigma   # 2. ε̂ implied by x̂0
            if renoise[i]:                                            # 3. re-noise with η
                e = etas[i].to(x).view(-1, *[1] * (x.ndim - 1)) if per_image else float(etas[i])
                keep = (1 - e * e).sqrt() if per_image else math.sqrt(1 - e * e)
                eps = keep * eps + e * noise_sampler(sigma, sigma_next)
            x = noise_scaling(sigma_next, eps, denoised)              # (η = 0: DDIM, or the flow Euler step)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
