"""LAION aesthetic predictor v2: a 5-layer linear MLP (keys layers.{0,2,4,6,7}) on the L2-normalised CLIP
ViT-L/14 image embedding. The head file (.safetensors, or .pth read with weights_only=True) and the CLIP
folder are both explicit local inputs."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..loading import read_checkpoint
from .base import RewardModel
from .clip_score import ClipScore

HEAD_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of the original nn.Sequential; 1, 3, 5 are dropouts


def read_head(path: str) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)
    missing = [f"layers.{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias") if f"layers.{i}.{p}" not in state]
    if missing:
        raise ValueError(f"aesthetic head {path} lacks {', '.join(missing)}; expected the improved-aesthetic-"
                         f"predictor MLP (a different head, e.g. reluMSE, is not this architecture)")
    return state


class AestheticScore(RewardModel):
    def __init__(self, clip: ClipScore, head: dict[str, torch.Tensor]):
        super().__init__()
        self.clip = clip
        # no activations between the layers, as in the released linearMSE heads
        self.head = torch.nn.Sequential(*[torch.nn.Linear(*head[f"layers.{i}.weight"].shape[::-1])
                                          for i in HEAD_LAYERS])
        for layer, i in zip(self.head, HEAD_LAYERS):
            layer.load_state_dict({"weight": head[f"layers.{i}.weight"], "bias": head[f"layers.{i}.bias"]})

    @classmethod
    def from_pretrained(cls, clip_folder: str, head_path: str) -> "AestheticScore":
        return cls(ClipScore.from_pretrained(clip_folder), read_head(head_path))

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str = "",
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_inputs(images, prompts if not isinstance(prompts, str) else [prompts] * len(images))
        embeds = self.clip.image_embeds(images)  # already L2-normalised
        return self.head(embeds.to(self.head[0].weight.dtype)).squeeze(-1).float()
