"""ALIGN score: cos(image, text) with a transformers AlignModel folder (`kakaobrain/align-base`: EfficientNet
image tower + BERT text tower), RPO's reward encoder. `image_embeds` / `text_embeds` give the L2-normalised
embeddings that RPO's ALIGN-I (image to reference images) and ALIGN-T (image to prompt) cosines are made of, so
`composite.LambdaHarmonic` runs on top of this scorer.

The image side replays the folder's EfficientNetImageProcessor on float tensors, differentiably. For align-base
(its preprocessor_config.json) that is: resize to exactly 346x346 (not shortest side) with antialiased bilinear,
centre crop 289x289, pixel * (1/127.5) - 1 on 0..255 pixels, i.e. 2x - 1 on 0..1 images, no mean/std
normalisation (do_normalize and include_top are false). The text side pads to 64 tokens as AlignProcessor does."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import RewardModel, preprocess, read_json
from .clip_score import features

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER = ("vocab.txt", "tokenizer.json")
MAX_LENGTH = 64  # AlignProcessor's text default (padding="max_length", max_length=64); align-base's model_max_length

# PIL resampling codes in preprocessor_config.json -> F.interpolate modes (others: bicubic)
_MODES = {2: "bilinear", 3: "bicubic"}


def check_folder(folder: str) -> None:
    """Clear errors for a folder that is not an ALIGN folder: missing files (all of them named), or a config.json
    of another model type (e.g. a CLIP folder)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ALIGN folder {folder} not found; expected a transformers AlignModel folder "
                                f"(e.g. kakaobrain/align-base) with config.json, preprocessor_config.json, "
                                f"model.safetensors (or pytorch_model.bin) and vocab.txt (or tokenizer.json)")
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    config = os.path.join(folder, "config.json")
    if has("config.json"):
        model_type = read_json(config).get("model_type")
        if model_type != "align":
            raise ValueError(f"{config} has model_type {model_type!r}; AlignScore needs an ALIGN folder "
                             f"(model_type 'align', e.g. kakaobrain/align-base), not a {model_type or 'untyped'} one")
    missing = [name for name in ("config.json", "preprocessor_config.json") if not has(name)]
    if not any(has(name) for name in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    if not any(has(name) for name in TOKENIZER):
        missing.append(" or ".join(TOKENIZER))
    if missing:
        raise FileNotFoundError(f"ALIGN folder {folder} lacks {'; '.join(missing)}; expected config.json, "
                                f"preprocessor_config.json, model.safetensors (or pytorch_model.bin) and the BERT "
                                f"tokenizer's vocab.txt (or tokenizer.json)")


def _per_channel(value, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"preprocessor_config.json {name}={value}; expected one value or three (RGB)")
    return values


def image_settings(processor: dict) -> dict:
    """The EfficientNetImageProcessor steps of a preprocessor_config.json, as float-pipeline settings.

    The processor computes, on 0..255 pixels p: v = p * rescale_factor (- 1 if rescale_offset), then
    (v - mean) / std if do_normalize, then v / std again if include_top. On 0..1 images x = p / 255 that is one
    affine map per channel, (x - m) / s, with m = (offset + mean) / a and s = std * std_top / a for
    a = 255 * rescale_factor (mean = 0, std = 1 without do_normalize; std_top = std with include_top, else 1)."""
    size = processor.get("size", {"height": 346, "width": 346})
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        size = (int(size["height"]), int(size["width"]))  # exact size, EfficientNet's (and align-base's) kind
    elif isinstance(size, dict) and size.get("shortest_edge"):
        size = int(size["shortest_edge"])
    elif isinstance(size, (int, float)):
        size = (int(size), int(size))
    else:
        raise ValueError(f"preprocessor_config.json size={size}; expected {{height, width}} or {{shortest_edge}}")
    crop = None
    if processor.get("do_center_crop", False):
        crop_size = processor.get("crop_size", {"height": 289, "width": 289})
        crop_size = crop_size if isinstance(crop_size, dict) else {"height": crop_size, "width": crop_size}
        if crop_size.get("height") != crop_size.get("width"):
            raise ValueError(f"preprocessor_config.json crop_size={crop_size}; only square crops are supported")
        crop = int(crop_size["height"])
    resample = int(processor.get("resample", 3))
    scale = 255 * float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 255.0
    offset = 1.0 if processor.get("do_rescale", True) and processor.get("rescale_offset", False) else 0.0
    std = _per_channel(processor.get("image_std", 0.5), "image_std")
    if processor.get("do_normalize", True):
        mean, norm_std = _per_channel(processor.get("image_mean", 0.5), "image_mean"), std
    else:
        mean, norm_std = [0.0] * 3, [1.0] * 3
    top_std = std if processor.get("include_top", True) else [1.0] * 3
    return dict(size=size, crop=crop, mode=_MODES.get(resample, "bicubic"),
                mean=[(offset + m) / scale for m in mean],
                std=[s * t / scale for s, t in zip(norm_std, top_std)])


class AlignScore(RewardModel):
    """ALIGN-T: cos(ALIGN image embedding, ALIGN text embedding) per image, in [-1, 1], float32 [B]."""

    def __init__(self, model, tokenizer, size, crop: Optional[int], mean, std, mode: str = "bilinear"):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size, self.crop, self.mean, self.std, self.mode = size, crop, mean, std, mode

    @classmethod
    def from_pretrained(cls, folder: str) -> "AlignScore":
        """A transformers AlignModel folder: config.json (model_type 'align'), model.safetensors (preferred) or
        pytorch_model.bin (or their sharded indexes), preprocessor_config.json, vocab.txt or tokenizer.json."""
        from transformers import AlignModel, BertTokenizer

        folder = os.fspath(folder)
        check_folder(folder)
        settings = image_settings(read_json(os.path.join(folder, "preprocessor_config.json")))
        model = AlignModel.from_pretrained(folder, local_files_only=True)
        tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, **settings)

    @property
    def max_length(self) -> int:
        return min(MAX_LENGTH, self.model.config.text_config.max_position_embeddings)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in 0..1 -> the model's pixel_values, as the folder's image processor makes them."""
        return preprocess(images.float(), self.size, self.mean, self.std, self.crop, self.mode)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts, self.max_length)
        text = features(self.model.get_text_features(**{k: v.to(self.model.device) for k, v in tokens.items() if k in
                                                        ("input_ids", "attention_mask", "token_type_ids")}))
        return F.normalize(text.float(), dim=-1)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.pixels(images).to(self.model.device, self.model.dtype)
        image = features(self.model.get_image_features(pixel_values=pixels))
        return F.normalize(image.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str,
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        prompts = self.check_inputs(images, prompts)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
