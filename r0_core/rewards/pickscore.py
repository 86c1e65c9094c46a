"""PickScore: logit_scale.exp() · cos(image, text) of a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences
(`yuvalkirstain/PickScore_v1`, a transformers CLIPModel folder; early uploads lack the processor and tokenizer
files, see ClipScore.from_pretrained). Typical values are about 20-23; a softmax over the candidates for one
prompt gives preference probabilities."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .clip_score import ClipScore


class PickScore(ClipScore):
    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str,
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        # no clamp: negative cosines stay ordered
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)
