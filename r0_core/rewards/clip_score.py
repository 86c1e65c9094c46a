"""CLIP score: max(100 · cos(image, text), 0) with a transformers CLIPModel folder (OpenAI CLIP, or the tiny
world's CLIP), as torchmetrics defines it. Also the CLIP folder reading that PickScore, HPS and the aesthetic
head build on."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .base import OPENAI_MEAN, OPENAI_STD, RewardModel, preprocess, read_json, require_files

WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features where 4.x returned the tensor."""
    return getattr(output, "pooler_output", output)


def clip_tokenizer(folder: str):
    """A CLIP BPE tokenizer from a local folder: vocab.json + merges.txt, or tokenizer.json."""
    from transformers import CLIPTokenizer

    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if not has("tokenizer.json"):
        missing = [name for name in ("vocab.json", "merges.txt") if not has(name)]
        if missing:
            raise FileNotFoundError(f"CLIP tokenizer folder {folder} lacks {', '.join(missing)}; expected "
                                    f"vocab.json + merges.txt (or tokenizer.json), OpenAI CLIP's BPE files; "
                                    f"pass the folder that has them as tokenizer_dir")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def image_settings(folder: str, image_size: int) -> tuple[int, int, Sequence[float], Sequence[float]]:
    """(size, crop, mean, std) from preprocessor_config.json; without one, CLIPImageProcessor's defaults (shortest
    side to the model's image size, centre crop, OpenAI mean/std), as early PickScore uploads need."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return image_size, image_size, OPENAI_MEAN, OPENAI_STD
    processor = read_json(path)
    size = processor.get("size", image_size)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = processor.get("crop_size", size)
    crop = crop.get("height") if isinstance(crop, dict) else crop
    return size, crop, processor.get("image_mean", OPENAI_MEAN), processor.get("image_std", OPENAI_STD)


class ClipScore(RewardModel):
    def __init__(self, model, tokenizer, size: int, crop: Optional[int], mean, std):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size, self.crop, self.mean, self.std = size, crop, mean, std

    @classmethod
    def from_pretrained(cls, folder: str, tokenizer_dir: Optional[str] = None):
        """`folder`: config.json + model.safetensors (or pytorch_model.bin), preprocessor_config.json optional.
        `tokenizer_dir`: where vocab.json + merges.txt (or tokenizer.json) live when `folder` lacks them."""
        from transformers import CLIPModel

        require_files(folder, ("config.json",), cls.__name__)
        if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHTS):
            raise FileNotFoundError(f"{cls.__name__} folder {folder} lacks its weights; expected "
                                    f"{' or '.join(WEIGHTS)}")
        tokenizer = clip_tokenizer(tokenizer_dir or folder)
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        return cls(model.eval(), tokenizer, *image_settings(folder, model.config.vision_config.image_size))

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(prompts, self.model.config.text_config.max_position_embeddings)["input_ids"]
        text = features(self.model.get_text_features(input_ids=ids.to(self.model.device)))
        return torch.nn.functional.normalize(text.float(), dim=-1)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images.float(), self.size, self.mean, self.std, self.crop)
        image = features(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)))
        return torch.nn.functional.normalize(image.float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        prompts = self.check_inputs(images, prompts)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str,
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (100 * self.cosine(images, prompts)).clamp(min=0)
