"""Few-step generation with a diffusers SD pipeline: prompts -> R0 sampler -> VAE decode."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from . import checks, memory
from .denoisers import DiffusersDenoiser
from .sampler import sample_r0, seeded_noise, seeded_noise_sampler
from .schedule import scheduler_sigmas


def encode_prompts(pipe, prompts: list[str], guidance: float, with_uncond: bool = False):
    """(cond, uncond) text embeddings; uncond is None when guidance is off, unless with_uncond (the implicit
    CFG reward needs it without guidance)."""
    if hasattr(pipe, "text_encoder_2"):
        raise NotImplementedError("few-step generation with SDXL pipelines (pooled text embeddings and time ids) "
                                  "is not wired yet; SD 1.x/2.x pipelines and the tiny model are supported")
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(f"prompts={prompts!r}; expected one or more non-empty strings")
    wanted = guidance != 1.0 or with_uncond
    cond, uncond = pipe.encode_prompt(prompts, pipe.unet.device, 1, wanted, negative_prompt=None)[:2]
    return cond, (uncond if wanted else None)


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (scaled, as the UNet sees them) -> images [B, 3, H, W] in [0, 1]."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


def latent_shape(pipe, batch: int, height: Optional[int] = None, width: Optional[int] = None) -> tuple:
    """[B, C, h, w] of the UNet's latents for images of height x width (default: the model's own size)."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height = checks.image_side("height", height, pipe.vae_scale_factor, native)
    width = checks.image_side("width", width, pipe.vae_scale_factor, native)
    return batch, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor


def start_latents(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_T from standard normal noise z: in σ terms z / α_T = z sqrt(1 + σ_T²), a VP sampler's pure-noise start."""
    return noise * (1 + sigmas[0] ** 2).sqrt()


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
                   disable: bool = True) -> torch.Tensor:
    """The R0 sampler on encoded prompts: scaled latents (as the UNet sees them), one image per row of cond."""
    seeds = list(range(len(cond))) if seeds is None else list(seeds)
    checks.number("guidance", guidance)
    model = DiffusersDenoiser.from_pipeline(pipe)
    sigmas = scheduler_sigmas(pipe.scheduler, steps, timesteps).to(cond.device)
    shape = latent_shape(pipe, len(cond), height, width)
    x = start_latents(seeded_noise(shape, seeds, cond.device, cond.dtype), sigmas)
    return sample_r0(model, x, sigmas, {"cond": cond, "uncond": uncond, "guidance": guidance}, callback, disable,
                     eta=eta, noise_sampler=seeded_noise_sampler(x, seeds))


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
        cond, uncond = encode_prompts(pipe, prompts[start:start + chunk], guidance)
        part = sample_latents(pipe, cond, uncond, steps=steps, eta=eta, guidance=guidance,
                              seeds=seeds[start:start + chunk], timesteps=timesteps, height=height, width=width,
                              callback=callback, disable=disable)
        images.append(decode(pipe, part))
        latents.append(part / pipe.vae.config.scaling_factor)
    return torch.cat(images), torch.cat(latents)
