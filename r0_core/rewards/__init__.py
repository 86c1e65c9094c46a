"""Reward scorers: one protocol (float images [B, 3, H, W] in 0..1 + prompts -> one differentiable score per
image), one preprocessing path, seven families loaded from their official files, and the composites R0 and RPO
use. `load_reward(family, path)` is the way in."""
from .aesthetic import AestheticScore
from .align import AlignScore
from .base import RewardModel, preprocess, score_in_batches
from .clip_score import ClipScore
from .composite import LambdaHarmonic, WeightedReward, lambda_harmonic
from .dino import DinoSimilarity
from .families import FAMILIES, load_reward, offload
from .hps import HPSv2
from .image_reward import ImageReward
from .pickscore import PickScore

__all__ = ["FAMILIES", "AestheticScore", "AlignScore", "ClipScore", "DinoSimilarity", "HPSv2", "ImageReward",
           "LambdaHarmonic", "PickScore", "RewardModel", "WeightedReward", "lambda_harmonic", "load_reward",
           "offload", "preprocess", "score_in_batches"]
