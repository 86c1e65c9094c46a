"""Every reward family by name, and `load_reward`, the one way nodes, trainers and scripts get a scorer.

A family reads its main file or folder (`path`) and, where the official release splits them, a companion
(`support`): the CLIP tokenizer for HPS, med_config.json + vocab.txt for ImageReward, the CLIP ViT-L/14 folder for
the aesthetic head. A companion defaults to the main file's own folder, so one folder in models/reward_models
holding everything just works. An HPS checkpoint may have open_clip's `open_clip_config.json` beside it, whose
head counts and activation HPSv2 then uses (open_clip reads a model's architecture from that config, not from its
tensors). Loaded scorers are cached by family, paths, dtype and device (r0_core.caching: the most recently used
R0_MAX_REWARD_MODELS, default 4).

`path="tiny"` selects the tiny world's own model of a family: its CLIP, or the HPS, ImageReward and aesthetic
models that r0_core.tiny.reward_stack learns from the world's oracle."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..caching import ModelCache
from ..loading import (TINY, TINY_AESTHETIC, TINY_CLIP_DIR, TINY_HPS, TINY_IMAGE_REWARD, ModelLoadError,
                       load_failure, pick_device_dtype)
from .aesthetic import AestheticScore
from .align import AlignScore
from .base import RewardModel
from .clip_score import ClipScore
from .dino import DinoSimilarity
from .hps import OPEN_CLIP_CONFIG, HPSv2
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


def _with(path: str, *companions: str) -> tuple[str, ...]:
    """A main file and the companion files beside it."""
    return (path, *(os.path.join(os.path.dirname(path), name) for name in companions))


# family -> (path, support, the files its loader reads) of the tiny world's own models
TINY_MODELS = {
    "clip": (TINY_CLIP_DIR, None, _with(os.path.join(TINY_CLIP_DIR, "model.safetensors"), "config.json",
                                        "tokenizer.json")),
    "hpsv2": (TINY_HPS, None, _with(TINY_HPS, OPEN_CLIP_CONFIG, "tokenizer.json")),
    "image_reward": (TINY_IMAGE_REWARD, None, _with(TINY_IMAGE_REWARD, "med_config.json", "vocab.txt")),
    "aesthetic": (TINY_AESTHETIC, TINY_CLIP_DIR, _with(TINY_AESTHETIC)),
}


def tiny_model(family: str) -> tuple[str, Optional[str]]:
    """(path, support) of the tiny world's model of `family`, after checking that its files are there."""
    if family not in TINY_MODELS:
        raise ValueError(f"the tiny world has no {family!r} model; for path 'tiny' choose family "
                         f"{', '.join(repr(f) for f in TINY_MODELS)}")
    path, support, files = TINY_MODELS[family]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        build = "python -m r0_core.tiny.build" if family == "clip" else "python -m r0_core.tiny.reward_stack"
        raise ModelLoadError(f"the tiny {family} model is not built: {', '.join(missing)} not found; build it with "
                             f"`{build}` (it writes into r0_core/tiny/weights), or choose family 'clip' for the "
                             f"shipped tiny CLIP")
    return path, support


def _required(support: Optional[str], family: str) -> str:
    if not support:
        raise ValueError(f"the {family} family needs support: {FAMILIES[family].support}")
    return support


# at most R0_MAX_REWARD_MODELS scorers (default 4: the full mix and one more), the least recently used dropped first
def _free_gpu() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_CACHE = ModelCache("R0_MAX_REWARD_MODELS", 4, on_drop=_free_gpu)


def load_reward(family: str, path: str, support: Optional[str] = None, device=None, dtype=None) -> RewardModel:
    """A frozen, eval-mode scorer, loaded once per (family, path, support, dtype, device) and reused.
    `path="tiny"` is the tiny world's model of the family (clip, hpsv2, image_reward or aesthetic); a given
    `support` replaces its default companion."""
    if family not in FAMILIES:
        raise ValueError(f"reward family {family!r} is unknown; choose one of {', '.join(FAMILIES)}")
    if path == TINY:
        path, default = tiny_model(family)
        support = support or default
    device, dtype = pick_device_dtype(device, dtype)
    key = (family, os.path.realpath(path), support and os.path.realpath(support), str(dtype), str(device))

    def load():
        # load outside inference mode: trainers need the weights as ordinary tensors to backprop through
        with torch.inference_mode(False):
            try:
                scorer = FAMILIES[family].load(path, support)
            except (ModelLoadError, FileNotFoundError):
                raise
            except Exception as e:  # the libraries' own errors, named and explained
                raise load_failure(f"the {family} reward", path, e) from e
        return scorer.to(device, dtype).eval().requires_grad_(False)
    return _CACHE.get_or_load(key, load).to(device)


def offload() -> None:
    """Move every cached scorer to the CPU (ComfyUI cannot see them, so nodes call this to free the GPU)."""
    for scorer in _CACHE.values():
        scorer.to("cpu")
