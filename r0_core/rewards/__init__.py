"""Reward scorers: one protocol (float images [B, 3, H, W] in 0..1 + prompts -> one differentiable score per
image), one preprocessing path, cached models. Families arrive one file each."""
from .aesthetic import AestheticScore
from .base import RewardModel, cached, offload, preprocess
from .clip_score import ClipScore
from .composite import LambdaHarmonic, WeightedReward, lambda_harmonic
from .dino import DinoSimilarity

__all__ = ["RewardModel", "AestheticScore", "ClipScore", "DinoSimilarity", "LambdaHarmonic", "WeightedReward", "cached",
           "lambda_harmonic", "offload", "preprocess"]
