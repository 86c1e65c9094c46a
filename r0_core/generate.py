"""Few-step generation with a diffusers SD pipeline: prompts -> R0 sampler -> VAE decode."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from . import checks, memory
from .denoisers import DiffusersDenoiser
from .sampler import sample_r0, seeded_noise, seeded_noise_sampler
from .schedule import scheduler_sigmas


def is_sdxl(pipe) -> bool:
    """SDXL pipelines have a second text encoder whose pooled output, with the time ids, conditions the UNet."""
    return hasattr(pipe, "text_encoder_2")


def require_sd(pipe, what: str) -> None:
    """Refuse an SDXL pipeline where only SD 1.x/2.x is wired (LCM distillation, for now)."""
    if is_sdxl(pipe):
        raise NotImplementedError(f"{what} of SDXL pipelines is not supported yet (few-step generation, R0, "
                                  f"test-time R0 and RPO are); use an SD 1.x/2.x pipeline or the tiny model")


def check_prompts(prompts) -> None:
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(f"prompts={prompts!r}; expected one or more non-empty strings")


def encode_prompts(pipe, prompts: list[str], guidance: float, with_uncond: bool = False):
    """(cond, uncond) text embeddings of an SD 1.x/2.x pipeline: `conditioning` without the rest."""
    require_sd(pipe, "encode_prompts (use conditioning)")
    c = conditioning(pipe, prompts, guidance, with_uncond=with_uncond)
    return c["cond"], c["uncond"]


def sdxl_time_ids(pipe, pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SDXL's size conditioning, one row per image: original size, crop corner, target size, as diffusers'
    pipeline sets them by default (the image's own size, uncropped)."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
    expected = pipe.unet.add_embedding.linear_1.in_features
    given = pipe.unet.config.addition_time_embed_dim * ids.shape[1] + pooled.shape[-1]
    if given != expected:
        raise ValueError(f"this SDXL UNet expects {expected} added-conditioning features, but its text encoder and "
                         f"time ids give {given}: the UNet and text_encoder_2 are from different models")
    return ids.repeat(len(pooled), 1)


def conditioning(pipe, prompts: list[str], guidance: float, height: Optional[int] = None,
                 width: Optional[int] = None, with_uncond: bool = False) -> dict:
    """The denoiser's keyword arguments for these prompts, for either family: `cond` and `uncond` (None when
    guidance is off, unless with_uncond: the implicit CFG reward needs it without guidance), and for SDXL the
    added conditioning of each (`added_cond`, `uncond_added_cond`: pooled text embedding and time ids)."""
    check_prompts(prompts)
    wanted = guidance != 1.0 or with_uncond
    device = pipe.unet.device
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, wanted, negative_prompt=None)[:2]
        return {"cond": cond, "uncond": uncond if wanted else None}
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=wanted)
    _, _, h, w = latent_shape(pipe, len(prompts), height, width)
    size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    extra = {"cond": cond, "uncond": None,
             "added_cond": {"text_embeds": pooled, "time_ids": sdxl_time_ids(pipe, pooled, *size)}}
    if wanted:
        extra.update(uncond=uncond, uncond_added_cond={"text_embeds": uncond_pooled,
                                                       "time_ids": sdxl_time_ids(pipe, uncond_pooled, *size)})
    return extra


def conditional(c: dict) -> dict:
    """The conditional half of a conditioning: what a denoiser needs to predict without guidance."""
    return {"cond": c["cond"], **({"added_cond": c["added_cond"]} if c.get("added_cond") is not None else {})}


def unconditional(c: dict) -> dict:
    """The unconditional half, in the conditional half's keys."""
    return {"cond": c["uncond"],
            **({"added_cond": c["uncond_added_cond"]} if c.get("uncond_added_cond") is not None else {})}


def take(c: dict, rows) -> dict:
    """Rows of every tensor of a conditioning (a slice, an index tensor, or a count to repeat row 0 over)."""
    def pick(v):
        if v is None:
            return None
        if isinstance(v, dict):
            return {k: pick(x) for k, x in v.items()}
        return v[:1].expand(rows, *v.shape[1:]) if isinstance(rows, int) else v[rows]
    return {k: pick(v) for k, v in c.items()}


def join(*cs: dict) -> dict:
    """Conditionings with the same keys, one after another along the batch."""
    def cat(vs):
        if vs[0] is None:
            return None
        if isinstance(vs[0], dict):
            return {k: cat([v[k] for v in vs]) for k in vs[0]}
        return torch.cat(vs)
    return {k: cat([c[k] for c in cs]) for k in cs[0]}


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
                   disable: bool = True, added_cond: Optional[dict] = None,
                   uncond_added_cond: Optional[dict] = None) -> torch.Tensor:
    """The R0 sampler on encoded prompts: scaled latents (as the UNet sees them), one image per row of cond.
    added_cond / uncond_added_cond: SDXL's pooled embeddings and time ids (`conditioning` gives them)."""
    seeds = list(range(len(cond))) if seeds is None else list(seeds)
    checks.number("guidance", guidance)
    model = DiffusersDenoiser.from_pipeline(pipe)
    sigmas = scheduler_sigmas(pipe.scheduler, steps, timesteps).to(cond.device)
    shape = latent_shape(pipe, len(cond), height, width)
    x = start_latents(seeded_noise(shape, seeds, cond.device, cond.dtype), sigmas)
    extra = {"cond": cond, "uncond": uncond, "guidance": guidance, "added_cond": added_cond,
             "uncond_added_cond": uncond_added_cond}
    return sample_r0(model, x, sigmas, extra, callback, disable, eta=eta, noise_sampler=seeded_noise_sampler(x, seeds))


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
