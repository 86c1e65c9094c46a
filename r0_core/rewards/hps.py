"""HPS v2 / v2.1 (Human Preference Score): cos(image, text) of an open_clip ViT-H-14 fine-tuned on human
preferences. The official open_clip checkpoint is remapped onto a transformers CLIPModel, so neither open_clip nor
torchvision is needed. Scores compare images of the *same* prompt; v2 and v2.1 scores are not comparable."""
from __future__ import annotations

import functools
import html
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..loading import ModelLoadError, read_checkpoint
from .base import OPENAI_MEAN, OPENAI_STD, preprocess, read_json
from .clip_score import ClipScore, clip_tokenizer, features

# keys the architecture is read from; a file without them is some other model
SHAPE_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight",
              "text_projection")

# open_clip name -> transformers CLIPModel name
TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic, transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",  # transposed: open_clip computes x @ proj
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed
    "logit_scale": "logit_scale",
}
BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
          "transformer.resblocks.": "text_model.encoder.layers."}


def letterbox(images: torch.Tensor, size: int) -> torch.Tensor:
    """hpsv2's ResizeMaxSize: longest side to `size` (antialiased bicubic), then pad to a square with black,
    centred, in pixel space so the padding is 0 before normalisation. Differentiable."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = max(round(h * scale), 1), max(round(w * scale), 1)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    # hpsv2 pads only when it resized; we always pad, which is the same for every input it can score
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


OPEN_CLIP_CONFIG = "open_clip_config.json"   # open_clip's model config, read from beside the checkpoint if there
# head counts of open_clip's released towers by width (64-wide heads, except the 80/88/104-wide ones of the H/g/bigG
# vision towers); shapes cannot tell heads apart, so any other width needs open_clip_config.json
KNOWN_HEADS = {"vision_config": {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16},
               "text_config": {512: 8, 768: 12, 1024: 16, 1280: 20}}


def open_clip_overrides(config: dict) -> dict:
    """CLIPConfig overrides from an open_clip_config.json ({"model_cfg": {...}}, or the bare model config of
    open_clip's model_configs/*.json): head counts (open_clip's defaults: 64-wide vision heads, 8 text heads) and
    quick GELU."""
    model = config.get("model_cfg", config)
    vision, text = model.get("vision_cfg", {}), model.get("text_cfg", {})
    act = {"hidden_act": "quick_gelu"} if model.get("quick_gelu") else {}
    overrides = {"text_config": dict(act, num_attention_heads=text.get("heads", 8))}
    if "width" in vision:
        overrides["vision_config"] = dict(act, num_attention_heads=vision["width"] // vision.get("head_width", 64))
    return overrides


def infer_config(state: dict, tokenizer, overrides: Optional[dict] = None, path: str = "<state dict>") -> dict:
    """CLIPConfig arguments read off the tensor shapes of an open_clip state dict; head counts from `overrides`,
    else from KNOWN_HEADS, else refused (a wrong count loads without error and scores wrongly)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = int((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = state["token_embedding.weight"].shape
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5)  # laion/HPS use exact GELU, not OpenAI's quick_gelu
    vision = dict(common, hidden_size=width, patch_size=patch, image_size=grid * patch,
                  intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=count("visual.transformer.resblocks."))
    # pooling: transformers takes the first `eos_token_id` (argmax of ids only when eos_token_id == 2); open_clip
    # takes the argmax id, which is the eos token of the real 49408-token vocabulary. The tokenizer's eos works for
    # both that and tiny vocabularies.
    text = dict(common, hidden_size=text_width, vocab_size=vocab,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=count("transformer.resblocks."),
                max_position_embeddings=state["positional_embedding"].shape[0],
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = dict(vision_config=vision, text_config=text, projection_dim=state["text_projection"].shape[1])
    for key, value in (overrides or {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    for tower in ("vision_config", "text_config"):
        width = config[tower]["hidden_size"]
        heads = config[tower].get("num_attention_heads") or KNOWN_HEADS[tower].get(width)
        if not heads or width % heads:
            raise ModelLoadError(f"{path}: its {tower.split('_')[0]} tower is {width} wide, not a width of a released "
                                 f"open_clip model, so its head count cannot be told from its tensors; put open_clip's "
                                 f"model config beside it as {OPEN_CLIP_CONFIG} (text_cfg.heads, vision_cfg.head_width)")
        config[tower]["num_attention_heads"] = heads
    return config


def to_transformers(state: dict) -> tuple[dict, list[str]]:
    """open_clip state dict -> (CLIPModel state dict in fp32, keys it has no place for)."""
    out, unknown = {}, []
    for key, value in state.items():
        value = value.float()
        tower = next((p for p in TOWERS if key.startswith(p)), None)
        if key in TOP:
            out[TOP[key]] = value.T if key in ("visual.proj", "text_projection") else value
        elif tower is not None:
            i, name = key[len(tower):].split(".", 1)
            layer = f"{TOWERS[tower]}{i}."
            module, _, param = name.rpartition(".")
            if name.startswith("attn.in_proj_"):  # fused q/k/v -> three projections
                for proj, part in zip("qkv", value.chunk(3)):
                    out[f"{layer}self_attn.{proj}_proj.{name.rsplit('_', 1)[1]}"] = part
            elif module in BLOCK:
                out[f"{layer}{BLOCK[module]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    return out, unknown


def to_open_clip(state: dict) -> tuple[dict, list[str]]:
    """CLIPModel state dict -> (open_clip state dict, keys it has no place for): the inverse of to_transformers,
    dtypes kept. The three attention projections are fused back into open_clip's in_proj."""
    top = {v: k for k, v in TOP.items()}
    block = {v: k for k, v in BLOCK.items()}
    out, unknown = {}, []
    for key, value in state.items():
        tower = next((t for t, p in TOWERS.items() if key.startswith(p)), None)
        if key in top:
            name = top[key]
            out[name] = value.T.contiguous() if name in ("visual.proj", "text_projection") else value
        elif tower is not None:
            prefix, (i, name) = key[:len(TOWERS[tower])], key[len(TOWERS[tower]):].split(".", 1)
            module, _, param = name.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":  # k and v are taken with q
                    parts = [state[f"{prefix}{i}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[f"{tower}{i}.attn.in_proj_{param}"] = torch.cat(parts)
            elif module in block:
                out[f"{tower}{i}.{block[module]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    return out, unknown


def not_hps(path: str, detail: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is not an open_clip HPS checkpoint ({detail}); expected HPS_v2_compressed.pt or "
                          f"HPS_v2.1_compressed.pt (or a .safetensors of it): open_clip ViT-H-14 keys such as "
                          f"visual.conv1.weight, token_embedding.weight, transformer.resblocks.0.attn.in_proj_weight")


class HPSv2(ClipScore):
    """HPS v2 and v2.1: cos(L2-normalised image feature, L2-normalised text feature), no logit scale."""

    @classmethod
    def from_pretrained(cls, checkpoint_path: str, tokenizer_dir: str, config: Optional[dict] = None) -> "HPSv2":
        """`checkpoint_path`: the official open_clip file (dict with 'state_dict', fp16) or a .safetensors of the
        same keys, `module.` prefix allowed. `tokenizer_dir`: OpenAI CLIP's vocab.json + merges.txt (or
        tokenizer.json). `config`: CLIPConfig entries to override what is inferred, e.g.
        {"vision_config": {"num_attention_heads": 16}}. Weights load in fp32; choose the dtype with .to()."""
        from transformers import CLIPConfig, CLIPModel

        tokenizer = clip_tokenizer(tokenizer_dir)
        beside = os.path.join(os.path.dirname(checkpoint_path), OPEN_CLIP_CONFIG)
        if os.path.isfile(beside):
            config = {**open_clip_overrides(read_json(beside)), **(config or {})}
        state = {k.removeprefix("module."): v for k, v in read_checkpoint(checkpoint_path).items()}
        lacking = [k for k in SHAPE_KEYS if k not in state]
        if lacking:
            found = ", ".join(list(state)[:4]) or "nothing"
            raise not_hps(checkpoint_path, f"it lacks {', '.join(lacking)}; its keys start {found}")
        clip_config = CLIPConfig(**infer_config(state, tokenizer, config, checkpoint_path))
        if len(tokenizer) > clip_config.text_config.vocab_size:
            raise ModelLoadError(f"tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but {checkpoint_path} "
                                 f"embeds {clip_config.text_config.vocab_size}; pass OpenAI CLIP's BPE files")

        # strict: every weight of the checkpoint used, every weight of the model given
        weights, unknown = to_transformers(state)
        del state  # the fp16 copy: 2 GB for ViT-H
        with torch.device("meta"):
            expected = set(CLIPModel(clip_config).state_dict())
        missing, unknown = sorted(expected - set(weights)), unknown + sorted(set(weights) - expected)
        if missing or unknown:
            raise not_hps(checkpoint_path, f"missing {', '.join(missing[:5]) or 'none'}; "
                                           f"unexpected {', '.join(unknown[:5]) or 'none'}")
        model = CLIPModel.from_pretrained(None, config=clip_config, state_dict=weights, dtype=torch.float32)
        size = clip_config.vision_config.image_size
        return cls(model.eval(), tokenizer, size, None, OPENAI_MEAN, OPENAI_STD)

    @staticmethod
    @functools.lru_cache(maxsize=50_000)   # trainers score the same prompts at every step: clean each once
    def clean(prompt: str) -> str:
        """What open_clip's tokenizer does before BPE and transformers' does not: ftfy's fixes (curly quotes made
        straight, mojibake repaired, full-width letters narrowed) and HTML entities un-escaped twice ("&amp;amp;"
        is "&")."""
        import ftfy

        return html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        return super().text_embeds([self.clean(p) for p in prompts])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(letterbox(images.float(), self.size), (self.size, self.size), self.mean, self.std)
        image = features(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)))
        return F.normalize(image.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str,
                references: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.cosine(images, prompts)
