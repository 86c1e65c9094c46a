"""DINO / DINOv2 image–image similarity (DreamBench's subject-fidelity metric): mean cosine between an image's
CLS embedding and those of the reference images, with a transformers ViTModel (DINO) or Dinov2Model folder."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .base import RewardModel, preprocess, read_json, require_files

FILES = ("config.json", "preprocessor_config.json")


class DinoSimilarity(RewardModel):
    def __init__(self, model, size, crop: Optional[int], mean, std):
        super().__init__()
        self.model, self.size, self.crop, self.mean, self.std = model, size, crop, mean, std

    @classmethod
    def from_pretrained(cls, folder: str) -> "DinoSimilarity":
        from transformers import AutoConfig, Dinov2Model, ViTModel

        require_files(folder, FILES, "DINO")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        models = {"vit": ViTModel, "dinov2": Dinov2Model}
        if config.model_type not in models:
            raise ValueError(f"{folder}/config.json has model_type {config.model_type!r}; expected 'vit' (DINO) or "
                             f"'dinov2'")
        kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        model = models[config.model_type].from_pretrained(folder, local_files_only=True, **kwargs)
        processor = read_json(os.path.join(folder, "preprocessor_config.json"))
        size = processor.get("size", 224)
        # ViT processors resize to an exact (height, width); DINOv2's resize the shortest side, then crop
        size = size.get("shortest_edge") or (size["height"], size["width"]) if isinstance(size, dict) else size
        crop = processor.get("crop_size") if processor.get("do_center_crop") else None
        crop = crop.get("height") if isinstance(crop, dict) else crop
        return cls(model, size, crop, processor["image_mean"], processor["image_std"])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images.float(), self.size, self.mean, self.std, self.crop)
        cls_token = self.model(pixel_values=pixels.to(self.model.dtype)).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls_token.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str = "",
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_inputs(images, prompts if not isinstance(prompts, str) else [prompts] * len(images))
        if references is None or len(references) == 0:
            raise ValueError("DINO similarity needs reference images [N, 3, H, W] in 0..1")
        image = self.image_embeds(images)
        return (image @ self.reference_embeds(references, image.device).T).mean(1)
