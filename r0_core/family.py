"""What differs between model families, in one place, so that the sampler, generation, R0, R0+, test-time R0 and
RPO are written once for all of them.

Families, told apart by the pipeline's parts:
- SD 1.x/2.x: one text encoder, a VP UNet (ε or v prediction).
- SDXL: a second text encoder whose pooled output and the size time ids condition the UNet too.
- SD3 (rectified flow): a transformer (`pipe.transformer`) predicting the velocity, x = (1 − σ) x0 + σ ε; pooled
  embeddings of its CLIP encoders; a VAE with a shift as well as a scale.

Each function here answers one question for any family: the denoiser's conditioning for some prompts
(`conditioning`), the backbone that is trained (`backbone`), the σ-convention denoiser over it (`denoiser`), the
sampler's schedule and noise scaling (`sampler_sigmas`, `noise_scaling`, `start_latents`), the VAE's latent
scale (`decode`, `encode`), the target of a diffusion loss (`diffusion_loss`), and the LoRA file layout
(r0_core.lora asks `lora_layout`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import checks
from .denoisers import DiffusersDenoiser, FlowDenoiser
from .sampler import flow_noise_scaling, vp_noise_scaling
from .schedule import flow_shift, flow_sigmas, scheduler_sigmas


def is_sdxl(pipe) -> bool:
    """SDXL pipelines have a second text encoder whose pooled output, with the time ids, conditions the UNet."""
    return hasattr(pipe, "text_encoder_2") and not is_flow(pipe)


def is_flow(pipe) -> bool:
    """Rectified-flow pipelines (SD3) carry a transformer instead of a UNet."""
    return getattr(pipe, "transformer", None) is not None


def backbone(pipe):
    """The network that denoises, and that trainers adapt: the UNet, or the flow transformer."""
    return pipe.transformer if is_flow(pipe) else pipe.unet


def require_sd(pipe, what: str) -> None:
    """Refuse a pipeline of a family where only SD 1.x/2.x is wired (LCM distillation, for now)."""
    if is_sdxl(pipe) or is_flow(pipe):
        raise NotImplementedError(f"{what} of {'SD3' if is_flow(pipe) else 'SDXL'} pipelines is not supported yet "
                                  f"(few-step generation, R0, test-time R0 and RPO are); use an SD 1.x/2.x pipeline "
                                  f"or the tiny model")


def check_prompts(prompts) -> None:
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(f"prompts={prompts!r}; expected one or more non-empty strings")


# ----------------------------------------------------------------------------------------------- conditioning

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


def prompt_options(pipe) -> dict:
    """What the family's pipeline must be told to encode prompts as `conditioning` does: SD3 without T5 gets no
    rows in T5's place, as ComfyUI's SD3 CLIP gives them (diffusers' default adds 256 zero rows, which cost a small
    model most of its time)."""
    if is_flow(pipe) and getattr(pipe, "text_encoder_3", None) is None:
        return {"max_sequence_length": 0}
    return {}


def conditioning(pipe, prompts: list[str], guidance: float, height: Optional[int] = None,
                 width: Optional[int] = None, with_uncond: bool = False) -> dict:
    """The denoiser's keyword arguments for these prompts, for any family: `cond` and `uncond` (None when
    guidance is off, unless with_uncond: the implicit CFG reward needs it without guidance), and the added
    conditioning of each (`added_cond`, `uncond_added_cond`): SDXL's pooled text embedding and time ids, SD3's
    pooled projections."""
    check_prompts(prompts)
    wanted = guidance != 1.0 or with_uncond
    device = backbone(pipe).device
    if is_flow(pipe):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=wanted, **prompt_options(pipe))
        extra = {"cond": cond, "uncond": None, "added_cond": {"pooled_projections": pooled}}
        if wanted:
            extra.update(uncond=uncond, uncond_added_cond={"pooled_projections": uncond_pooled})
        return extra
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


def encode_prompts(pipe, prompts: list[str], guidance: float, with_uncond: bool = False):
    """(cond, uncond) text embeddings of an SD 1.x/2.x pipeline: `conditioning` without the rest."""
    require_sd(pipe, "encode_prompts (use conditioning)")
    c = conditioning(pipe, prompts, guidance, with_uncond=with_uncond)
    return c["cond"], c["uncond"]


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


# ----------------------------------------------------------------------------------------------- denoising

def denoiser(pipe, model=None):
    """The σ-convention denoiser of the pipeline's family over `model` (default: its own backbone; a trainer
    passes the accelerator-wrapped one, or a frozen copy)."""
    model = backbone(pipe) if model is None else model
    config = pipe.scheduler.config
    if is_flow(pipe):
        return FlowDenoiser(model, config.num_train_timesteps)
    return DiffusersDenoiser(model, pipe.scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"))


def sampler_sigmas(pipe, steps: int, timesteps: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The K-step schedule: the VP training levels (or the given timesteps), or SD3's shifted flow levels."""
    if is_flow(pipe):
        if timesteps is not None:
            raise ValueError("timesteps: explicit timesteps are for VP models; a flow model takes steps and its "
                             "scheduler's shift")
        config = pipe.scheduler.config
        return flow_sigmas(steps, config.get("shift", 1.0), config.num_train_timesteps)
    return scheduler_sigmas(pipe.scheduler, steps, timesteps)


def noise_scaling(pipe):
    """x at level σ from x0 and ε: x0 + σ ε (VP, σ convention) or (1 − σ) x0 + σ ε (flow)."""
    return flow_noise_scaling if is_flow(pipe) else vp_noise_scaling


def start_latents(noise: torch.Tensor, sigmas: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """x_T from standard normal noise z: a VP sampler's pure-noise start z / α_T = z sqrt(1 + σ_T²) in σ terms;
    a flow sampler's σ_T z (σ_T = 1: the noise itself)."""
    if flow:
        return noise * sigmas[0]
    return noise * (1 + sigmas[0] ** 2).sqrt()


def latent_shape(pipe, batch: int, height: Optional[int] = None, width: Optional[int] = None) -> tuple:
    """[B, C, h, w] of the backbone's latents for images of height x width (default: the model's own size)."""
    config = backbone(pipe).config
    native = config.sample_size * pipe.vae_scale_factor
    height = checks.image_side("height", height, pipe.vae_scale_factor, native)
    width = checks.image_side("width", width, pipe.vae_scale_factor, native)
    return batch, config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (scaled, as the backbone sees them) -> images [B, 3, H, W] in [0, 1]."""
    vae = pipe.vae
    shift = vae.config.get("shift_factor") or 0.0   # SD3's VAE is shifted as well as scaled
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (as the backbone sees them) of images [B, 3, H, W] in 0..1: the posterior mean."""
    vae = pipe.vae
    shift = vae.config.get("shift_factor") or 0.0
    posterior = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    return (posterior.mean - shift) * vae.config.scaling_factor


def training_timesteps(scheduler, n: int, gen: torch.Generator) -> torch.Tensor:
    """n training timesteps as the family was trained: uniform over the VP levels; for a flow scheduler, σ from
    SD3's logit-normal density through the scheduler's shift (as diffusers' SD3 training scripts draw them, so the
    few high-noise levels a shifted sampler starts from are trained too), as t = σ T."""
    total = scheduler.config.num_train_timesteps
    if "shift" in scheduler.config:   # FlowMatchEulerDiscreteScheduler
        sigma = flow_shift(torch.sigmoid(torch.randn(n, generator=gen)), scheduler.config.shift)
        return sigma * total
    return torch.randint(total, (n,), generator=gen)


PREDICTIONS = ("epsilon", "v_prediction", "flow")


def denoiser_diffusion_loss(model: Callable, latents: torch.Tensor, c: dict, noise: torch.Tensor,
                            sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """diffusion_loss for a σ-convention denoiser x̂0 = model(x, σ, **c) (a host application's model, e.g.
    ComfyUI's): the same per-image MSE of the model's own training target, recovered from x̂0. With x = x0 + σ ε
    (VP): ε̂ = (x − x̂0) / σ ("epsilon"), v̂ = (ε̂ − σ x̂0) / √(1 + σ²) against v = (ε − σ x0) / √(1 + σ²)
    ("v_prediction"); with x = (1 − σ) x0 + σ ε ("flow"): the velocity ε̂ − x̂0 against ε − x0."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; expected one of {', '.join(PREDICTIONS)}")
    s = sigma.view(-1, *[1] * (latents.ndim - 1)).to(latents)
    flow = prediction == "flow"
    noisy = (flow_noise_scaling if flow else vp_noise_scaling)(s, noise, latents)
    x0 = model(noisy, sigma, **c).to(latents)
    if flow:
        eps = (noisy - (1 - s) * x0) / s
        prediction_, target = eps - x0, noise - latents
    else:
        eps = (noisy - x0) / s
        prediction_, target = eps, noise
        if prediction == "v_prediction":
            scale = (1 + s ** 2).sqrt()
            prediction_, target = (eps - s * x0) / scale, (noise - s * latents) / scale
    return (prediction_.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_loss(pipe, model, latents: torch.Tensor, c: dict, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """Per-image MSE of the backbone `model`'s training target at the given noise and training timesteps,
    conditioned on `c` (a `conditional` half): ε or v on the VP schedule, or the flow velocity ε − x0 at
    σ = t / T (flow matching, as SD3 was trained)."""
    scheduler = pipe.scheduler
    if is_flow(pipe):
        sigma = (timesteps.float() / scheduler.config.num_train_timesteps).view(-1, *[1] * (latents.ndim - 1))
        noisy = flow_noise_scaling(sigma.to(latents), noise, latents)
        target = noise - latents
        prediction = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=c["cond"],
                           **c["added_cond"]).sample
    else:
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = model(noisy, timesteps, encoder_hidden_states=c["cond"],
                           added_cond_kwargs=c.get("added_cond")).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
