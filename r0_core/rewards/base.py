"""The scorer protocol shared by every reward family, its one differentiable preprocessing path, and the model
cache. A scorer maps float images [B, 3, H, W] in 0..1 (+ prompts, + optional reference images) to one score
per image, differentiable with respect to the images."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import checks

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, also used by HPS and ImageReward
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_SIZE = 8  # smaller images carry no signal a vision tower can read


class RewardModel(torch.nn.Module):
    """Base of all scorers: `forward(images, prompts, references=None) -> scores [B]`."""

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str,
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, prompts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        """`self.tokenizer` output padded to max_length, cached per prompt: trainers and best-of-N score the same
        prompts again and again, and at small model sizes tokenizing costs as much as the text tower."""
        cache = self.__dict__.setdefault("_token_cache", {})
        new = [p for p in dict.fromkeys(prompts) if (p, max_length) not in cache]
        if new:
            if len(cache) > 50_000:
                cache.clear()
            with torch.inference_mode(False):  # cached ids must also serve later calls that need gradients
                out = self.tokenizer(new, padding="max_length", truncation=True, max_length=max_length,
                                     return_tensors="pt")
            for i, p in enumerate(new):
                cache[p, max_length] = {k: v[i] for k, v in out.items()}
        rows = [cache[p, max_length] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def reference_embeds(self, references: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`self.image_embeds(references)` on `device`, kept while the same tensor, unchanged in place, comes back:
        trainers and evaluators score every batch against one fixed set of reference images."""
        cached = self.__dict__.get("_reference_cache")
        if references.requires_grad:   # a caller differentiating through the references gets them fresh
            return self.image_embeds(references.to(device))
        version = None if references.is_inference() else references._version   # inference tensors keep none
        if cached is None or cached[0] is not references or cached[1] != version:
            with torch.no_grad(), torch.inference_mode(False):
                embeds = self.image_embeds(references.to(device))
            self.__dict__["_reference_cache"] = cached = (references, version, embeds)
        return cached[2].to(device)

    @staticmethod
    def check_inputs(images: torch.Tensor, prompts: Sequence[str] | str) -> list[str]:
        """Validate a batch; returns one prompt per image (a single prompt is repeated)."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images has shape {shape}; expected float [B, 3, H, W] in 0..1")
        if min(images.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} pixels; scorers need at least "
                             f"{MIN_SIZE}x{MIN_SIZE} (any larger size and aspect is resized inside)")
        checks.unit_range("images", images)  # dtype, empty batch, NaN/inf and 0..1 in one pass
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images; pass one, or one per image")
        return prompts


def preprocess(images: torch.Tensor, size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float],
               crop: Optional[int] = None, mode: str = "bicubic") -> torch.Tensor:
    """Shortest side to `size` (or exactly to (height, width)) with antialiased `mode` resizing, centre crop to
    `crop` by slicing, normalise: the processors' steps without PIL, so gradients flow to the images."""
    h, w = images.shape[-2:]
    if isinstance(size, tuple):
        new_h, new_w = size
    else:
        # the short side to `size`, the long one to int(size · long / short), truncated as torchvision's
        # Resize and the transformers image processors compute it (round() gives 299 rows for 512x384 where they
        # give 298)
        short, long = min(h, w), max(h, w)
        resized = (size, int(size * long / short))
        new_h, new_w = resized if h <= w else resized[::-1]
        new_h, new_w = max(new_h, crop or size), max(new_w, crop or size)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    if crop is not None or not isinstance(size, tuple):
        crop = crop or size
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
        images = images[..., top:top + crop, left:left + crop]
    mean = images.new_tensor(mean).view(1, -1, 1, 1)
    std = images.new_tensor(std).view(1, -1, 1, 1)
    return (images - mean) / std


def require_files(folder: str, files: Sequence[str], what: str) -> None:
    """A clear error listing every missing file of a model folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder {folder} not found; expected a folder with {', '.join(files)}")
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{what} folder {folder} lacks {', '.join(missing)}; expected {', '.join(files)}")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def score_in_batches(scorer: RewardModel, images: torch.Tensor, prompts: Sequence[str] | str,
                     references: Optional[torch.Tensor] = None, batch_size: int = 16,
                     callback=None) -> torch.Tensor:
    """Scores [B] (float32, CPU) of any number of images, `batch_size` at a time on the scorer's device;
    `callback({"i": chunk, "total": chunks})` after each chunk (progress, and where a host can cancel)."""
    prompts = scorer.check_inputs(images, prompts)
    device = next(scorer.parameters()).device
    references = None if references is None else references.to(device)
    starts = range(0, len(images), batch_size)
    scores = []
    for i, start in enumerate(starts):
        chunk = images[start:start + batch_size].to(device)
        scores.append(scorer(chunk, prompts[start:start + batch_size], references).float().cpu())
        if callback is not None:
            callback({"i": i, "total": len(starts)})
    return torch.cat(scores)
