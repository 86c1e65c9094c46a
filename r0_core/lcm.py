"""A distillation baseline for R0: an LCM-LoRA trained by latent consistency distillation.

The same construction as diffusers' LCM-LoRA training example, written in the σ convention of this package
(x = x0 + σ ε on the UNet's scaled latents; a VP model sees α x with α = 1 / sqrt(1 + σ²)). One iteration:
  1. draw a batch of (image, prompt) pairs, encode the images with the VAE, draw noise, a guidance scale
     ω ~ U(guidance_range) and a solver index n: the skipping-step DDIM schedule has `ddim_timesteps`
     levels t_n, t_n − k with k = T / ddim_timesteps;
  2. x at t_n: x = x0 + σ(t_n) ε;
  3. teacher (the pretrained UNet, LoRA off) with CFG ω gives x̂0 at t_n; one DDIM step takes x to
     t_n − k: x_prev = x̂0 + σ(t_n − k) (x − x̂0) / σ(t_n);
  4. student (the UNet with the LoRA) at (x, t_n) and its own no-grad prediction at (x_prev, t_n − k), both
     through the consistency boundary condition f = c_skip(t) α x + c_out(t) x̂0 (f = the data at t = 0);
  5. pseudo-Huber loss between the two, + reg_weight · ‖ΔW‖², one AdamW step.
At inference the LoRA runs in the R0 sampler at η = 1 (x̂0, then fresh noise: LCM's multistep sampler; the
boundary terms are ~1e-5 at the sampler's timesteps) without CFG, as LCM-LoRA is used.

Resumable, cancellable and saved as R0's trainer is (r0_core.train's Trainable, run_iterations, curve, LoRA).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import checks
from .denoisers import DiffusersDenoiser
from .family import encode_prompts, require_sd
from .schedule import sigmas_from_alphas_cumprod
from .train import (Trainable, TrainResult, check_target, make_accelerator, optimizer_step, pretrained,
                    run_fingerprint, run_iterations, save_curve, save_trained, share)

SIGMA_DATA = 0.5          # LCM's boundary-condition constants (diffusers' example)
TIMESTEP_SCALING = 10.0


@dataclass
class LCMConfig:
    iterations: int = 400                  # optimizer steps
    batch_size: int = 8                    # images per step
    lr: float = 1e-3                       # AdamW learning rate of the LoRA
    lora_rank: int = 8                     # 0 trains the full UNet
    lora_targets: str = "attention"         # "attention" or "all" (see r0_core.lora)
    reg_weight: float = 0.0                # weight of ‖θ − θ0‖²
    ddim_timesteps: int = 50               # N: solver levels; the skip is k = T / N
    guidance_range: tuple[float, float] = (3.0, 9.0)   # the teacher's CFG ω, drawn per image
    huber_c: float = 0.001                 # c of the pseudo-Huber consistency loss
    grad_clip: float = 1.0                 # gradient-norm clip (0: none)
    seed: int = 0                          # the same seed gives the same weights
    checkpoint_every: int = 50             # iterations between resumable checkpoints
    mixed_precision: str = "auto"          # "no", "fp16", "bf16"; auto: bf16 on CUDA, else no

    def __post_init__(self):
        lo, hi = self.guidance_range
        if self.iterations < 1 or self.batch_size < 1 or self.ddim_timesteps < 2:
            raise ValueError("iterations and batch_size must be at least 1, ddim_timesteps at least 2")
        if not 1 <= lo <= hi:
            raise ValueError(f"guidance_range={self.guidance_range}; expected 1 <= low <= high")
        checks.number("lr", self.lr, 0, low_open=True)
        checks.number("reg_weight", self.reg_weight, 0)
        checks.number("huber_c", self.huber_c, 0, low_open=True)
        checks.number("grad_clip", self.grad_clip, 0)
        checks.lora_targets(self.lora_targets)
        checks.whole("lora_rank", self.lora_rank, 0)
        checks.whole("checkpoint_every", self.checkpoint_every, 1)
        checks.seed(self.seed)

    def fingerprint(self) -> str:
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("iterations", "checkpoint_every")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at timesteps t: f = x at t = 0, and the model's x̂0 soon after."""
    scaled = TIMESTEP_SCALING * t.float()
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    return c_skip, scaled / (scaled ** 2 + SIGMA_DATA ** 2).sqrt()


def consistency(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip α x + c_out x̂0, with α x the VP model's input."""
    c_skip, c_out = (c.to(x).view(-1, *[1] * (x.ndim - 1)) for c in boundary(t))
    alpha = (1 + sigma.to(x).view_as(c_skip) ** 2).rsqrt()
    return c_skip * alpha * x + c_out * denoised


def train_lcm(pipe, images: torch.Tensor, prompts: list[str], config: LCMConfig, out_dir: str,
              lora_path: Optional[str] = None, callback: Optional[Callable[[dict], None]] = None,
              adapter: str = "lcm", overwrite: bool = False) -> TrainResult:
    """Distil pipe.unet into a few-step LCM-LoRA on (images [N, 3, H, W] in 0..1, one prompt each)."""
    require_sd(pipe, "LCM distillation")
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; pass one prompt per image")
    accelerator = make_accelerator(config.mixed_precision, pipe.unet.device)
    lora_path = lora_path or os.path.join(out_dir, "lcm_lora.safetensors")
    check_target(lora_path, out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    with torch.inference_mode(False), torch.enable_grad():
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        data = hashlib.sha256(images.detach().float().cpu().numpy().tobytes() + "\n".join(prompts).encode())
        fingerprint = run_fingerprint(config, pipe.unet, extra=data.hexdigest())
        trainable = Trainable(pipe.unet, config, adapter, keep_pretrained=True)  # the teacher
        optimizer = torch.optim.AdamW(trainable.params, lr=config.lr, weight_decay=0.0)
        unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
        part = share(accelerator, config.batch_size)
        alphas_cumprod = pipe.scheduler.alphas_cumprod
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        model = DiffusersDenoiser(unet, alphas_cumprod, prediction)
        teacher = DiffusersDenoiser(trainable.frozen, alphas_cumprod, prediction) if trainable.full else model
        table = sigmas_from_alphas_cumprod(alphas_cumprod.double().cpu()).float()
        skip = len(table) // config.ddim_timesteps
        levels = torch.arange(1, config.ddim_timesteps + 1) * skip - 1     # t_n: 19, 39, ..., 999 for T = 1000

        def step(iteration: int, gen: torch.Generator) -> dict:
            total = config.batch_size   # drawn whole on every process, each keeping its share (train.share)
            picks = torch.randint(len(prompts), (total,), generator=gen)[part]
            batch_prompts = [prompts[i] for i in picks.tolist()]
            with torch.no_grad():
                x0 = encode_images(pipe, images[picks].to(unet.device))
                cond, uncond = encode_prompts(pipe, batch_prompts, 1.0, with_uncond=True)
            lo, hi = config.guidance_range
            omega = lo + (hi - lo) * torch.rand(total, generator=gen)[part]
            t = levels[torch.randint(config.ddim_timesteps, (total,), generator=gen)[part]]
            t_prev = (t - skip).clamp(min=0)
            sigma, sigma_prev = table[t].to(x0.device), table[t_prev].to(x0.device)
            x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn((total, *x0.shape[1:]), generator=gen)[part].to(x0)  # 2.
            unet.train()
            with accelerator.autocast():
                with torch.no_grad():
                    with pretrained(trainable):    # 3. the teacher: the LoRA switched off
                        both = teacher(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
                    conditional, unconditional = both.chunk(2)
                    guided = unconditional + omega.to(x).view(-1, 1, 1, 1) * (conditional - unconditional)
                    x_prev = guided + sigma_prev.view(-1, 1, 1, 1) * (x - guided) / sigma.view(-1, 1, 1, 1)
                    target = consistency(model(x_prev, sigma_prev, cond=cond), x_prev, sigma_prev, t_prev)
                student = consistency(model(x, sigma, cond=cond), x, sigma, t)   # 4.
                diff = (student.float() - target.float()).flatten(1)
                loss = ((diff ** 2 + config.huber_c ** 2).sqrt() - config.huber_c).mean()   # 5. pseudo-Huber
                reg = config.reg_weight * trainable.delta_norm2()
            optimizer_step(accelerator, trainable, optimizer, loss + reg, config.grad_clip)
            return {"iteration": iteration + 1, "loss": float(loss.detach()), "reg": float(reg.detach())}

        history, cancelled = run_iterations(config, trainable, optimizer, accelerator, out_dir, fingerprint, step,
                                            callback)

        unet.eval()
        steps = [h["iteration"] for h in history]
        curve = save_curve(os.path.join(out_dir, "curve.png"), {"consistency loss": (steps, [h["loss"] for h in
                                                                                            history])},
                           {"reg_weight·‖θ−θ0‖²": (steps, [h["reg"] for h in history])}, top_label="loss",
                           write=accelerator.is_main_process)
        metadata = {"lcm_config": json.dumps(dataclasses.asdict(config), default=str),
                    "lcm_iterations": str(len(history))}
        result_path = save_trained(pipe, trainable, accelerator, out_dir, lora_path, adapter, cancelled, metadata)
    return TrainResult(result_path, curve, history, cancelled)


def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in 0..1 -> the UNet's scaled latents (the posterior mean, so it is deterministic)."""
    vae = pipe.vae
    posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor
