"""Reward scorers: one protocol (float images [B, 3, H, W] in 0..1 + prompts -> one differentiable score per
image), one preprocessing path, cached models. Families arrive one file each."""
from .base import RewardModel, cached, offload, preprocess
from .clip_score import ClipScore

__all__ = ["RewardModel", "ClipScore", "cached", "offload", "preprocess"]
