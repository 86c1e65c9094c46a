"""Tiny random weights of every reward family's real architecture, written in each family's official file layout,
for the reward tests and benchmarks/reward_speed.py.

`save_<family>(folder, ...)` writes into `folder` (created if needed) and returns `(path, support)`, what
`load_reward(family, path, support)` takes; `FAMILY_BUILDERS` maps the FAMILIES names to them. The defaults are
the sizes the tests run at; the size arguments make bigger models for timing. Weights are the same on every call
(fixed seeds) and the caller's global random state is left untouched."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import string

import torch
from safetensors.torch import save_file

from r0_core.loading import TINY_CLIP_DIR


@contextlib.contextmanager
def seeded(seed: int):
    """transformers initialises modules from torch's global generator: seed it without disturbing the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def heads(width: int) -> int:
    return max(width // 64, 2)  # 64-wide heads as in the real models, at least two so attention is multi-head


def _folder(folder) -> pathlib.Path:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def copy_clip_tokenizer(folder) -> str:
    """The tiny world's CLIP BPE tokenizer (100 tokens; bos 0, eos and pad 1)."""
    folder = _folder(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TINY_CLIP_DIR, name), folder / name)
    return str(folder)


# ---- CLIP folders: ClipScore, PickScore, the aesthetic head's CLIP ----

def clip_config(width: int = 32, layers: int = 2, image: int = 32, patch: int = 8, dim: int = 24,
                hidden_act: str = "quick_gelu", **extra):
    """A small CLIPConfig for the tiny tokenizer's 100 tokens and 16 positions (OpenAI's quick GELU unless told);
    `extra` goes to CLIPConfig (e.g. logit_scale_init_value)."""
    from transformers import CLIPConfig

    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                 num_attention_heads=heads(width), hidden_act=hidden_act)
    return CLIPConfig(text_config=dict(tower, vocab_size=100, max_position_embeddings=16, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1),
                      vision_config=dict(tower, image_size=image, patch_size=patch), projection_dim=dim, **extra)


def save_clip(folder, width: int = 32, layers: int = 2, image: int = 32, patch: int = 8, dim: int = 24):
    """A random CLIPModel as a transformers folder: config.json, model.safetensors, OpenAI's preprocessor settings
    (shortest side to `image`, centre crop) and the tokenizer files."""
    from transformers import CLIPImageProcessor, CLIPModel

    folder = _folder(folder)
    with seeded(0):
        CLIPModel(clip_config(width, layers, image, patch, dim)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}
                       ).save_pretrained(folder)
    copy_clip_tokenizer(folder)
    return str(folder), None


def save_pickscore(folder, width: int = 32, layers: int = 2, image: int = 32, patch: int = 8, dim: int = 24):
    """PickScore_v1 as early uploads ship it: `model/` with config.json + model.safetensors only (no processor or
    tokenizer files; exact GELU, logit scale 100), and the CLIP tokenizer aside in `tokenizer/`."""
    from transformers import CLIPModel

    folder = _folder(folder)
    with seeded(0):
        config = clip_config(width, layers, image, patch, dim, hidden_act="gelu", logit_scale_init_value=4.6052)
        CLIPModel(config).save_pretrained(folder / "model")
    return str(folder / "model"), copy_clip_tokenizer(folder / "tokenizer")


# ---- HPS v2: an open_clip checkpoint + a CLIP BPE tokenizer folder ----

HPS_TOKENS = ["<|startoftext|>", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase),
              "<|endoftext|>"]  # a character-level BPE vocabulary whose eos is the highest id, as in OpenAI's


def open_clip_state(width: int = 128, text_width: int = 128, layers: int = 2, context: int = 16, patch: int = 8,
                    image: int = 32, dim: int = 24, vocab: int = len(HPS_TOKENS)) -> dict[str, torch.Tensor]:
    """Random weights under open_clip's key names, fp16 like the official HPS_v2*_compressed.pt."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    one = lambda n: 1 + r(n)  # noqa: E731
    sd = {"visual.class_embedding": r(width), "visual.positional_embedding": r((image // patch) ** 2 + 1, width),
          "visual.conv1.weight": r(width, 3, patch, patch), "visual.proj": r(width, dim),
          "visual.ln_pre.weight": one(width), "visual.ln_pre.bias": r(width),
          "visual.ln_post.weight": one(width), "visual.ln_post.bias": r(width),
          "token_embedding.weight": r(vocab, text_width), "positional_embedding": r(context, text_width),
          "ln_final.weight": one(text_width), "ln_final.bias": r(text_width), "text_projection": r(text_width, dim),
          "logit_scale": torch.tensor(4.6052)}
    for prefix, w in (("visual.transformer.resblocks.", width), ("transformer.resblocks.", text_width)):
        for i in range(layers):
            p = f"{prefix}{i}."
            sd.update({p + "ln_1.weight": one(w), p + "ln_1.bias": r(w), p + "ln_2.weight": one(w),
                       p + "ln_2.bias": r(w), p + "attn.in_proj_weight": r(3 * w, w), p + "attn.in_proj_bias": r(3 * w),
                       p + "attn.out_proj.weight": r(w, w), p + "attn.out_proj.bias": r(w),
                       p + "mlp.c_fc.weight": r(4 * w, w), p + "mlp.c_fc.bias": r(4 * w),
                       p + "mlp.c_proj.weight": r(w, 4 * w), p + "mlp.c_proj.bias": r(w)})
    return {k: v.half() for k, v in sd.items()}


def save_hps(folder, width: int = 128, layers: int = 2, context: int = 16, image: int = 32, patch: int = 8,
             dim: int = 24):
    """HPS_v2.1_compressed.pt (fp16 open_clip state dict under 'state_dict'), the same weights as
    HPS_v2.1_compressed.safetensors with DataParallel's `module.` prefix, and `tokenizer/` (vocab.json +
    merges.txt), with open_clip_config.json beside them: both towers are `width` wide with 64-wide heads (at least
    two), a width no released open_clip model has, so the config is what tells HPSv2 the head counts."""
    folder = _folder(folder)
    sd = open_clip_state(width, width, layers, context, patch, image, dim)
    heads = max(width // 64, 1)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "vision_cfg": {"width": width, "head_width": width // heads}, "text_cfg": {"width": width, "heads": heads}}}))
    torch.save({"state_dict": sd}, folder / "HPS_v2.1_compressed.pt")
    save_file({"module." + k: v for k, v in sd.items()}, folder / "HPS_v2.1_compressed.safetensors")
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(HPS_TOKENS)}))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    return str(folder / "HPS_v2.1_compressed.pt"), str(folder / "tokenizer")


# ---- ImageReward: ImageReward.pt (flat BLIP keys) + med_config.json + vocab.txt ----

IMAGE_REWARD_WORDS = ("a an the of on in with and red green blue yellow black white small big circle square "
                      "triangle cat dog house tree sky photo painting above below left right ##s ##ing").split()
BERT_SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0, 3, 4 as bert-base-uncased's


def blip_vit_state(generator, width: int = 128, layers: int = 2, patch: int = 8, image: int = 32):
    """Random timm-style BLIP ViT weights (ImageReward's `blip.visual_encoder.*` names, unprefixed)."""
    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    vit = {"cls_token": rand(1, 1, width), "pos_embed": rand(1, (image // patch) ** 2 + 1, width),
           "patch_embed.proj.weight": rand(width, 3, patch, patch), "patch_embed.proj.bias": rand(width),
           "norm.weight": 1 + rand(width), "norm.bias": rand(width)}
    for i in range(layers):
        for name, (out, inp) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                                 "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width)}.items():
            vit[f"blocks.{i}.{name}.weight"], vit[f"blocks.{i}.{name}.bias"] = rand(out, inp), rand(out)
        for norm in ("norm1", "norm2"):
            vit[f"blocks.{i}.{norm}.weight"], vit[f"blocks.{i}.{norm}.bias"] = 1 + rand(width), rand(width)
    return vit


def save_image_reward(folder, width: int = 128, layers: int = 2, patch: int = 8, image: int = 32,
                      text_width: int = 32):
    """ImageReward.pt as the official file: a flat state dict of the BLIP ViT (`width` wide, heads of 64 as BLIP's
    ViT-L/16), the BLIP text encoder with cross-attention (`text_width` wide), the 5-layer MLP and the unused keys
    the official file also has; med_config.json (its stale encoder_width included) and a BERT vocab.txt."""
    from transformers import BlipTextConfig, BlipTextModel

    folder = _folder(folder)
    vocab = BERT_SPECIALS + IMAGE_REWARD_WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab))
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": text_width,
           "intermediate_size": 2 * text_width, "num_hidden_layers": 2, "num_attention_heads": 2,
           "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
           "vocab_size": len(vocab) + 2,  # BLIP's tokenizer adds [DEC] and [ENC]
           "pad_token_id": 0, "type_vocab_size": 2, "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "add_cross_attention": True,
           "encoder_width": 768,  # stale, as in the official file: the ViT width from the checkpoint wins
           "vision_num_attention_heads": heads(width)}  # a width BLIP does not build: its heads are given
    (folder / "med_config.json").write_text(json.dumps(med))

    generator = torch.Generator().manual_seed(0)
    with seeded(0):
        text_config = BlipTextConfig(**{k: med[k] for k in ("hidden_act", "hidden_size", "intermediate_size",
                                                            "num_hidden_layers", "num_attention_heads", "vocab_size",
                                                            "max_position_embeddings", "layer_norm_eps")},
                                     encoder_hidden_size=width, initializer_range=0.2, is_decoder=True,
                                     bos_token_id=None, eos_token_id=None, sep_token_id=None)
        text = BlipTextModel(text_config, add_pooling_layer=False)
    vit = blip_vit_state(generator, width, layers, patch, image)
    sizes = (text_width, 24, 16, 8, 4, 1)
    mlp = {}
    for (i, layer) in enumerate((0, 2, 4, 6, 7)):
        mlp[f"mlp.layers.{layer}.weight"] = torch.randn(sizes[i + 1], sizes[i], generator=generator) / sizes[i] ** .5
        mlp[f"mlp.layers.{layer}.bias"] = torch.randn(sizes[i + 1], generator=generator)
    state = {**{f"blip.visual_encoder.{k}": v for k, v in vit.items()},
             **{f"blip.text_encoder.{k}": v.clone() for k, v in text.state_dict().items()}, **mlp,
             # unused by the score, present in the official file: ignored
             "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
             "blip.vision_proj.weight": torch.zeros(256, width), "blip.text_proj.weight": torch.zeros(256, text_width)}
    torch.save(state, folder / "ImageReward.pt")
    return str(folder / "ImageReward.pt"), str(folder)


# ---- LAION aesthetic predictor: a head .pth + a CLIP folder ----

def save_aesthetic(folder, clip_folder=None, **clip_sizes):
    """sac+logos+ava1-l14-linearMSE.pth: the 5-layer linear head (keys layers.{0,2,4,6,7}) on the CLIP image
    embedding, scaled down from 768-1024-128-64-16-1; and its CLIP folder, `clip/` written by save_clip(**clip_sizes)
    unless `clip_folder` is given."""
    folder = _folder(folder)
    if clip_folder is None:
        clip_folder, _ = save_clip(folder / "clip", **clip_sizes)
    dim = json.loads((pathlib.Path(clip_folder) / "config.json").read_text())["projection_dim"]
    dims = [dim, 16, 8, 8, 4, 1]
    state = {}
    with seeded(1):
        for (i, n_in), n_out in zip(zip((0, 2, 4, 6, 7), dims), dims[1:]):
            state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = torch.randn(n_out, n_in), torch.randn(n_out)
    torch.save(state, folder / "sac+logos+ava1-l14-linearMSE.pth")
    return str(folder / "sac+logos+ava1-l14-linearMSE.pth"), str(clip_folder)


# ---- ALIGN: a transformers AlignModel folder ----

# kakaobrain/align-base's preprocessor_config.json, verbatim (huggingface.co/kakaobrain/align-base, commit 44040ee)
ALIGN_BASE_PREPROCESSOR = {
    "crop_size": {"height": 289, "width": 289}, "do_center_crop": True, "do_normalize": False, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "EfficientNetImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "include_top": False, "processor_class": "AlignProcessor", "resample": 2,
    "rescale_factor": 0.00784313725490196, "rescale_offset": True, "size": {"height": 346, "width": 346}}

ALIGN_WORDS = ("a an the photo of dog cat red blue green circle square triangle on in left right above below moon "
               "wooden roof great wall subway platform painting van gogh style swimming pool statue liberty volcano "
               "background outfit picture small big").split()


def save_align(folder, width: int = 32, image: int = 32):
    """A random AlignModel folder as kakaobrain/align-base ships it: a tiny EfficientNet (stage widths scaled by
    `width` / 128) + a tiny BERT (`width` wide), align-base's image processor scaled down (346/289 -> 38/32 for
    `image` 32) and a BERT WordPiece vocab.txt of a few dozen words."""
    from transformers import AlignConfig, AlignModel, EfficientNetImageProcessor

    folder = _folder(folder)
    with seeded(0):
        config = AlignConfig(
            text_config=dict(vocab_size=64, hidden_size=width, num_hidden_layers=2, num_attention_heads=heads(width),
                             intermediate_size=2 * width, max_position_embeddings=64),
            vision_config=dict(image_size=image, width_coefficient=width / 128, depth_coefficient=0.5,
                               in_channels=[32, 16, 24], out_channels=[16, 24, 96], kernel_sizes=[3, 3, 5],
                               strides=[1, 2, 2], num_block_repeats=[1, 1, 1], expand_ratios=[1, 2, 2],
                               hidden_dim=96),
            projection_dim=96 * width // 128)  # = the last stage's width, the pooled image embedding
        model = AlignModel(config)
        with torch.no_grad():
            for module in model.modules():
                # the default 0.02-std init leaves the pooled image features ~1e-14 (pure noise after L2 norm): He
                # init makes the image embedding depend on the image
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight)
                # non-trivial BatchNorm statistics, so eval-mode normalisation is exercised
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    settings = {k: v for k, v in ALIGN_BASE_PREPROCESSOR.items()
                if k not in ("image_processor_type", "processor_class")}
    resize = round(image * 346 / 289)
    settings.update(size={"height": resize, "width": resize}, crop_size={"height": image, "width": image})
    EfficientNetImageProcessor(**settings).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ALIGN_WORDS]
    assert len(vocab) <= config.text_config.vocab_size
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 64, '
                                                  '"tokenizer_class": "BertTokenizer"}')
    return str(folder), None


# ---- DINO / DINOv2: a transformers ViTModel or Dinov2Model folder ----

def save_dino(folder, kind: str = "vit", width: int = 32, layers: int = 2, image: int = 32, patch: int = 8):
    """facebook/dino-vit* (ViTModel without pooler, ViTImageProcessor: exact resize to `image`) or
    facebook/dinov2-* (Dinov2Model, BitImageProcessor: shortest side, centre crop, ImageNet mean/std)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

    folder = _folder(folder)
    small = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads(width),
                 intermediate_size=2 * width, image_size=image, patch_size=patch)
    with seeded(0):
        if kind == "vit":
            model = ViTModel(ViTConfig(**small), add_pooling_layer=False)
            processor = ViTImageProcessor(size={"height": image, "width": image})
        elif kind == "dinov2":
            model = Dinov2Model(Dinov2Config(**small))
            processor = BitImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image},
                                          do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225])
        else:
            raise ValueError(f"kind={kind!r}; expected 'vit' or 'dinov2'")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), None


FAMILY_BUILDERS = {"clip": save_clip, "hpsv2": save_hps, "pickscore": save_pickscore,
                   "image_reward": save_image_reward, "aesthetic": save_aesthetic, "align": save_align,
                   "dino": save_dino}
