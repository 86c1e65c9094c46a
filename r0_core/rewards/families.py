"""Every reward family by name, and `load_reward`, the one way nodes, trainers and scripts get a scorer.

A family reads its main file or folder (`path`) and, where the official release splits them, a companion
(`support`): the CLIP tokenizer for HPS, med_config.json + vocab.txt for ImageReward, the CLIP ViT-L/14 folder for
the aesthetic head. A companion defaults to the main file's own folder, so one folder in models/reward_models
holding everything just works. Loaded scorers are cached by family, paths, dtype and device."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..loading import TINY, TINY_CLIP_DIR, pick_device_dtype
from .aesthetic import AestheticScore
from .align import AlignScore
from .base import RewardModel
from .clip_score import ClipScore
from .dino import DinoSimilarity
from .hps import HPSv2
from .image_reward import ImageReward
from .pickscore import PickScore


@dataclass(frozen=True)
class Family:
    load: Callable[[str, Optional[str]], RewardModel]  # (path, support) -> scorer
    path: str  # what the main input is, for messages and tooltips
    support: str = ""  # what the companion is; empty when the family has none
    references: bool = False  # scores compare against reference images


def _beside(path: str, support: Optional[str]) -> str:
    return support or (path if os.path.isdir(path) else os.path.dirname(path))


FAMILIES: dict[str, Family] = {
    "clip": Family(lambda p, s: ClipScore.from_pretrained(p, s),
                   "a transformers CLIP folder (e.g. openai/clip-vit-large-patch14), or 'tiny'",
                   "optional tokenizer folder"),
    "hpsv2": Family(lambda p, s: HPSv2.from_pretrained(p, _beside(p, s)),
                    "HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (or .safetensors, open_clip keys)",
                    "CLIP tokenizer folder (vocab.json + merges.txt); default: beside the checkpoint"),
    "pickscore": Family(lambda p, s: PickScore.from_pretrained(p, s),
                        "the PickScore_v1 transformers folder", "optional tokenizer folder"),
    "image_reward": Family(lambda p, s: ImageReward.from_pretrained(
                               p, os.path.join(_beside(p, s), "med_config.json"), _beside(p, s)),
                           "ImageReward.pt (or .safetensors)",
                           "folder with med_config.json + BERT vocab.txt; default: beside the checkpoint"),
    "aesthetic": Family(lambda p, s: AestheticScore.from_pretrained(_required(s, "aesthetic"), p),
                        "sac+logos+ava1-l14-linearMSE.pth (or .safetensors)",
                        "the CLIP ViT-L/14 transformers folder (required)"),
    "align": Family(lambda p, s: AlignScore.from_pretrained(p), "the ALIGN transformers folder (kakaobrain/align-base)"),
    "dino": Family(lambda p, s: DinoSimilarity.from_pretrained(p),
                   "a DINO (ViT) or DINOv2 transformers folder", references=True),
}


def _required(support: Optional[str], family: str) -> str:
    if not support:
        raise ValueError(f"the {family} family needs support: {FAMILIES[family].support}")
    return support


_CACHE: dict[tuple, RewardModel] = {}


def load_reward(family: str, path: str, support: Optional[str] = None, device=None, dtype=None) -> RewardModel:
    """A frozen, eval-mode scorer, loaded once per (family, path, support, dtype, device) and reused.
    `path="tiny"` with family "clip" is the built-in tiny world's CLIP."""
    if family not in FAMILIES:
        raise ValueError(f"reward family {family!r} is unknown; choose one of {', '.join(FAMILIES)}")
    if path == TINY:
        if family != "clip":
            raise ValueError(f"the built-in tiny model is a CLIP; choose family 'clip', not {family!r}")
        path = TINY_CLIP_DIR
    device, dtype = pick_device_dtype(device, dtype)
    key = (family, os.path.realpath(path), support and os.path.realpath(support), str(dtype), str(device))
    if key not in _CACHE:
        # load outside inference mode: trainers need the weights as ordinary tensors to backprop through
        with torch.inference_mode(False):
            scorer = FAMILIES[family].load(path, support)
        _CACHE[key] = scorer.to(device, dtype).eval().requires_grad_(False)
    return _CACHE[key].to(device)


def offload() -> None:
    """Move every cached scorer to the CPU (ComfyUI cannot see them, so nodes call this to free the GPU)."""
    for scorer in _CACHE.values():
        scorer.to("cpu")
