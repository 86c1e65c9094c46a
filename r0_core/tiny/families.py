"""Tiny SDXL- and SD3-architecture models of the world: `python -m r0_core.tiny.families --family sdxl`.

The built-in world (tiny-sd) has an SD 1.x architecture. These give the other families a model that draws the
world too, so that their samplers, trainers and workflows can be checked by eye and by the oracle:
  tiny-sdxl  an SDXL UNet (two text encoders side by side, pooled text embedding and size ids as added
             conditioning), v-prediction on the world's own schedule;
  tiny-sd3   an SD3 MMDiT (joint attention over both CLIPs' states, pooled projections, no T5), trained by flow
             matching on SD3's shifted schedule.
Both reuse the world's frozen parts: its VAE (SD3's is given a shift of 0), its text tower (text_encoder; for SD3
with an identity projection) and the reward CLIP's text tower with its projection (text_encoder_2, the pooled
embedding). Only the backbone is trained, with the family's own training target (r0_core.family.diffusion_loss),
on the world's seeded images, resumable from --work; the pipeline (EMA weights) is saved in fp16 under
--out/tiny-<family>,
with build_info.json holding the settings, the seconds and the oracle's accuracy at 4 steps.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time

import numpy as np
import torch

from .. import cli, family
from ..loading import TINY_CLIP_DIR, TINY_PIPELINE_DIR
from . import build, models, world

FAMILIES = ("sdxl", "sd3")
# The world's UNet (models.UNET_CONFIG) a little narrower at 8x8 and 4x4, to keep the shipped weights small;
# cross-attention takes both text towers' states (2 x 128).
SDXL_UNET = dict(models.UNET_CONFIG, block_out_channels=(64, 96, 96), cross_attention_dim=256, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=16,
                 projection_class_embeddings_input_dim=16 * 6 + 128)
# 16x16 latents in 2x2 patches: 64 tokens; joint attention over the CLIPs' 2 x 128 states (no T5).
SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                       attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                       caption_projection_dim=128, pooled_projection_dim=256, pos_embed_max_size=16)


@dataclasses.dataclass
class FamilyBuildConfig:
    family: str = "sdxl"          # "sdxl" or "sd3"
    seed: int = 0                 # of the data, the initial weights and the batches
    num_images: int = 40_000      # world images (rendered afresh: the build needs nothing but the shipped world)
    steps: int = 2500             # optimiser steps
    batch: int = 32               # images per step
    lr: float = 3e-4              # peak learning rate (cosine schedule)
    warmup: int = 200             # warm-up steps
    ema_decay: float = 0.999      # EMA of the backbone's weights, which is what is saved
    caption_dropout: float = 0.1  # empty captions, so classifier-free guidance works
    flow_shift: float = 3.0       # SD3's schedule shift (the sampler reads it from the scheduler)
    checkpoint_every: int = 250   # steps between resumable checkpoints
    eval_seeds: int = 4           # noise seeds per validation caption of the quality check (0: no check)
    threads: int = 1              # torch threads


def frozen_parts(cfg: FamilyBuildConfig) -> dict:
    """The world's VAE, tokenizer and text towers, as the family's pipeline takes them."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(TINY_PIPELINE_DIR, "tokenizer"))
    vae_dir = os.path.join(TINY_PIPELINE_DIR, "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, **({"shift_factor": 0.0} if cfg.family == "sd3" else {}))
    tower = os.path.join(TINY_PIPELINE_DIR, "text_encoder")
    if cfg.family == "sdxl":
        text_encoder = CLIPTextModel.from_pretrained(tower)
    else:   # SD3 pools both towers through their projections: the world's tower gets an identity one
        text_encoder = CLIPTextModelWithProjection.from_pretrained(tower, projection_dim=models.TEXT_CONFIG[
            "hidden_size"])
        with torch.no_grad():
            text_encoder.text_projection.weight.copy_(torch.eye(text_encoder.config.hidden_size))
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(TINY_CLIP_DIR)
    parts = dict(vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer,
                 text_encoder_2=text_encoder_2)
    for module in (vae, text_encoder, text_encoder_2):
        # shipped in fp16 (save): the backbone trains on the rounded weights it will be loaded with
        module.half().float().eval().requires_grad_(False)
    return parts


def new_pipeline(cfg: FamilyBuildConfig):
    """The family's pipeline with a freshly initialised (seeded) backbone."""
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

    parts = frozen_parts(cfg)
    torch.manual_seed(cfg.seed + 4)
    if cfg.family == "sdxl":
        pipe = StableDiffusionXLPipeline(unet=UNet2DConditionModel(**SDXL_UNET),
                                         scheduler=DDIMScheduler(**models.SCHEDULER_CONFIG), **parts)
    else:
        pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**SD3_TRANSFORMER),
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift),
                                        text_encoder_3=None, tokenizer_3=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def world_latents(cfg: FamilyBuildConfig, work: str, pipe) -> tuple[torch.Tensor, list[str]]:
    """Scaled VAE latents (posterior means, as the world's UNet was trained on) and captions of seeded images."""
    path = os.path.join(work, "latents.pt")
    if not os.path.exists(path):
        latents, captions = [], []
        for i in range(0, cfg.num_images, 500):
            images, texts = world.sample_batch(seed=cfg.seed * 1_000_003 + 7 + i, n=min(500, cfg.num_images - i))
            with torch.no_grad():
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
                latents.append(family.encode(pipe, x))
            captions += texts
        build.atomic_save({"latents": torch.cat(latents), "captions": captions}, path)
    saved = torch.load(path, weights_only=True)
    return saved["latents"], saved["captions"]


def train_backbone(cfg: FamilyBuildConfig, work: str, pipe):
    """Train the backbone on the world's latents with the family's own target; EMA weights copied in."""
    from diffusers.training_utils import EMAModel

    latents, captions = world_latents(cfg, work, pipe)
    scenes = {c: world.parse_caption(c) for c in set(captions)}
    model = family.backbone(pipe).train()
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    gen = torch.Generator().manual_seed(cfg.seed + 5)

    def step_fn(step):
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        rng = build.caption_rng(build.BuildConfig(seed=cfg.seed), cfg.family, step)
        # the world's UNet saw its captions plainly (BuildConfig's unet shares are 0): so do these
        texts = [world.augment_caption(scenes[captions[i]], rng, 0, 0)[0] for i in idx.tolist()]
        dropped = torch.tensor([rng.random() < cfg.caption_dropout for _ in texts])
        kept, empty = (~dropped).nonzero().flatten(), dropped.nonzero().flatten()
        with torch.no_grad():   # a dropped caption gets the unconditional embedding the sampler guides with
            c = family.conditioning(pipe, texts, 1.0, with_uncond=True)
            c = family.join(family.take(family.conditional(c), kept), family.take(family.unconditional(c), empty))
        x0 = latents[idx[torch.cat([kept, empty])]]
        noise = torch.randn(x0.shape, generator=gen)
        t = family.training_timesteps(pipe.scheduler, len(idx), gen)
        if step > 0:
            ema.step(model.parameters())
        return family.diffusion_loss(pipe, model, x0, c, noise, t).mean()

    def restore(c):
        model.load_state_dict(c["model"])
        ema.load_state_dict(c["ema"])

    build.train_loop(f"tiny-{cfg.family}", model.parameters(), step_fn, cfg.steps,
                     lambda s: build.cosine_lr(s, cfg.steps, cfg.warmup, cfg.lr), os.path.join(work, "backbone.pt"),
                     restore, lambda: {"model": model.state_dict(), "ema": ema.state_dict()},
                     cfg.checkpoint_every, gen)
    ema.copy_to(model.parameters())
    model.eval().requires_grad_(False)


def quality(cfg: FamilyBuildConfig, pipe) -> dict:
    """The oracle's accuracy at 4 steps (R0 sampler, η = 0), CFG 2 and none: one object (every caption), and the
    validation half's positioned objects and pairs."""
    from . import oracle, protocol
    from .evaluate import r0_images

    out = {}
    for kind in ("single",) + protocol.KINDS if cfg.eval_seeds > 0 else ():
        if kind == "single":   # never held out: every colour-shape caption
            texts = [world.caption(s) for s in world.prompt_split("single")[0]]
            prompts = [t for t in texts for _ in range(cfg.eval_seeds)]
        else:
            prompts, _ = protocol.cell(kind, "validation", cfg.eval_seeds)
        for guidance in (2.0, 1.0):
            images = r0_images(pipe, prompts, steps=4, guidance=guidance, seed=1000, progress=False)
            right = [oracle.judge(im, p).correct for im, p in zip(images, prompts)]
            out[f"{kind}, 4 steps, guidance {guidance:g}"] = round(float(np.mean(right)), 4)
    return out


def save(cfg: FamilyBuildConfig, out: str, pipe, seconds: float, measured: dict) -> str:
    """The pipeline as a diffusers folder (fp16, to keep the repository small), written atomically."""
    final = os.path.join(out, f"tiny-{cfg.family}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16)   # every weight in fp16 (loaders cast to the pipeline's dtype): 9-13 MB a family
    pipe.save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    for config in glob.glob(os.path.join(tmp, "*", "config.json")):
        with open(config) as f:
            values = json.load(f)
        if values.pop("_name_or_path", None) is not None:   # the frozen parts' source folder on this machine
            with open(config, "w") as f:
                json.dump(values, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "build_info.json"), "w") as f:
        json.dump({"build_config": dataclasses.asdict(cfg), "build_seconds": round(seconds),
                   "oracle_accuracy_validation": measured}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def main(argv=None):
    parser = cli.make_parser("r0_core.tiny.families", __doc__)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "weights"),
                        help="where tiny-<family>/ is written (default: the shipped location)")
    parser.add_argument("--work", default=None, help="latents and resumable checkpoints (default build/tiny-<family>)")
    names = cli.add_config_arguments(parser, FamilyBuildConfig, FamilyBuildConfig())
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    cfg = FamilyBuildConfig(**cli.config_values(args, names))
    if cfg.family not in FAMILIES:
        parser.error(f"--family {cfg.family!r}: expected one of {', '.join(FAMILIES)}")
    torch.set_num_threads(cfg.threads)
    work = args.work or os.path.join("build", f"tiny-{cfg.family}")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    pipe = new_pipeline(cfg)
    train_backbone(cfg, work, pipe)
    measured = quality(cfg, pipe)
    final = save(cfg, args.out, pipe, time.time() - started, measured)
    print(f"tiny-{cfg.family}: {json.dumps(measured)} -> {final}")


if __name__ == "__main__":
    main()
