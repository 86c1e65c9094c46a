"""ImageReward (Xu et al. 2023): BLIP's text encoder reads the prompt with cross-attention to the BLIP ViT image
tokens; its [CLS] state goes through a 5-layer linear MLP, standardised by the training-set mean and std.

Inputs are explicit local files: the official `ImageReward.pt` (or a .safetensors with the same flat keys
`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`), its `med_config.json`, and a folder with the
bert-base-uncased `vocab.txt`. The towers run as transformers' BlipVisionModel / BlipTextModel."""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..loading import ModelLoadError, read_checkpoint
from .base import OPENAI_MEAN, OPENAI_STD, RewardModel, preprocess, read_json

MAX_TOKENS = 35  # ImageReward pads/truncates every prompt to 35 tokens
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of the original nn.Sequential; 1, 3, 5 are dropouts
VIT, TEXT = "blip.visual_encoder.", "blip.text_encoder."
MARKERS = (VIT + "cls_token", VIT + "pos_embed", VIT + "patch_embed.proj.weight",
           TEXT + "embeddings.word_embeddings.weight",
           *(f"mlp.layers.{i}.{p}" for i in MLP_LAYERS for p in ("weight", "bias")))
# BLIP's create_vit builds ViT-B/16 (768 wide, 12 heads) and ViT-L/16 (1024, 16); tensor shapes cannot tell heads
# apart, so any other width needs "vision_num_attention_heads" in med_config.json
VIT_HEADS = {768: 12, 1024: 16}
MED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act")

# timm-style BLIP ViT names -> BlipVisionModel names, applied in order
VIT_RENAMES = ((r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
               (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^norm\.", "post_layernorm."),
               (r"^blocks\.(\d+)\.", r"encoder.layers.\1."), (r"\.norm(\d)\.", r".layer_norm\1."),
               (r"\.attn\.qkv\.", ".self_attn.qkv."), (r"\.attn\.proj\.", ".self_attn.projection."))


def vit_key(key: str) -> str:
    for pattern, replacement in VIT_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def read_image_reward(path: str) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)
    missing = [k for k in MARKERS if k not in state]
    if missing:
        raise ModelLoadError(f"{path} is not an ImageReward checkpoint: it lacks {', '.join(missing)}; expected the "
                             f"official ImageReward.pt (keys blip.visual_encoder.*, blip.text_encoder.*, "
                             f"mlp.layers.{{0,2,4,6,7}}.*) or a .safetensors with the same keys")
    return state


def load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> None:
    """Load every tensor the module has from `state` (extra checkpoint keys are ignored), naming any gap."""
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise ModelLoadError(f"ImageReward checkpoint {path} lacks {len(missing)} {what} tensors, e.g. "
                             f"{', '.join(missing[:5])}; is it a complete ImageReward.pt?")
    try:
        model.load_state_dict({k: state[k] for k in model.state_dict()})
    except RuntimeError as e:  # shape mismatch: the checkpoint disagrees with med_config.json
        raise ModelLoadError(f"ImageReward {what} in {path} does not fit its config: {e}") from e


def build_vision(state: dict[str, torch.Tensor], med: dict, path: str):
    from transformers import BlipVisionConfig, BlipVisionModel

    vit = {vit_key(k[len(VIT):]): v for k, v in state.items() if k.startswith(VIT)}
    width = vit["embeddings.class_embedding"].shape[-1]
    heads = med.get("vision_num_attention_heads") or VIT_HEADS.get(width)
    if not heads or width % heads:
        raise ModelLoadError(f"{path}: its ViT is {width} wide, not BLIP's ViT-B (768) or ViT-L (1024), so its head "
                             f"count cannot be told from its tensors; add \"vision_num_attention_heads\" to its "
                             f"med_config.json")
    patch = vit["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vit["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    layers = len({k.split(".")[2] for k in vit if k.startswith("encoder.layers.")})
    config = BlipVisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=vit["encoder.layers.0.mlp.fc1.weight"].shape[0],
                              image_size=grid * patch, patch_size=patch, hidden_act="gelu",
                              layer_norm_eps=1e-6,  # BLIP's ViT uses LayerNorm(eps=1e-6), not the 1e-5 default
                              attention_dropout=0.0)
    model = BlipVisionModel(config)
    load_exactly(model, vit, path, "vision")
    return model


def build_text(state: dict[str, torch.Tensor], med: dict, vision_width: int, path: str):
    from transformers import BlipTextConfig, BlipTextModel

    text = {k[len(TEXT):]: v for k, v in state.items() if k.startswith(TEXT)}
    config = BlipTextConfig(**{f: med[f] for f in MED_FIELDS},
                            vocab_size=text["embeddings.word_embeddings.weight"].shape[0],
                            encoder_hidden_size=vision_width,  # BLIP overwrites encoder_width with the ViT width
                            pad_token_id=med.get("pad_token_id", 0),
                            bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation only: unused
                            # dropout off so train() (needed for HF gradient checkpointing) scores as eval() does
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            # is_decoder only makes BlipTextLayer build its cross-attention; forward runs
                            # bidirectionally (is_decoder=False), as med.BertModel in "multimodal" mode
                            is_decoder=True, use_cache=False)
    model = BlipTextModel(config, add_pooling_layer=False)  # ImageReward's BertModel has no pooler
    load_exactly(model, text, path, "text")
    return model


def build_tokenizer(folder: str):
    """BLIP's init_tokenizer: bert-base-uncased plus [DEC] as bos and [ENC] as an extra special token."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(RewardModel):
    def __init__(self, vision, text, tokenizer, mlp: torch.nn.Sequential):
        super().__init__()
        self.vision, self.text, self.tokenizer, self.mlp = vision, text, tokenizer, mlp
        self.size = vision.config.image_size

    @classmethod
    def from_pretrained(cls, checkpoint_path: str, med_config_path: Optional[str] = None,
                        tokenizer_dir: Optional[str] = None) -> "ImageReward":
        """`med_config_path` defaults to med_config.json and `tokenizer_dir` to the folder beside the checkpoint."""
        folder = os.path.dirname(os.path.abspath(checkpoint_path))
        med_config_path = med_config_path or os.path.join(folder, "med_config.json")
        tokenizer_dir = tokenizer_dir or folder
        files = {"ImageReward checkpoint": checkpoint_path, "med_config.json": med_config_path,
                 "vocab.txt": os.path.join(tokenizer_dir, "vocab.txt")}
        missing = [f"{name} ({p})" for name, p in files.items() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"ImageReward needs ImageReward.pt (or .safetensors), med_config.json and the "
                                    f"bert-base-uncased vocab.txt; missing: {', '.join(missing)}")
        med = read_json(med_config_path)
        absent = [f for f in MED_FIELDS if f not in med]
        if absent:
            raise ModelLoadError(f"{med_config_path} lacks {', '.join(absent)}; expected ImageReward's BERT config")

        state = read_image_reward(checkpoint_path)
        vision = build_vision(state, med, checkpoint_path)
        text = build_text(state, med, vision.config.hidden_size, checkpoint_path)
        tokenizer = build_tokenizer(tokenizer_dir)
        if len(tokenizer) > text.config.vocab_size:
            raise ModelLoadError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the text encoder "
                                 f"only {text.config.vocab_size}; expected bert-base-uncased's vocab.txt")
        # no activations between the layers (they are commented out in ImageReward's MLP)
        mlp = torch.nn.Sequential(*[torch.nn.Linear(*state[f"mlp.layers.{i}.weight"].shape[::-1])
                                    for i in MLP_LAYERS])
        for layer, i in zip(mlp, MLP_LAYERS):
            layer.load_state_dict({"weight": state[f"mlp.layers.{i}.weight"], "bias": state[f"mlp.layers.{i}.bias"]})
        return cls(vision, text, tokenizer, mlp)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str,
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        prompts = self.check_inputs(images, prompts)
        pixels = preprocess(images.float(), self.size, OPENAI_MEAN, OPENAI_STD, self.size)  # ImageReward's transform
        image_tokens = self.vision(pixel_values=pixels.to(self.vision.dtype)).last_hidden_state
        # [CLS] stays at position 0: ImageReward.score does not swap in [ENC] as BLIP's ITM head does
        ids = {k: v.to(image_tokens.device) for k, v in self.tokenize(prompts, MAX_TOKENS).items()}
        # every image token is valid, so no encoder_attention_mask (ImageReward passes all ones)
        hidden = self.text(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                           encoder_hidden_states=image_tokens, is_decoder=False).last_hidden_state
        reward = hidden[:, 0].float()
        for layer in self.mlp:  # in fp32 as ImageReward does (.float() before the MLP), whatever the tower dtype
            reward = F.linear(reward, layer.weight.float(), layer.bias.float())
        return ((reward.squeeze(-1) - REWARD_MEAN) / REWARD_STD).float()
