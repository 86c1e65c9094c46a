"""The tiny world's reward stack, learned from the oracle as HPS v2 and ImageReward were learned from people's
preferences: `python -m r0_core.tiny.reward_stack --out DIR`.

Stages, each resumable from what it left under `work` (rerun the same call after a stop):
  1. samples      the base pipeline's own samples of training captions (never held-out ones) with the R0
                  sampler at several step counts, with and without CFG, several noise seeds per caption, each
                  judged by the oracle; cached in chunks. About 0.16 s of one CPU thread per image, sampling and
                  judging: the default 682 captions x 4 images take about 7 minutes
  2. pairs        preferences between images of the same caption: correct over incorrect, valid over invalid at
                  equal correctness, and near misses (an image right for a caption one edit away but wrong for
                  this one under a right one); a share of the captions is kept out to measure pair accuracy
  3. hps          a copy of the given CLIP, its patch embedding rebased onto OpenAI's pixel normalisation (what
                  the HPS loader applies), fine-tuned on the pairs with HPS v2's loss (a softmax over the pair's
                  logit_scale * cos, the preferred image the target) with its lower layers locked, as HPS v2
                  did; saved as an open_clip checkpoint with open_clip's own model config
  4. itm          a tiny BLIP pretrained on ground-truth images by image-text matching against near-miss
                  captions (BLIP's own pretraining task), a linear ITM head on the [CLS] state in the MLP's place
  5. image_reward that BLIP with a fresh ImageReward MLP, fine-tuned on the pairs with ImageReward's loss,
                  -log sigmoid(r_preferred - r_other), and standardised on the training images as ImageReward is
  6. aesthetic    the LAION aesthetic head on the tiny reward CLIP's image embeddings, trained (MSE) to predict
                  the oracle's validity of the samples
Outputs, each folder written whole or not at all, with a build_info.json: `out/tiny-hps/` (HPS_tiny.safetensors,
open_clip_config.json, tokenizer), `out/tiny-image-reward/` (ImageReward.safetensors, med_config.json,
vocab.txt), `out/tiny-aesthetic/aesthetic.safetensors`. `load_reward(family, "tiny")` reads them from
r0_core/tiny/weights; `load_reward(family, path)` reads them anywhere.

Called by the world's build once tiny-sd and tiny-clip are saved:

    pipe = load_pipeline(os.path.join(out, "tiny-sd"), device="cpu", dtype=torch.float32)
    build_reward_stack(RewardStackConfig(seed=cfg.seed), os.path.join(work, "reward_stack"), pipe, clip,
                       tokenizer, images, captions, out, clip_dir=os.path.join(out, "tiny-clip"))

with `clip` the stage-3 contrastive CLIP (HPS starts from it, as HPS v2 starts from open_clip's CLIP), `images,
captions` the ground-truth data of stage 1 and `clip_dir` the reward CLIP folder the aesthetic head reads.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .. import cli
from ..generate import generate
from ..loading import TINY_AESTHETIC, TINY_HPS, TINY_IMAGE_REWARD
from ..rewards.aesthetic import HEAD_LAYERS, AestheticScore
from ..rewards.base import OPENAI_MEAN, OPENAI_STD, score_in_batches
from ..rewards.clip_score import ClipScore
from ..rewards.hps import OPEN_CLIP_CONFIG, HPSv2, to_open_clip
from ..rewards.image_reward import MLP_LAYERS, REWARD_MEAN, REWARD_STD, TEXT, VIT, ImageReward, vit_key
from . import oracle, world
from .build import caption_rng, cosine_lr, train_loop

CLIP_MEAN = CLIP_STD = (0.5, 0.5, 0.5)  # the world's CLIPs read pixels in [-1, 1] (build.to_model_range)
HPS_FILE, IMAGE_REWARD_FILE, AESTHETIC_FILE = (os.path.basename(p) for p in (TINY_HPS, TINY_IMAGE_REWARD,
                                                                              TINY_AESTHETIC))
FOLDERS = {"hpsv2": os.path.basename(os.path.dirname(TINY_HPS)),
           "image_reward": os.path.basename(os.path.dirname(TINY_IMAGE_REWARD)),
           "aesthetic": os.path.basename(os.path.dirname(TINY_AESTHETIC))}
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IR_HIDDEN = (128, 32, 16, 8)         # ImageReward's MLP is 768-1024-128-64-16-1; scaled down
AESTHETIC_HIDDEN = (256, 32, 16, 8)  # the LAION head is 768-1024-128-64-16-1

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardStackConfig:
    seed: int = 0                     # of every draw: captions, noise, pairs' split, initial weights, batches
    # preference data
    captions: int = 0                 # training captions sampled (0: all); otherwise a seeded subset
    images_per_caption: int = 4       # noise seeds per caption, each at the next (steps, guidance) setting
    steps: tuple = (1, 2, 4, 8, 16)   # R0 sampler step counts the settings cycle through
    guidances: tuple = (1.0, 2.0)     # CFG scales the settings cycle through (1: no CFG)
    sample_batch: int = 64            # images per sampling call
    near_miss_pairs: int = 2          # per caption: images right for a near-miss caption, wrong for this one
    validation_share: float = 0.1     # captions whose pairs are kept out of training to measure pair accuracy
    # tiny HPS
    hps_steps: int = 300              # optimiser steps
    hps_batch: int = 32               # pairs per step
    hps_lr: float = 2e-5              # peak learning rate (cosine schedule, 10% warmup, as every stage here)
    hps_train_layers: int = 1         # top transformer layers trained in each tower; those below stay locked
    # tiny ImageReward: the BLIP towers, their matching pretraining and the preference fine-tuning
    blip_vision_width: int = 128      # a multiple of 64: BLIP's ViT has 64-wide heads
    blip_vision_layers: int = 4       # ViT blocks
    blip_patch: int = 8               # 16 image tokens: cross-attention over 64 (4-pixel patches) did not start
                                      # learning within 400 matching steps, over 16 it does after ~200
    blip_text_width: int = 64         # BERT width (med_config.json hidden_size)
    blip_text_layers: int = 4         # BERT layers, each with cross-attention to the image tokens
    blip_text_heads: int = 2          # BERT attention heads
    itm_steps: int = 1500             # image-text matching steps on ground truth
    itm_batch: int = 32               # images per step, each with its caption, a near miss and another's caption
    itm_lr: float = 3e-4              # peak learning rate; 5e-4 already diverged in trials
    ir_steps: int = 300               # preference steps
    ir_batch: int = 32                # pairs per step
    ir_lr: float = 1e-4               # peak learning rate
    # tiny aesthetic
    aesthetic_steps: int = 1000       # optimiser steps (on cached CLIP embeddings: seconds)
    aesthetic_batch: int = 128        # images per step
    aesthetic_lr: float = 1e-3        # peak learning rate
    # files and runs
    half: bool = True                 # store HPS and ImageReward towers in fp16 (the loaders give fp32 scorers)
    checkpoint_every: int = 100       # steps between resumable checkpoints
    threads: int = 1                  # torch threads of the command-line build


@dataclasses.dataclass
class Samples:
    """The base model's judged samples: image i shows prompts[i] drawn at (steps[i], guidance[i])."""
    images: np.ndarray   # uint8 [N, H, W, 3]
    prompts: list[str]
    steps: np.ndarray
    guidance: np.ndarray
    correct: np.ndarray  # bool, the oracle's verdicts
    valid: np.ndarray
    cpu_seconds: float   # sampling and judging, summed over the chunks (also those of earlier runs)


@dataclasses.dataclass
class Pairs:
    """Preferences: for prompts[k], image preferred[k] over image rejected[k] (indices into Samples)."""
    prompts: list[str]
    preferred: torch.Tensor
    rejected: torch.Tensor
    kinds: list[str]     # "correct", "valid" or "near_miss"

    def subset(self, keep) -> "Pairs":
        idx = [k for k, p in enumerate(self.prompts) if keep(p)]
        return Pairs([self.prompts[k] for k in idx], self.preferred[idx], self.rejected[idx],
                     [self.kinds[k] for k in idx])

    def counts(self) -> dict[str, int]:
        return {kind: self.kinds.count(kind) for kind in ("correct", "valid", "near_miss")}


# ----------------------------------------------------------------------------------------------- helpers

def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in 0..1, what scorers read."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def fingerprint(*modules) -> str:
    """A short hash of modules' weights: cached samples belong to one base model."""
    h = hashlib.sha256()
    for module in modules:
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def warmup(steps: int) -> int:
    return max(steps // 10, 1)


def write_folder(out: str, name: str, write) -> str:
    """write(tmp) fills a temporary folder that then replaces out/name in one rename."""
    final, tmp = os.path.join(out, name), os.path.join(out, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    for name in os.listdir(tmp):  # safetensors writes owner-only files; shipped weights are read by everyone
        os.chmod(os.path.join(tmp, name), 0o644)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_info(folder: str, cfg: RewardStackConfig, **info) -> None:
    with open(os.path.join(folder, "build_info.json"), "w") as f:
        json.dump({"reward_stack_config": dataclasses.asdict(cfg), **info}, f, indent=1)


def pair_accuracy(scorer, pixels: torch.Tensor, pairs: Pairs) -> Optional[dict]:
    """How often the scorer ranks the preferred image first, overall and per kind of pair (None without pairs)."""
    if not pairs.prompts:
        return None
    was_training = scorer.training
    scorer.eval()
    with torch.no_grad():
        good = score_in_batches(scorer, pixels[pairs.preferred], pairs.prompts, batch_size=128)
        bad = score_in_batches(scorer, pixels[pairs.rejected], pairs.prompts, batch_size=128)
    scorer.train(was_training)
    wins = (good > bad).float().numpy()
    kinds = np.array(pairs.kinds)
    return {"all": float(wins.mean()), "pairs": len(wins),
            **{k: float(wins[kinds == k].mean()) for k in sorted(set(pairs.kinds))}}


# ----------------------------------------------------------------------------------------------- 1. samples

def sample_plan(cfg: RewardStackConfig) -> list[tuple[str, int, int, float]]:
    """(caption, noise seed, steps, guidance) of every image. Training captions only; the (steps, guidance)
    settings cycle over the images, so each caption sees several and every setting is drawn equally often."""
    captions = world.training_captions()
    if cfg.captions:
        if cfg.captions > len(captions):
            raise ValueError(f"captions={cfg.captions} but the world has {len(captions)} training captions; "
                             f"pass at most that, or 0 for all")
        captions = random.Random(f"{cfg.seed}-reward-captions").sample(captions, cfg.captions)
    settings = [(s, float(g)) for g in cfg.guidances for s in cfg.steps]
    plan = []
    for c in captions:
        for _ in range(cfg.images_per_caption):
            steps, guidance = settings[len(plan) % len(settings)]
            plan.append((c, 1_000_000 * (cfg.seed + 1) + len(plan), steps, guidance))
    return plan


def draw_samples(cfg: RewardStackConfig, work: str, pipe) -> Samples:
    """Sample and judge the plan, `sample_batch` images of one setting at a time, each chunk cached under a
    folder named by the plan and the base model, so a rerun resumes and a changed model starts afresh."""
    plan = sample_plan(cfg)
    key = hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:8]
    folder = os.path.join(work, f"samples-{key}-{fingerprint(pipe.unet, pipe.vae, pipe.text_encoder)}")
    os.makedirs(folder, exist_ok=True)
    by_setting: dict[tuple, list[int]] = {}
    for i, (_, _, steps, guidance) in enumerate(plan):
        by_setting.setdefault((steps, guidance), []).append(i)
    chunks = [(setting, idx[k:k + cfg.sample_batch]) for setting, idx in sorted(by_setting.items())
              for k in range(0, len(idx), cfg.sample_batch)]
    images = np.zeros((len(plan), world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    correct, valid = np.zeros(len(plan), bool), np.zeros(len(plan), bool)
    cpu = 0.0
    for (steps, guidance), idx in tqdm(chunks, desc="preference samples"):
        path = os.path.join(folder, f"{steps}-{guidance:g}-{idx[0]}.npz")
        if not os.path.exists(path):
            np.savez(path + ".tmp.npz", **sample_chunk(pipe, [plan[i] for i in idx]))
            os.replace(path + ".tmp.npz", path)
        chunk = np.load(path)
        images[idx], correct[idx], valid[idx] = chunk["images"], chunk["correct"], chunk["valid"]
        cpu += float(chunk["cpu_seconds"])
    return Samples(images, [p[0] for p in plan], np.array([p[2] for p in plan]), np.array([p[3] for p in plan]),
                   correct, valid, cpu)


def sample_chunk(pipe, rows: list[tuple[str, int, int, float]]) -> dict:
    """Images of rows that share one setting, stored as uint8 and judged as stored."""
    started = time.process_time()
    prompts, seeds = [r[0] for r in rows], [r[1] for r in rows]
    with torch.no_grad():
        images, _ = generate(pipe, prompts, steps=rows[0][2], guidance=rows[0][3], seeds=seeds)
    images = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    verdicts = [oracle.judge(im.astype(np.float32) / 255, p) for im, p in zip(images, prompts)]
    return {"images": images, "correct": np.array([v.correct for v in verdicts]),
            "valid": np.array([v.valid for v in verdicts]), "cpu_seconds": time.process_time() - started}


# ----------------------------------------------------------------------------------------------- 2. pairs

def near_miss_rejects(cfg: RewardStackConfig, work: str, samples: Samples) -> dict[str, list[int]]:
    """For each caption with a correct image, up to `near_miss_pairs` images that are correct for one of its near
    misses and, by the oracle, wrong for it (cached: each costs an oracle call)."""
    key = hashlib.sha256(json.dumps([samples.prompts, samples.correct.tolist()]).encode()).hexdigest()[:8]
    path = os.path.join(work, f"near_misses-{key}-{cfg.near_miss_pairs}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    by_caption: dict[str, list[int]] = {}
    for i, p in enumerate(samples.prompts):
        by_caption.setdefault(p, []).append(i)
    rng = random.Random(f"{cfg.seed}-near-misses")
    out = {}
    for c, idx in tqdm(by_caption.items(), desc="near misses"):
        if not samples.correct[idx].any():
            continue
        misses = [world.caption(m) for m in world.near_misses(world.parse_caption(c))]
        candidates = [i for m in misses for i in by_caption.get(m, []) if samples.correct[i]]
        rng.shuffle(candidates)
        found = []
        for i in candidates:
            if len(found) == cfg.near_miss_pairs:
                break
            # one edit away need not be wrong: an object on the left may also be at the top
            if not oracle.judge(samples.images[i].astype(np.float32) / 255, c).correct:
                found.append(i)
        out[c] = found
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def preference_pairs(samples: Samples, near: dict[str, list[int]]) -> Pairs:
    """Every two images of a caption whose oracle tier (2 x correct + valid) differs, the higher one preferred;
    and each near-miss reject under a correct image of the caption (the valid ones first)."""
    tier = 2 * samples.correct.astype(int) + samples.valid.astype(int)
    by_caption: dict[str, list[int]] = {}
    for i, p in enumerate(samples.prompts):
        by_caption.setdefault(p, []).append(i)
    rows = []
    for c, idx in by_caption.items():
        for a, b in itertools.combinations(idx, 2):
            if tier[a] != tier[b]:
                good, bad = (a, b) if tier[a] > tier[b] else (b, a)
                rows.append((c, good, bad, "correct" if samples.correct[good] != samples.correct[bad] else "valid"))
        best = sorted((i for i in idx if samples.correct[i]), key=lambda i: -tier[i])
        rows += [(c, best[k % len(best)], bad, "near_miss") for k, bad in enumerate(near.get(c, []))]
    if not rows:
        raise ValueError(f"the {len(samples.prompts)} samples gave no preference pairs (every image of a caption "
                         f"judged alike); raise captions or images_per_caption")
    return Pairs([r[0] for r in rows], torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]),
                 [r[3] for r in rows])


def split_pairs(cfg: RewardStackConfig, pairs: Pairs) -> tuple[Pairs, Pairs]:
    """(training, validation) pairs, split by caption."""
    captions = sorted(set(pairs.prompts))
    held = set(random.Random(f"{cfg.seed}-reward-validation").sample(
        captions, round(cfg.validation_share * len(captions))))
    return pairs.subset(lambda p: p not in held), pairs.subset(lambda p: p in held)


# ----------------------------------------------------------------------------------------------- 3. HPS

def rebase_normalisation(clip, mean, std, to_mean, to_std) -> None:
    """Change, in place, the pixel normalisation a CLIPModel reads from (mean, std) to (to_mean, to_std) without
    changing its features: the patch embedding is rescaled per channel and the constant shift goes into the
    patches' position embeddings (the class token sees no pixels). HPS's loader normalises as OpenAI CLIP."""
    emb = clip.vision_model.embeddings
    weight = emb.patch_embedding.weight  # [D, 3, P, P], no bias
    scale = torch.tensor(to_std) / torch.tensor(std)
    shift = (torch.tensor(to_mean) - torch.tensor(mean)) / torch.tensor(std)
    with torch.no_grad():
        emb.position_embedding.weight[1:] += (weight * shift.view(1, 3, 1, 1)).sum((1, 2, 3))
        weight.mul_(scale.view(1, 3, 1, 1))


def open_clip_config(clip) -> dict:
    """open_clip's own description of the CLIPModel's architecture (open_clip_config.json)."""
    v, t = clip.config.vision_config, clip.config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"open_clip needs one activation for both towers, gelu or quick_gelu; this CLIP has "
                         f"{v.hidden_act} (vision) and {t.hidden_act} (text)")
    return {"model_cfg": {
        "embed_dim": clip.config.projection_dim, "quick_gelu": v.hidden_act == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers, "width": v.hidden_size,
                       "head_width": v.hidden_size // v.num_attention_heads, "patch_size": v.patch_size,
                       "mlp_ratio": v.intermediate_size / v.hidden_size},
        "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                     "width": t.hidden_size, "heads": t.num_attention_heads, "layers": t.num_hidden_layers}},
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}


def hps_start(clip, tokenizer) -> HPSv2:
    """A copy of `clip` scored as HPS scores: OpenAI's normalisation, cos without the logit scale."""
    model = copy.deepcopy(clip).float()
    rebase_normalisation(model, CLIP_MEAN, CLIP_STD, OPENAI_MEAN, OPENAI_STD)
    return HPSv2(model, tokenizer, model.config.vision_config.image_size, None, OPENAI_MEAN, OPENAI_STD)


def train_hps(cfg, work, hps: HPSv2, pixels, train: Pairs) -> HPSv2:
    """HPS fine-tuned on the pairs: cross-entropy over the pair's logit_scale * cos, the preferred image the
    target (HPS v2's loss for a pair of images)."""
    model = hps.model.train().requires_grad_(False)
    # HPS v2 locks the lower layers of both towers (a few thousand pairs would otherwise undo what the CLIP
    # knows); the top layers, final norms and projections learn. The temperature stays the CLIP's: with two
    # images per softmax a learnt one only grows.
    for tower in (model.vision_model, model.text_model):
        layers = tower.encoder.layers
        layers[len(layers) - min(cfg.hps_train_layers, len(layers)):].requires_grad_(True)
    for module in (model.vision_model.post_layernorm, model.text_model.final_layer_norm, model.visual_projection,
                   model.text_projection):
        module.requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.seed + 31)

    def step_fn(step):
        k = torch.randint(0, len(train.prompts), (cfg.hps_batch,), generator=gen)
        prompts = [train.prompts[i] for i in k]
        cos = hps(pixels[torch.cat([train.preferred[k], train.rejected[k]])], prompts * 2).view(2, -1).T
        return F.cross_entropy(model.logit_scale.exp() * cos, torch.zeros(len(k), dtype=torch.long))

    train_loop("hps", [p for p in model.parameters() if p.requires_grad], step_fn, cfg.hps_steps,
               lambda s: cosine_lr(s, cfg.hps_steps, warmup(cfg.hps_steps), cfg.hps_lr),
               os.path.join(work, "hps.pt"), lambda c: model.load_state_dict(c["model"]),
               lambda: {"model": model.state_dict()}, cfg.checkpoint_every, gen)
    return hps.eval().requires_grad_(False)


def save_hps(folder: str, hps: HPSv2, half: bool) -> None:
    state, unknown = to_open_clip(hps.model.state_dict())
    if unknown:
        raise ValueError(f"CLIPModel weights without an open_clip name: {', '.join(unknown[:5])}")
    save_file({k: (v.half() if half else v).contiguous() for k, v in state.items()}, os.path.join(folder, HPS_FILE))
    with open(os.path.join(folder, OPEN_CLIP_CONFIG), "w") as f:
        json.dump(open_clip_config(hps.model), f, indent=1)
    hps.tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------- 4-5. ImageReward

def bert_vocab() -> list[str]:
    """A BERT vocab.txt for the world: its words whole, and letters as word-initial and ## pieces, so that every
    nonsense word (and any other lowercase word) is spelled from pieces, as BERT spells a rare token."""
    letters = sorted({ch for w in world.vocabulary() + list(world.nonsense_words()) for ch in w})
    return list(dict.fromkeys(BERT_SPECIALS + world.vocabulary() + letters + [f"##{ch}" for ch in letters]))


def med_config(cfg: RewardStackConfig, vocab_size: int) -> dict:
    """ImageReward's med_config.json (BLIP's BERT config), scaled down."""
    return {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": cfg.blip_text_width,
            "intermediate_size": 4 * cfg.blip_text_width, "num_hidden_layers": cfg.blip_text_layers,
            "num_attention_heads": cfg.blip_text_heads, "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
            "vocab_size": vocab_size, "pad_token_id": 0, "type_vocab_size": 2, "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "add_cross_attention": True,
            "encoder_width": cfg.blip_vision_width,
            # not in ImageReward's file: its ViT-L's 16 heads are known, this ViT's are not (64 wide, as ViT-L's)
            "vision_num_attention_heads": cfg.blip_vision_width // 64}


# BlipVisionModel names -> BLIP's timm-style ViT names: the inverse of image_reward.VIT_RENAMES
TIMM_RENAMES = ((r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
                (r"^embeddings\.patch_embedding\.", "patch_embed.proj."), (r"^post_layernorm\.", "norm."),
                (r"^encoder\.layers\.(\d+)\.", r"blocks.\1."), (r"\.layer_norm(\d)\.", r".norm\1."),
                (r"\.self_attn\.qkv\.", ".attn.qkv."), (r"\.self_attn\.projection\.", ".attn.proj."))


def timm_key(key: str) -> str:
    name = key
    for pattern, replacement in TIMM_RENAMES:
        name = re.sub(pattern, replacement, name)
    if vit_key(name) != key:
        raise ValueError(f"BLIP vision weight {key} has no timm name the ImageReward loader maps back")
    return name


def image_reward_state(vision, text, mlp) -> dict[str, torch.Tensor]:
    """ImageReward.pt's flat layout: blip.visual_encoder.* (timm names), blip.text_encoder.*, mlp.layers.*."""
    state = {VIT + timm_key(k): v for k, v in vision.state_dict().items()}
    state.update({TEXT + k: v for k, v in text.state_dict().items()})
    for layer, i in zip(mlp, MLP_LAYERS):
        state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"] = layer.weight, layer.bias
    return state


def init_image_reward(cfg: RewardStackConfig, folder: str) -> ImageReward:
    """A random tiny BLIP + MLP written in ImageReward's file layout and read back by its loader, so what is
    trained is exactly what the loader builds."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    path = os.path.join(folder, IMAGE_REWARD_FILE)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        vocab = bert_vocab()
        med = med_config(cfg, len(vocab) + 2)  # BLIP's tokenizer adds [DEC] and [ENC]
        with open(os.path.join(folder, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        with open(os.path.join(folder, "med_config.json"), "w") as f:
            json.dump(med, f, indent=1)
        torch.manual_seed(cfg.seed + 40)
        w = cfg.blip_vision_width
        vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=w, num_hidden_layers=cfg.blip_vision_layers, num_attention_heads=med["vision_num_attention_heads"],
            intermediate_size=4 * w, image_size=world.IMAGE_SIZE, patch_size=cfg.blip_patch,
            initializer_range=0.02))  # BLIP's default of 1e-10 is for loading weights, not training
        text = BlipTextModel(BlipTextConfig(
            **{k: med[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps")},
            encoder_hidden_size=w, is_decoder=True, bos_token_id=None, eos_token_id=None, sep_token_id=None),
            add_pooling_layer=False)
        # PyTorch's default initialisation: ImageReward's (std 1 / (fan_in + 1)) starts a stack of five linear
        # layers at outputs ~1e-6, which a few thousand pairs barely move
        sizes = (cfg.blip_text_width, *IR_HIDDEN, 1)
        mlp = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])
        save_file({k: v.contiguous() for k, v in image_reward_state(vision, text, mlp).items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return ImageReward.from_pretrained(path).train().requires_grad_(True)


def pretrain_itm(cfg, work, scorer: ImageReward, images: np.ndarray, captions: list[str]) -> float:
    """Image-text matching on ground truth: each image against its caption, a near miss of it and another
    image's caption, all varied as training captions are (world.augment_caption: colours left out, nonsense
    words), labelled by whether the caption is true of the image. Near misses use training captions only.
    BLIP's ITM head, one linear layer on the [CLS] state (one logit where BLIP has two), stands in the MLP's
    place meanwhile, so the scorer's own forward gives the matching logit; the fresh MLP goes back after.
    Returns near_miss_accuracy of the matching logit."""
    known = set(world.training_captions())
    unknown = sorted(set(captions) - known)
    if unknown:
        raise ValueError(f"ground-truth captions must be training captions; got {len(unknown)} others, e.g. "
                         f"{unknown[0]!r}: draw them with world.sample_batch(held_out=False)")
    scenes = {c: world.parse_caption(c) for c in set(captions)}
    misses = {c: [m for m in world.near_misses(s) if world.caption(m) in known] for c, s in scenes.items()}
    gen = torch.Generator().manual_seed(cfg.seed + 41)

    def step_fn(step):
        idx = torch.randint(0, len(images), (cfg.itm_batch,), generator=gen).numpy()
        rng = caption_rng(cfg, "itm", step)
        shown = [scenes[captions[i]] for i in idx]
        texts, labels = [], []
        for k, (i, scene) in enumerate(zip(idx, shown)):
            other = shown[(k + 1) % len(shown)]
            for source in (scene, rng.choice(misses[captions[i]] or [other]), other):
                text, asked = world.augment_caption(source, rng)
                texts.append(text)
                labels.append(float(world.describes(asked, scene)))
        logits = scorer(to_pixels(images[idx]).repeat_interleave(3, 0), texts)
        return F.binary_cross_entropy_with_logits(logits, torch.tensor(labels))

    mlp = scorer.mlp
    torch.manual_seed(cfg.seed + 43)
    scorer.mlp = torch.nn.Sequential(torch.nn.Linear(cfg.blip_text_width, 1))
    train_loop("itm", scorer.parameters(), step_fn, cfg.itm_steps,
               lambda s: cosine_lr(s, cfg.itm_steps, warmup(cfg.itm_steps), cfg.itm_lr),
               os.path.join(work, "itm.pt"), lambda c: scorer.load_state_dict(c["model"]),
               lambda: {"model": scorer.state_dict()}, cfg.checkpoint_every, gen)
    accuracy = near_miss_accuracy(scorer, cfg.seed, 256)
    scorer.mlp = mlp
    return accuracy


def near_miss_accuracy(scorer, seed: int, n: int) -> float:
    """How often fresh ground-truth images of training captions score their caption above a near miss of it."""
    images, captions = world.sample_batch(seed=seed * 1_000_003 + 99_991, n=n)
    known = set(world.training_captions())
    rng = random.Random(f"{seed}-near-miss-accuracy")
    misses = [rng.choice([world.caption(m) for m in world.near_misses(world.parse_caption(c))
                          if world.caption(m) in known]) for c in captions]
    was_training = scorer.training
    scorer.eval()
    with torch.no_grad():
        true = score_in_batches(scorer, to_pixels(images), captions, batch_size=128)
        wrong = score_in_batches(scorer, to_pixels(images), misses, batch_size=128)
    scorer.train(was_training)
    return float((true > wrong).float().mean())


def finetune_image_reward(cfg, work, scorer: ImageReward, pixels, train: Pairs) -> None:
    """ImageReward's preference loss, -log sigmoid(r_preferred - r_rejected), on the pairs."""
    gen = torch.Generator().manual_seed(cfg.seed + 42)

    def step_fn(step):
        k = torch.randint(0, len(train.prompts), (cfg.ir_batch,), generator=gen)
        prompts = [train.prompts[i] for i in k]
        r = scorer(pixels[torch.cat([train.preferred[k], train.rejected[k]])], prompts * 2).view(2, -1)
        return -F.logsigmoid(r[0] - r[1]).mean()

    train_loop("image_reward", scorer.parameters(), step_fn, cfg.ir_steps,
               lambda s: cosine_lr(s, cfg.ir_steps, warmup(cfg.ir_steps), cfg.ir_lr),
               os.path.join(work, "image_reward.pt"), lambda c: scorer.load_state_dict(c["model"]),
               lambda: {"model": scorer.state_dict()}, cfg.checkpoint_every, gen)


def standardise(scorer: ImageReward, pixels: torch.Tensor, prompts: list[str]) -> dict:
    """Fold an affine map into the last MLP layer so that the loader's output, (r - REWARD_MEAN) / REWARD_STD,
    has mean 0 and std 1 on these images, as ImageReward standardises on its training set."""
    scorer.eval()
    with torch.no_grad():
        scores = score_in_batches(scorer, pixels, prompts, batch_size=128)
        mean, std = scores.mean().item(), max(scores.std().item(), 1e-6)  # a floor for untrained smoke runs
        last = scorer.mlp[-1]
        # new raw = (raw - M - S * mean) / std + M, so (new raw - M) / S = ((raw - M) / S - mean) / std
        last.weight /= std
        last.bias.copy_((last.bias - REWARD_MEAN - REWARD_STD * mean) / std + REWARD_MEAN)
    return {"mean": mean, "std": std, "images": len(prompts)}


def save_image_reward(folder: str, init_folder: str, scorer: ImageReward, half: bool) -> None:
    state = image_reward_state(scorer.vision, scorer.text, scorer.mlp)
    # the MLP stays fp32, as ImageReward runs it: the standardisation folded into it need not fit fp16
    save_file({k: (v.half() if half and not k.startswith("mlp.") else v).contiguous() for k, v in state.items()},
              os.path.join(folder, IMAGE_REWARD_FILE))
    for name in ("med_config.json", "vocab.txt"):
        shutil.copy(os.path.join(init_folder, name), os.path.join(folder, name))


# ----------------------------------------------------------------------------------------------- 6. aesthetic

def validity_pairs(samples: Samples, captions: set[str]) -> Pairs:
    """Every two images of one of `captions` of which only one is valid (what the aesthetic head should rank)."""
    rows = [(p, a, b) if samples.valid[a] else (p, b, a)
            for p in sorted(captions) for a, b in itertools.combinations(
                [i for i, q in enumerate(samples.prompts) if q == p], 2) if samples.valid[a] != samples.valid[b]]
    return Pairs([r[0] for r in rows], torch.tensor([r[1] for r in rows], dtype=torch.long),
                 torch.tensor([r[2] for r in rows], dtype=torch.long), ["valid"] * len(rows))


def train_aesthetic(cfg, work, clip: ClipScore, pixels, valid: np.ndarray, rows: list[int]):
    """The LAION head (linear layers with dropout between, no activations) on the CLIP's L2-normalised image
    embeddings of the images `rows`, MSE to validity (1 valid, 0 not). Returns (scorer, head weights)."""
    with torch.no_grad():
        embeds = torch.cat([clip.image_embeds(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
    sizes = (embeds.shape[1], *AESTHETIC_HIDDEN, 1)
    torch.manual_seed(cfg.seed + 50)
    linears = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    # the original nn.Sequential: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear
    head = torch.nn.Sequential(linears[0], torch.nn.Dropout(0.2), linears[1], torch.nn.Dropout(0.2), linears[2],
                               torch.nn.Dropout(0.1), linears[3], linears[4])
    target = torch.from_numpy(valid.astype(np.float32))
    rows = torch.tensor(rows, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed + 51)

    def step_fn(step):
        k = rows[torch.randint(0, len(rows), (cfg.aesthetic_batch,), generator=gen)]
        return F.mse_loss(head(embeds[k]).squeeze(-1), target[k])

    train_loop("aesthetic", head.parameters(), step_fn, cfg.aesthetic_steps,
               lambda s: cosine_lr(s, cfg.aesthetic_steps, warmup(cfg.aesthetic_steps), cfg.aesthetic_lr),
               os.path.join(work, "aesthetic.pt"), lambda c: head.load_state_dict(c["model"]),
               lambda: {"model": head.state_dict()}, cfg.checkpoint_every, gen)
    weights = {f"layers.{i}.{p}": getattr(head[i], p).detach().clone() for i in HEAD_LAYERS
               for p in ("weight", "bias")}
    return AestheticScore(clip, weights).eval(), weights


# ----------------------------------------------------------------------------------------------- the stack

def build_hps(cfg, work, out, clip, tokenizer, pixels, train, validation, data) -> str:
    hps = hps_start(clip, tokenizer)
    start = {"near_miss_accuracy": near_miss_accuracy(hps, cfg.seed, 256),
             "validation_pair_accuracy": pair_accuracy(hps, pixels, validation)}
    train_hps(cfg, work, hps, pixels, train)
    info = {"data": data, "start": start, "near_miss_accuracy": near_miss_accuracy(hps, cfg.seed, 256),
            "validation_pair_accuracy": pair_accuracy(hps, pixels, validation),
            "training_pair_accuracy": pair_accuracy(hps, pixels, train)}

    def write(tmp):
        save_hps(tmp, hps, cfg.half)
        write_info(tmp, cfg, **info)
    return os.path.join(write_folder(out, FOLDERS["hpsv2"], write), HPS_FILE)


def build_image_reward(cfg, work, out, images, captions, samples, pixels, train, validation, data) -> str:
    init_folder = os.path.join(work, "image_reward_init")
    scorer = init_image_reward(cfg, init_folder)
    itm_accuracy = pretrain_itm(cfg, work, scorer, images, captions)
    finetune_image_reward(cfg, work, scorer, pixels, train)
    rows = [i for i, p in enumerate(samples.prompts) if p in set(train.prompts)]
    info = {"data": data, "itm_near_miss_accuracy": itm_accuracy,
            "standardised_on": standardise(scorer, pixels[rows], [samples.prompts[i] for i in rows]),
            "near_miss_accuracy": near_miss_accuracy(scorer, cfg.seed, 256),
            "validation_pair_accuracy": pair_accuracy(scorer, pixels, validation),
            "training_pair_accuracy": pair_accuracy(scorer, pixels, train)}

    def write(tmp):
        save_image_reward(tmp, init_folder, scorer, cfg.half)
        write_info(tmp, cfg, **info)
    return os.path.join(write_folder(out, FOLDERS["image_reward"], write), IMAGE_REWARD_FILE)


def build_aesthetic(cfg, work, out, clip_dir, samples, pixels, train, validation, data) -> str:
    rows = [i for i, p in enumerate(samples.prompts) if p in set(train.prompts)]
    scorer, weights = train_aesthetic(cfg, work, ClipScore.from_pretrained(clip_dir), pixels, samples.valid, rows)
    info = {"data": data, "clip_sha256": file_sha256(os.path.join(clip_dir, "model.safetensors")),
            "validation_validity_pair_accuracy": pair_accuracy(scorer, pixels,
                                                               validity_pairs(samples, set(validation.prompts)))}

    def write(tmp):
        save_file(weights, os.path.join(tmp, AESTHETIC_FILE))
        write_info(tmp, cfg, **info)
    return os.path.join(write_folder(out, FOLDERS["aesthetic"], write), AESTHETIC_FILE)


def build_reward_stack(cfg: RewardStackConfig, work: str, pipe, clip, tokenizer, images: np.ndarray,
                       captions: list[str], out: str, clip_dir: str) -> dict[str, str]:
    """Learn the three rewards from the oracle and write them under `out` (see the module docstring).

    pipe: the base StableDiffusionPipeline whose samples are judged. clip: the CLIPModel HPS starts from.
    tokenizer: its CLIP tokenizer. images, captions: ground-truth uint8 images [N, H, W, 3] of training
    captions, for BLIP's pretraining. clip_dir: the CLIP folder whose embeddings the aesthetic head reads (the
    one `load_reward("aesthetic", path, clip_dir)` is given). Returns {family: main file written}."""
    os.makedirs(work, exist_ok=True)
    started = time.time()
    samples = draw_samples(cfg, work, pipe)
    pixels = to_pixels(samples.images)
    train, validation = split_pairs(cfg, preference_pairs(samples, near_miss_rejects(cfg, work, samples)))
    data = {"images": len(samples.prompts), "captions": len(set(samples.prompts)),
            "correct": float(samples.correct.mean()), "valid": float(samples.valid.mean()),
            "sampling_cpu_seconds": round(samples.cpu_seconds, 1), "training_pairs": train.counts(),
            "validation_pairs": validation.counts()}
    logger.info(f"preference data: {json.dumps(data)}")
    written = {"hpsv2": build_hps(cfg, work, out, clip, tokenizer, pixels, train, validation, data),
               "image_reward": build_image_reward(cfg, work, out, images, captions, samples, pixels, train,
                                                  validation, data),
               "aesthetic": build_aesthetic(cfg, work, out, clip_dir, samples, pixels, train, validation, data)}
    logger.info(f"reward stack built in {(time.time() - started) / 60:.1f} min -> {out}")
    return written


def main(argv=None):
    from transformers import CLIPModel, CLIPTokenizer

    from ..loading import TINY, TINY_CLIP_DIR, load_pipeline

    parser = cli.make_parser("r0_core.tiny.reward_stack", __doc__)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "weights"),
                        help="where tiny-hps/, tiny-image-reward/ and tiny-aesthetic/ are written (default: the "
                             "shipped location)")
    parser.add_argument("--work", default="build/reward_stack", help="samples and resumable checkpoints")
    parser.add_argument("--pipeline", default=TINY, help="the base pipeline whose samples are judged")
    parser.add_argument("--clip", default=TINY_CLIP_DIR,
                        help="CLIP folder HPS starts from and the aesthetic head reads (default: tiny-clip)")
    parser.add_argument("--ground-truth", type=int, default=10_000, help="ground-truth images for BLIP's pretraining")
    names = cli.add_config_arguments(parser, RewardStackConfig, RewardStackConfig())
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    cfg = RewardStackConfig(**cli.config_values(args, names))
    torch.set_num_threads(cfg.threads)
    pipe = load_pipeline(args.pipeline, device="cpu", dtype=torch.float32)
    clip = CLIPModel.from_pretrained(args.clip, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(args.clip, local_files_only=True)
    images, captions = world.sample_batch(seed=cfg.seed * 1_000_003 + 777, n=args.ground_truth)
    build_reward_stack(cfg, args.work, pipe, clip, tokenizer, images, captions, args.out, clip_dir=args.clip)


if __name__ == "__main__":
    main()
