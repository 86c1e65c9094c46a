"""Combining rewards: a weighted sum, R0's per-reward gradient normalisation, and RPO's λ-Harmonic reward."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import checks
from .base import RewardModel


class WeightedReward(RewardModel):
    """Σ_i w_i r_i(images, prompts). `r0_surrogate` gives the loss whose image gradient is R0's normalised
    direction −Σ_i w_i g_i / ||g_i|| (g_i = ∂r_i/∂images per image), so no reward dominates by scale alone."""

    def __init__(self, scorers: Sequence[RewardModel], weights: Optional[Sequence[float]] = None,
                 normalize_gradients: bool = True):
        super().__init__()
        self.normalize_gradients = normalize_gradients  # what an R0 trainer should do with this reward
        weights = [1.0] * len(scorers) if weights is None else list(weights)
        if not scorers or len(weights) != len(scorers):
            raise ValueError(f"got {len(scorers)} scorers and {len(weights)} weights; pass one weight per scorer")
        for i, w in enumerate(weights):
            checks.number(f"weights[{i}]", w)
        self.scorers = torch.nn.ModuleList(scorers)
        self.weights = weights

    def forward(self, images, prompts, references=None):
        return sum(w * s(images, prompts, references) for s, w in zip(self.scorers, self.weights))

    def r0_surrogate(self, images: torch.Tensor, prompts, references=None, eps: float = 1e-12):
        """(loss, scores): loss.backward() sends −Σ_i w_i ĝ_i into `images` and on through its graph."""
        direction = torch.zeros_like(images)
        scores = []
        for scorer, weight in zip(self.scorers, self.weights):
            score = scorer(images, prompts, references)
            (grad,) = torch.autograd.grad(score.sum(), images, retain_graph=True)
            norm = grad.flatten(1).norm(dim=1).view(-1, *([1] * (images.ndim - 1)))
            direction = direction + weight * grad / (norm + eps)
            scores.append(score.detach())
        return -(direction.detach() * images).sum(), torch.stack(scores)


def lambda_harmonic(image_ref_cos: torch.Tensor, image_text_cos: torch.Tensor, lam: float) -> torch.Tensor:
    """RPO's reward R = 1 / (λ/I + (1−λ)/T), with cosines mapped to [0, 1] by (s + 1) / 2."""
    if not 0 <= lam <= 1:
        raise ValueError(f"lam={lam}; expected a value in [0, 1]")
    i, t = (image_ref_cos + 1) / 2, (image_text_cos + 1) / 2
    return 1 / (lam / i + (1 - lam) / t)


class LambdaHarmonic(RewardModel):
    """λ-Harmonic reward over any scorer with `image_embeds` and `text_embeds` (CLIP-like or ALIGN):
    I = mean cosine to the reference images, T = cosine to the prompt. References given here are the default
    for every call (a subject's photos, bound once)."""

    def __init__(self, encoder: RewardModel, lam: float = 0.5, references: Optional[torch.Tensor] = None):
        super().__init__()
        if not (hasattr(encoder, "image_embeds") and hasattr(encoder, "text_embeds")):
            raise ValueError(f"the λ-Harmonic encoder must embed images and text (CLIP, HPSv2, PickScore or ALIGN); "
                             f"got {type(encoder).__name__}")
        lambda_harmonic(torch.zeros(1), torch.zeros(1), lam)  # validates lam now rather than at the first call
        self.encoder, self.lam, self.references = encoder, lam, references

    def forward(self, images, prompts, references=None):
        return lambda_harmonic(*self.cosines(images, prompts, references), self.lam)

    def cosines(self, images, prompts, references=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: (mean cosine to the references, cosine to the prompt), the two terms before λ."""
        prompts = self.check_inputs(images, prompts)
        references = self.references if references is None else references
        if references is None or len(references) == 0:
            raise ValueError("LambdaHarmonic needs reference images [N, 3, H, W] in 0..1 (the subject's photos)")
        image = self.encoder.image_embeds(images)
        refs = self.encoder.reference_embeds(references, image.device)
        text = self.encoder.text_embeds(prompts)
        return (image @ refs.T).mean(1), (image * text).sum(-1)
