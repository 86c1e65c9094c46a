"""Few-step generation with a diffusers pipeline of any supported family: prompts -> R0 sampler -> VAE decode."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from . import checks, memory
from .family import conditioning, decode, denoiser, is_flow, latent_shape, noise_scaling, sampler_sigmas, start_latents
from .sampler import sample_r0, seeded_noise, seeded_noise_sampler


def checkpointed(fn):
    """fn(*args, **kwargs) with its activations recomputed in the backward pass instead of kept (trainers and
    test-time R0 backpropagate through every UNet call and the VAE decode)."""
    def call(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return call


def sample_latents(pipe, cond: torch.Tensor, uncond: Optional[torch.Tensor], *, steps: int = 4,
                   eta: float = 0.0, guidance: float = 1.0, seeds: Optional[Sequence[int]] = None,
                   timesteps: Optional[Sequence[int]] = None, height: Optional[int] = None,
                   width: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None,
                   disable: bool = True, added_cond: Optional[dict] = None,
                   uncond_added_cond: Optional[dict] = None) -> torch.Tensor:
    """The R0 sampler on encoded prompts: scaled latents (as the backbone sees them), one image per row of cond.
    added_cond / uncond_added_cond: SDXL's pooled embeddings and time ids, SD3's pooled projections
    (`conditioning` gives them)."""
    seeds = list(range(len(cond))) if seeds is None else list(seeds)
    checks.number("guidance", guidance)
    model = denoiser(pipe)
    sigmas = sampler_sigmas(pipe, steps, timesteps).to(cond.device)
    shape = latent_shape(pipe, len(cond), height, width)
    x = start_latents(seeded_noise(shape, seeds, cond.device, cond.dtype), sigmas, is_flow(pipe))
    extra = {"cond": cond, "uncond": uncond, "guidance": guidance, "added_cond": added_cond,
             "uncond_added_cond": uncond_added_cond}
    return sample_r0(model, x, sigmas, extra, callback, disable, eta=eta, noise_sampler=seeded_noise_sampler(x, seeds),
                     noise_scaling=noise_scaling(pipe))


@torch.no_grad()
def generate(pipe, prompts: list[str], *, steps: int = 4, eta: float = 0.0, guidance: float = 1.0,
             seeds: Optional[Sequence[int]] = None, timesteps: Optional[Sequence[int]] = None,
             height: Optional[int] = None, width: Optional[int] = None,
             callback: Optional[Callable[[dict], None]] = None, disable: bool = True):
    """Images [B, 3, H, W] in [0, 1] and their latents (raw VAE space, unscaled) for one image per prompt.

    steps/timesteps: K uniform steps, or an explicit descending list of training timesteps.
    seeds: one per image (default 0..B-1); the same seed gives the same image whatever the batch.
    A batch larger than memory allows runs in chunks (r0_core.memory); one image too large is refused.
    Inference only (no gradients, so the images are plain tensors); trainers and test-time R0 build their own
    differentiable path from sample_r0.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts={prompts!r}; expected a list of one or more non-empty strings")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per image")
    # as many images at once as memory allows (refused if not even one fits); seeded per image, so chunks
    # change nothing in the result
    chunk = memory.images_per_chunk(pipe, len(prompts), height, width, cfg=guidance != 1.0)
    images, latents = [], []
    for start in range(0, len(prompts), chunk):
        c = conditioning(pipe, prompts[start:start + chunk], guidance, height, width)
        part = sample_latents(pipe, **c, steps=steps, eta=eta, guidance=guidance,
                              seeds=seeds[start:start + chunk], timesteps=timesteps, height=height, width=width,
                              callback=callback, disable=disable)
        images.append(decode(pipe, part))
        latents.append(part / pipe.vae.config.scaling_factor)
    return torch.cat(images), torch.cat(latents)
