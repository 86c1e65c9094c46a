"""CLIP score: max(100 · cos(image, text), 0) with a transformers CLIPModel folder (OpenAI CLIP, or the tiny
world's CLIP), as torchmetrics defines it."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .base import RewardModel, preprocess, read_json, require_files

FILES = ("config.json", "preprocessor_config.json")


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features where 4.x returned the tensor."""
    return getattr(output, "pooler_output", output)


class ClipScore(RewardModel):
    def __init__(self, model, tokenizer, size: int, crop: int, mean, std):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size, self.crop, self.mean, self.std = size, crop, mean, std

    @classmethod
    def from_pretrained(cls, folder: str, tokenizer_dir: Optional[str] = None) -> "ClipScore":
        """`tokenizer_dir`: where vocab.json + merges.txt (or tokenizer.json) live when the model folder lacks
        them, as in early PickScore uploads."""
        from transformers import CLIPModel, CLIPTokenizer

        require_files(folder, FILES, "CLIP")
        tokenizer_dir = tokenizer_dir or folder
        if not any(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(f"no CLIP tokenizer in {tokenizer_dir}: expected vocab.json + merges.txt (or "
                                    f"tokenizer.json); pass the folder that has them as tokenizer_dir")
        processor = read_json(os.path.join(folder, "preprocessor_config.json"))
        size = processor.get("size", {})
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = processor.get("crop_size", size)
        crop = crop.get("height") if isinstance(crop, dict) else crop
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, tokenizer, size, crop, processor["image_mean"], processor["image_std"])

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings)
        text = features(self.model.get_text_features(input_ids=ids.input_ids.to(self.model.device)))
        return torch.nn.functional.normalize(text.float(), dim=-1)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images.float(), self.size, self.mean, self.std, self.crop)
        image = features(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)))
        return torch.nn.functional.normalize(image.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str,
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        prompts = self.check_inputs(images, prompts)
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return (100 * cos).clamp(min=0)
