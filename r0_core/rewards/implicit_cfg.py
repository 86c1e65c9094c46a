"""R0's implicit classifier-free-guidance reward, the construction R0 takes from Diff-Instruct++.

CFG at sampling time follows ∇ log p(c | x_t) ∝ x̂0(x_t, c) − x̂0(x_t, ∅) of the pretrained model. As a reward on
a generator's clean output x0: re-noise it to a random level, x_t = x0 + σ n, ask the **frozen** pretrained
model for its guidance direction there, and push x0 along it:

    ∂R_cfg / ∂x0 := x̂0(x_t, c) − x̂0(x_t, ∅)      (no gradient through the frozen model)

so a generator run without CFG (one UNet call a step) learns to produce what guidance would have. The reward
lives on the latents (the UNet's space), not on pixels; in R0's per-reward gradient normalisation its direction
is scaled to unit norm per image like every other reward's, then weighted. Unnormalised, `weight` plays the role
of (ω − 1) in CFG's x̂0(∅) + ω (x̂0(c) − x̂0(∅)).

The reward has no value, only a gradient; what it reports per image is the RMS size of the guidance direction
(the "CFG gap"), which shrinks as the generator's outputs move to where the conditional and unconditional
predictions agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..family import conditional, join, unconditional
from ..sampler import flow_noise_scaling, vp_noise_scaling
from ..schedule import sigmas_from_alphas_cumprod


@dataclass
class ImplicitCFG:
    weight: float = 1.0
    t_range: tuple[float, float] = (0.02, 0.98)   # re-noising levels, as fractions of the training timesteps

    def __post_init__(self):
        lo, hi = self.t_range
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"implicit CFG reward weight={self.weight!r}; expected a finite number >= 0 (0: off)")
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"implicit CFG t_range={self.t_range}; expected 0 <= low <= high <= 1 (fractions of "
                             f"the training timesteps)")

    def sigmas(self, alphas_cumprod: Optional[torch.Tensor], batch: int, gen: torch.Generator) -> torch.Tensor:
        """One re-noising σ per image, at a training timestep drawn uniformly from t_range: the VP schedule's
        σ there, or for a flow model (alphas_cumprod None) σ = t / 1000, its training levels."""
        table = sigmas_from_alphas_cumprod(alphas_cumprod.detach().double().cpu()) if alphas_cumprod is not None \
            else torch.arange(1, 1001, dtype=torch.float64) / 1000
        lo, hi = (round(f * (len(table) - 1)) for f in self.t_range)
        t = torch.randint(lo, hi + 1, (batch,), generator=gen)
        return table[t].float()

    def direction(self, base, latents: torch.Tensor, conditioning: dict, alphas_cumprod: Optional[torch.Tensor],
                  gen: torch.Generator, part: slice = slice(None), total: int | None = None) -> torch.Tensor:
        """The guidance direction x̂0(x_t, c) − x̂0(x_t, ∅) [B, C, h, w] of the frozen σ-denoiser `base` at a
        random re-noising of `latents`; detached. `conditioning`: r0_core.generate.conditioning(...,
        with_uncond=True) of the images' prompts. `latents` may be the `part` rows of a batch of `total`, whose
        re-noising is then drawn for the whole batch (as a trainer's processes share one). alphas_cumprod None:
        a rectified-flow model, re-noised as (1 − σ) x0 + σ n."""
        with torch.no_grad():
            x0 = latents.detach()
            total = total or len(x0)
            sigma = self.sigmas(alphas_cumprod, total, gen)[part].to(x0.device)
            noise = torch.randn((total, *x0.shape[1:]), generator=gen)[part].to(x0)
            renoise = vp_noise_scaling if alphas_cumprod is not None else flow_noise_scaling
            x_t = renoise(sigma.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype), noise, x0)
            both = base(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]),
                        **join(conditional(conditioning), unconditional(conditioning)))
            with_prompt, without = both.float().chunk(2)
        return with_prompt - without

    def surrogate(self, direction: torch.Tensor, latents: torch.Tensor, normalize: bool) -> torch.Tensor:
        """−w Σ_b <d_b, x0_b> (d scaled to unit norm per image if normalize): its gradient on the latents is the
        reward's push, −w d̂, and it flows on into whatever made them."""
        d = direction.to(latents)
        if normalize:
            d = d / (d.flatten(1).norm(dim=1).view(-1, *[1] * (d.ndim - 1)) + 1e-12)
        return -self.weight * (d * latents).sum()

    @staticmethod
    def gap(direction: torch.Tensor) -> torch.Tensor:
        """The reported score: the RMS size of the direction per image."""
        return direction.flatten(1).pow(2).mean(1).sqrt()
