"""Build the tiny world's weights from a seed on a CPU: `python -m r0_core.tiny.build`.

Stages, each resumable from its last checkpoint under --work (rerun the same command after a stop):
  1. data   seeded images and captions of the world
  2. vae    AutoencoderKL, 32x32x3 pixels <-> 16x16x4 latents
  3. clip   CLIPModel trained contrastively; its text tower becomes the pipeline's frozen text encoder
  4. unet   UNet2DConditionModel, v-prediction on the VAE latents, EMA weights
  5. reward the reward CLIP: the CLIP of stage 3 fine-tuned against hard negatives (the same caption with one
            colour, shape, position or relation changed), so its score tells a wrong relation from a right one
  6. save   the pipeline as a diffusers folder (tiny-sd) and the reward CLIP (tiny-clip) under --out
  7. stack  the reward stack learned from the saved pipeline's samples judged by the oracle: tiny HPS, tiny
            ImageReward and the tiny aesthetic head (r0_core/tiny/reward_stack.py), also under --out
Training captions vary as world.augment_caption says (nonsense words, colours left out), so the text tower and
the UNet learn that the subjects' rare tokens mean nothing until fine-tuning gives them a meaning.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cli
from ..files import atomic_save
from . import models, world

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildConfig:
    seed: int = 0                 # of every draw: data, initial weights, batches
    num_images: int = 100_000     # distinct training images; the UNet sees each about twice
    vae_steps: int = 800          # VAE optimiser steps
    vae_batch: int = 32           # VAE images per step
    vae_lr: float = 1e-3          # VAE peak learning rate (cosine schedule)
    vae_kl_weight: float = 1e-6   # as in SD: latents only need to stay smooth, not Gaussian
    clip_steps: int = 500         # CLIP optimiser steps
    clip_batch: int = 128         # CLIP image-caption pairs per step
    clip_lr: float = 5e-4         # CLIP peak learning rate
    unet_steps: int = 4000        # UNet optimiser steps
    unet_batch: int = 32          # UNet images per step
    unet_lr: float = 3e-4         # UNet peak learning rate
    unet_warmup: int = 300        # UNet warm-up steps
    ema_decay: float = 0.999      # EMA of the UNet weights, which is what is saved
    caption_dropout: float = 0.1  # empty captions, so classifier-free guidance works
    # the UNet's caption variations (the CLIP's are the world's): lower them to measure what they cost
    # 0/0 for the UNet, chosen on the validation half among 0.30/0.15 (the text tower's), 0.15/0.05 and 0/0: the
    # only one that kept two-object captions at 21% (benchmarks/results/ablate_*, README "Base-model quality")
    unet_nonsense_share: float = 0.0     # UNet captions with a nonsense word inserted
    unet_colourless_share: float = 0.0   # UNet captions with one colour left out
    reward_steps: int = 500       # reward-CLIP optimiser steps
    reward_batch: int = 64        # reward-CLIP images per step
    reward_lr: float = 3e-4       # reward-CLIP peak learning rate
    reward_negatives: int = 4     # hard negatives per image, on top of the other captions of the batch
    checkpoint_every: int = 250   # steps between resumable checkpoints of every stage
    threads: int = 1              # torch threads (2 train only ~12% faster on 2 cores and block the machine)


# ----------------------------------------------------------------------------------------------- helpers

def load_checkpoint(path: str):
    return torch.load(path, weights_only=True) if os.path.exists(path) else None


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def caption_rng(cfg: BuildConfig, stage: str, step: int) -> random.Random:
    """The caption variations of one training step, seeded by (seed, stage, step) so a resumed run draws the
    same captions as an unbroken one."""
    return random.Random(f"{cfg.seed}-{stage}-{step}")


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_loop(name, model_params, step_fn, steps, lr_fn, ckpt_path, state, save_state, every, gen):
    """A plain resumable loop: restore, then step -> log -> checkpoint. `step_fn(step)` returns the loss and
    draws all its randomness from `gen`, whose state is checkpointed so a resumed run matches an unbroken one."""
    opt = torch.optim.AdamW(model_params, lr=lr_fn(0), weight_decay=0.0)
    ckpt = load_checkpoint(ckpt_path)
    start, seconds, started = 0, 0.0, time.time()   # seconds: training time over every run, for build_info
    if ckpt is not None:
        state(ckpt)
        opt.load_state_dict(ckpt["optimizer"])
        start, seconds = ckpt["step"], ckpt.get("seconds", float("nan"))
        if "generator" in ckpt:
            gen.set_state(ckpt["generator"])
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps)
    ema_loss = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_fn(step)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{lr_fn(step):.1e}")
        if (step + 1) % every == 0 or step + 1 == steps:
            atomic_save({**save_state(), "optimizer": opt.state_dict(), "step": step + 1,
                         "generator": gen.get_state(), "seconds": seconds + time.time() - started}, ckpt_path)


# ----------------------------------------------------------------------------------------------- stages

def build_data(cfg: BuildConfig, work: str):
    path = os.path.join(work, "data.npz")
    if not os.path.exists(path):
        chunks, texts = [], []
        for i in tqdm(range(0, cfg.num_images, 1000), desc="data"):
            images, caps = world.sample_batch(seed=cfg.seed * 1_000_003 + i, n=min(1000, cfg.num_images - i))
            chunks.append(images)
            texts += caps
        np.savez(path + ".tmp.npz", images=np.concatenate(chunks), captions=np.array(texts))
        os.replace(path + ".tmp.npz", path)
    data = np.load(path)
    return data["images"], [str(c) for c in data["captions"]]


def build_vae(cfg: BuildConfig, work: str, images: np.ndarray):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**models.VAE_CONFIG)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def step_fn(step):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen).numpy()
        x = to_model_range(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # L1 keeps edges sharp; the small L2 term settles flat colours
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()

    train_loop("vae", vae.parameters(), step_fn, cfg.vae_steps,
               lambda s: cosine_lr(s, cfg.vae_steps, 100, cfg.vae_lr), os.path.join(work, "vae.pt"),
               lambda c: vae.load_state_dict(c["model"]), lambda: {"model": vae.state_dict()},
               cfg.checkpoint_every, gen)
    vae.eval().requires_grad_(False)
    # SD's convention: latents are multiplied by scaling_factor so that they have unit variance
    with torch.no_grad():
        sample = vae.encode(to_model_range(images[:2000])).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    return vae


def clip_config(vocab_size: int):
    from transformers import CLIPConfig

    text = dict(models.TEXT_CONFIG, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPConfig(text_config=text, vision_config=models.VISION_CONFIG,
                      projection_dim=models.TEXT_CONFIG["projection_dim"])


def build_clip(cfg: BuildConfig, work: str, images: np.ndarray, captions: list[str], tokenizer):
    """Contrastive CLIP on the world's images and their varied captions (world.augment_caption): a caption
    that leaves a colour out is true of every image it describes, and a nonsense word changes nothing, so the
    text tower learns that such words mean nothing."""
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed + 2)
    clip = CLIPModel(clip_config(len(tokenizer)))
    scenes = {c: world.parse_caption(c) for c in set(captions)}
    gen = torch.Generator().manual_seed(cfg.seed + 3)

    def step_fn(step):
        idx = torch.randint(0, len(images), (cfg.clip_batch,), generator=gen).numpy()
        shown = [scenes[captions[i]] for i in idx]
        rng = caption_rng(cfg, "clip", step)
        texts, asked = zip(*(world.augment_caption(s, rng) for s in shown))
        ids = tokenizer(list(texts), padding="max_length", max_length=models.MAX_TOKENS, return_tensors="pt")
        out = clip(input_ids=ids.input_ids, pixel_values=to_model_range(images[idx]))  # CLIP mean = std = 0.5
        # true[i, j]: caption j describes image i; every true pair is a positive, in both directions
        true = torch.tensor([[world.describes(a, s) for a in asked] for s in shown], dtype=torch.float32)
        return 0.5 * (torch.sum(-(true / true.sum(1, keepdim=True)) * F.log_softmax(out.logits_per_image, 1), 1).mean()
                      + torch.sum(-(true.T / true.T.sum(1, keepdim=True)) * F.log_softmax(out.logits_per_text, 1),
                                  1).mean())

    train_loop("clip", clip.parameters(), step_fn, cfg.clip_steps,
               lambda s: cosine_lr(s, cfg.clip_steps, 50, cfg.clip_lr), os.path.join(work, "clip.pt"),
               lambda c: clip.load_state_dict(c["model"]), lambda: {"model": clip.state_dict()},
               cfg.checkpoint_every, gen)
    return clip.eval().requires_grad_(False)


def build_reward_clip(cfg: BuildConfig, work: str, clip, images: np.ndarray, captions: list[str], tokenizer):
    """Fine-tune a copy of the CLIP so that each image's caption beats its near misses (held-out captions are
    never used, not even as negatives)."""
    import copy

    reward = copy.deepcopy(clip).train().requires_grad_(True)
    known = sorted(set(world.training_captions()))
    row = {c: i for i, c in enumerate(known)}
    ids = tokenizer(known, padding="max_length", max_length=models.MAX_TOKENS, return_tensors="pt").input_ids
    misses = {c: [row[world.caption(m)] for m in world.near_misses(world.parse_caption(c))
                  if world.caption(m) in row] for c in known}
    gen = torch.Generator().manual_seed(cfg.seed + 5)

    def step_fn(step):
        idx = torch.randint(0, len(images), (cfg.reward_batch,), generator=gen).numpy()
        truth = [row[captions[i]] for i in idx]
        negatives = [m[int(j)] for c in truth for m in [misses[known[c]]]
                     for j in torch.randint(0, len(m), (cfg.reward_negatives,), generator=gen)]
        texts = sorted(set(truth) | set(negatives))
        column = {t: j for j, t in enumerate(texts)}
        out = reward(input_ids=ids[texts], pixel_values=to_model_range(images[idx]))
        target = torch.tensor([column[t] for t in truth])
        # image -> text over the batch's captions and near misses; text -> image over the batch, as in stage 3
        lab = torch.tensor(truth)
        same = (lab[:, None] == lab[None, :]).float()
        t2i = out.logits_per_text[target]
        return 0.5 * (F.cross_entropy(out.logits_per_image, target)
                      + torch.sum(-(same / same.sum(1, keepdim=True)) * F.log_softmax(t2i, 1), 1).mean())

    train_loop("reward", reward.parameters(), step_fn, cfg.reward_steps,
               lambda s: cosine_lr(s, cfg.reward_steps, 50, cfg.reward_lr), os.path.join(work, "reward_clip.pt"),
               lambda c: reward.load_state_dict(c["model"]), lambda: {"model": reward.state_dict()},
               cfg.checkpoint_every, gen)
    return reward.eval().requires_grad_(False)


def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=models.MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def build_unet(cfg: BuildConfig, work: str, images, captions, vae, text_encoder, tokenizer, scheduler):
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    latents_path = os.path.join(work, "latents.pt")
    if not os.path.exists(latents_path):
        with torch.no_grad():
            means = torch.cat([vae.encode(to_model_range(images[i:i + 500])).latent_dist.mean
                               for i in tqdm(range(0, len(images), 500), desc="latents")])
        atomic_save(means, latents_path)
    # Train on the posterior means: the tiny VAE's posterior noise is large next to its signal, and the
    # decoder (trained on posterior samples) decodes the means cleanly, so the UNet gets crisp targets.
    latents = torch.load(latents_path, weights_only=True) * vae.config.scaling_factor

    scenes = {c: world.parse_caption(c) for c in set(captions)}

    def embed(idx, step):
        """Text-encoder states of the batch's varied captions; a share are empty, so classifier-free guidance
        works."""
        rng = caption_rng(cfg, "unet", step)
        texts = ["" if rng.random() < cfg.caption_dropout else world.augment_caption(
                     scenes[captions[i]], rng, cfg.unet_nonsense_share, cfg.unet_colourless_share)[0]
                 for i in idx.tolist()]
        return encode_prompts(text_encoder, tokenizer, texts)

    torch.manual_seed(cfg.seed + 4)
    unet = UNet2DConditionModel(**models.UNET_CONFIG)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    alphas_cumprod = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed + 5)

    def step_fn(step):
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        v_target = a * noise - s * x0                          # v = α ε − σ x0
        v_pred = unet(a * x0 + s * noise, t, embed(idx, step)).sample
        if step > 0:
            ema.step(unet.parameters())
        return F.mse_loss(v_pred, v_target)

    def restore(c):
        unet.load_state_dict(c["model"])
        ema.load_state_dict(c["ema"])

    train_loop("unet", unet.parameters(), step_fn, cfg.unet_steps,
               lambda s: cosine_lr(s, cfg.unet_steps, cfg.unet_warmup, cfg.unet_lr), os.path.join(work, "unet.pt"),
               restore, lambda: {"model": unet.state_dict(), "ema": ema.state_dict()},
               cfg.checkpoint_every, gen)
    ema.copy_to(unet.parameters())
    return unet.eval().requires_grad_(False)


def stage_seconds(work: str) -> dict:
    """Training seconds of each trained stage summed over all its runs, from its checkpoint (None where the stage
    ran, in part, before the build counted time)."""
    found = {}
    for stage in ("vae", "clip", "unet", "reward_clip"):
        ckpt = load_checkpoint(os.path.join(work, f"{stage}.pt"))
        value = None if ckpt is None else ckpt.get("seconds")
        found[stage] = None if value is None or value != value else round(value)
    return found


def save_world(out: str, work: str, vae, clip, reward_clip, tokenizer, unet, scheduler, cfg: BuildConfig,
               seconds: float):
    """Write tiny-sd (a StableDiffusionPipeline folder, text encoder = the stage-3 CLIP's text tower) and
    tiny-clip (the reward CLIP, a CLIPModel folder) atomically."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
    # the UNet is stored in fp16 to keep the repository small; loaders cast it to the pipeline's dtype
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.half(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    os.makedirs(out, exist_ok=True)
    for name, save in (("tiny-sd", pipe.save_pretrained), ("tiny-clip", None)):
        final, tmp = os.path.join(out, name), os.path.join(out, name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if save is not None:
            save(tmp, safe_serialization=True)
        else:
            reward_clip.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "build_info.json"), "w") as f:
            json.dump({"build_config": dataclasses.asdict(cfg), "build_seconds": round(seconds),
                       "stage_seconds": stage_seconds(work)}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def main(argv=None):
    parser = cli.make_parser("r0_core.tiny.build", __doc__)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "weights"),
                        help="where tiny-sd/ and tiny-clip/ are written (default: the shipped location)")
    parser.add_argument("--work", default="build/tiny", help="data and resumable checkpoints")
    parser.add_argument("--only", choices=("data", "vae", "clip", "unet", "reward", "save", "stack"),
                        help="run one stage and what it needs (trained stages load from their checkpoints), so "
                             "that independent stages can run in two processes at once (scripts/build_tiny.sh); "
                             "'save' is every stage up to the saved pipeline, without the reward stack")
    names = cli.add_config_arguments(parser, BuildConfig, BuildConfig())
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    cfg = BuildConfig(**cli.config_values(args, names))
    torch.set_num_threads(cfg.threads)
    os.makedirs(args.work, exist_ok=True)
    started = time.time()

    from diffusers import DDIMScheduler

    images, captions = build_data(cfg, args.work)
    tokenizer = models.build_tokenizer(os.path.join(args.work, "tokenizer"))
    if args.only == "data":
        return
    # every stage resumes from (or loads) its checkpoint, so --only runs one stage and the rest load theirs
    vae = build_vae(cfg, args.work, images) if args.only in (None, "vae", "unet", "save") else None
    if args.only == "vae":
        return
    clip = build_clip(cfg, args.work, images, captions, tokenizer)
    if args.only == "clip":
        return
    scheduler = DDIMScheduler(**models.SCHEDULER_CONFIG)
    if args.only in (None, "unet", "save"):
        unet = build_unet(cfg, args.work, images, captions, vae, clip.text_model, tokenizer, scheduler)
    if args.only in (None, "reward", "save"):
        reward_clip = build_reward_clip(cfg, args.work, clip, images, captions, tokenizer)
    if args.only in (None, "save"):
        save_world(args.out, args.work, vae, clip, reward_clip, tokenizer, unet, scheduler, cfg,
                   time.time() - started)
    if args.only in (None, "stack"):
        # the reward stack learns from the saved base pipeline's own samples (r0_core/tiny/reward_stack.py)
        from ..loading import load_pipeline
        from .reward_stack import RewardStackConfig, build_reward_stack

        pipe = load_pipeline(os.path.join(args.out, "tiny-sd"), device="cpu", dtype=torch.float32)
        build_reward_stack(RewardStackConfig(seed=cfg.seed), os.path.join(args.work, "reward_stack"), pipe, clip,
                           tokenizer, images, captions, args.out, clip_dir=os.path.join(args.out, "tiny-clip"))
    if args.only is None:
        logger.info(f"built the tiny world in {(time.time() - started) / 60:.1f} min -> {args.out}")


if __name__ == "__main__":
    main()
