"""Backbone wrappers exposing `denoised = model(x, sigma)` in the σ convention, with classifier-free guidance:
VP UNets (SD 1.x, SDXL) and rectified-flow transformers (SD3)."""
from __future__ import annotations

from typing import Optional

import torch

from .schedule import sigma_to_timestep, sigmas_from_alphas_cumprod


class DiffusersDenoiser(torch.nn.Module):
    """A diffusers UNet2DConditionModel (ε-, v- or x0-prediction, VP schedule) as a σ-convention denoiser.

    In σ terms x = x0 + σ ε, and the UNet expects the VP input α x with α = 1 / sqrt(1 + σ²).
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type={prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")
        self.unet = unet
        self.prediction_type = prediction_type
        # log σ per training timestep, kept on the CPU: the σ -> t lookup runs once per step
        self.log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.detach().double().cpu()).log()

    @classmethod
    def from_pipeline(cls, pipe) -> "DiffusersDenoiser":
        config = pipe.scheduler.config
        return cls(pipe.unet, pipe.scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_timestep(sigma.detach().cpu(), self.log_sigmas)
        # the training grid's σ map back to whole timesteps up to rounding error: snap them
        t = torch.where((t - t.round()).abs() < 1e-3, t.round(), t)
        return t.to(sigma.device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *, cond: torch.Tensor,
                uncond: Optional[torch.Tensor] = None, guidance: float = 1.0,
                added_cond: Optional[dict] = None, uncond_added_cond: Optional[dict] = None) -> torch.Tensor:
        """x̂0 for x at noise level sigma [B]. With `uncond` and guidance != 1, classifier-free guidance
        x̂0 = x̂0(∅) + w (x̂0(c) - x̂0(∅)), equal to guiding the raw prediction since x̂0 is affine in it."""
        guided = uncond is not None and guidance != 1.0
        if guided:
            x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
            context = torch.cat([uncond, cond])
            added = None if added_cond is None else {k: torch.cat([uncond_added_cond[k], v])
                                                     for k, v in added_cond.items()}
        else:
            x_in, sigma_in, context, added = x, sigma, cond, added_cond
        denoised = self._denoise(x_in, sigma_in, context, added)
        if guided:
            uncond_out, cond_out = denoised.chunk(2)
            denoised = uncond_out + guidance * (cond_out - uncond_out)
        return denoised

    def _denoise(self, x, sigma, context, added):
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        alpha = (1 + s * s).rsqrt()                           # √ᾱ; the VP noise scale is σ·α
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        out = self.unet(x * alpha, self.timestep(sigma), encoder_hidden_states=context, **kwargs).sample
        if self.prediction_type == "epsilon":
            return x - s * out                                # x̂0 = x - σ ε̂
        if self.prediction_type == "v_prediction":
            return alpha * (alpha * x - s * out)              # x̂0 = α x_vp - σ_vp v, x_vp = α x, σ_vp = σ α
        return out


class FlowDenoiser(torch.nn.Module):
    """A diffusers rectified-flow transformer (SD3Transformer2DModel) as a denoiser: x = (1 - σ) x0 + σ ε and the
    model predicts the velocity v = ε - x0 at timestep σ · num_train_timesteps, so x̂0 = x - σ v. Sample it with
    `sample_r0(..., noise_scaling=flow_noise_scaling)`."""

    def __init__(self, transformer, num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer, self.num_train_timesteps = transformer, num_train_timesteps

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *, cond: torch.Tensor,
                uncond: Optional[torch.Tensor] = None, guidance: float = 1.0,
                added_cond: Optional[dict] = None, uncond_added_cond: Optional[dict] = None) -> torch.Tensor:
        """x̂0 for x at noise level sigma [B]; added_cond: {"pooled_projections": the pooled text embeddings}.
        Classifier-free guidance on the velocity (x̂0 is affine in it)."""
        guided = uncond is not None and guidance != 1.0
        if guided:
            x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
            context = torch.cat([uncond, cond])
            added = {k: torch.cat([uncond_added_cond[k], v]) for k, v in added_cond.items()}
        else:
            x_in, sigma_in, context, added = x, sigma, cond, added_cond
        v = self.transformer(hidden_states=x_in, encoder_hidden_states=context,
                             timestep=sigma_in * self.num_train_timesteps, **added).sample
        if guided:
            uncond_v, cond_v = v.chunk(2)
            v = uncond_v + guidance * (cond_v - uncond_v)
        return x - sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * v
