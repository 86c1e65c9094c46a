"""Quality of the built-in tiny world, measured by its oracle: `python benchmarks/tiny_quality.py`.

Reports, on held-out captions (never seen in training):
  - the base model at 50-step DDIM with CFG, and at 4 steps with no distillation (the gap R0 must close);
  - the ceilings: the oracle on ground truth, on ground truth through the VAE, and on pure noise;
  - the tiny reward CLIP's zero-shot accuracy at telling the right caption from the others of its kind.
Writes a JSON report and a PNG grid of samples to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import load_reward
from r0_core.tiny import oracle, world
from r0_core.tiny.evaluate import evaluate, grid


def vae_ceiling(pipe, n: int) -> dict:
    """Oracle accuracy on held-out ground truth after an encode/decode round trip through the VAE."""
    images, captions = world.sample_batch(seed=999, n=n, held_out=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    y = ((y.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return {"ground_truth": oracle.accuracy(images, captions), "vae_round_trip": oracle.accuracy(y, captions),
            "noise": oracle.accuracy(np.random.default_rng(0).random(images.shape), captions)}


def clip_zero_shot(n: int) -> dict:
    """How often the tiny CLIP ranks an image's own caption first among all captions of the same kind."""
    scorer = load_reward("clip", TINY)
    out = {}
    for kind in ("single", "pair"):
        candidates = [world.caption(s) for s in world.all_scenes()[kind]]
        mix = (1, 0, 0) if kind == "single" else (0, 0, 1)
        images, captions = world.sample_batch(seed=77, n=n, mix=mix, held_out=kind == "pair")
        with torch.no_grad():
            image = scorer.image_embeds(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
            best = (image @ scorer.text_embeds(candidates).T).argmax(1)
        out[kind] = float(np.mean([candidates[i] == c for i, c in zip(best.tolist(), captions)]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY)
    parser.add_argument("-n", type=int, default=200, help="samples per (kind, setting)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--out", default="out/benchmarks/tiny_quality")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    pipe = load_pipeline(args.model)

    report = {"model": args.model, "n": args.n, "guidance": args.guidance, "base_model": {}}
    report.update(vae_ceiling(pipe, args.n))
    report["clip_zero_shot"] = clip_zero_shot(args.n)
    sheets = []
    for steps in (50, 4):
        for kind in ("positioned", "pair"):
            metrics, images, _ = evaluate(pipe, kind, args.n, steps=steps, guidance=args.guidance)
            report["base_model"][f"{kind}_{steps}_steps"] = metrics
            sheets.append(images[:16])
    report["seconds"] = round(time.time() - started)

    rows = [("held-out single object: colour+shape right", "positioned", "objects_correct"),
            ("held-out single object: + position right", "positioned", "correct"),
            ("held-out two objects: both objects + relation", "pair", "correct"),
            ("held-out two objects: both objects, any layout", "pair", "objects_correct"),
            ("clean images (valid)", "positioned", "valid")]
    print(f"\n{'oracle accuracy':50s} {'50 steps':>9s} {'4 steps':>9s}   (n={args.n}, CFG {args.guidance})")
    for label, kind, field in rows:
        a, b = (report["base_model"][f"{kind}_{s}_steps"][field] for s in (50, 4))
        print(f"{label:50s} {a:9.1%} {b:9.1%}")
    print(f"ceilings: ground truth {report['ground_truth']['correct']:.1%}, through the VAE "
          f"{report['vae_round_trip']['correct']:.1%}, noise {report['noise']['correct']:.1%}")
    print(f"tiny CLIP zero-shot: single {report['clip_zero_shot']['single']:.1%}, "
          f"pair {report['clip_zero_shot']['pair']:.1%}")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    # rows: 50-step single, 50-step pair, 4-step single, 4-step pair (same prompts and seeds across step counts)
    Image.fromarray(grid(np.concatenate(sheets), columns=16)).save(os.path.join(args.out, "samples.png"))
    print(f"wrote {args.out}/report.json and samples.png in {report['seconds']} s")


if __name__ == "__main__":
    main()
