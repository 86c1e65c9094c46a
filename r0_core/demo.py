"""The demo: `python -m r0_core.demo`. Renders the built-in tiny model on a few prompts with diffusers' 50-step
DDIM + CFG and with the R0 sampler at 4 steps, scores every image with the oracle and the tiny CLIP, and
writes a grid PNG and a JSON report."""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from .loading import TINY, load_pipeline
from .tiny import oracle
from .rewards import load_reward
from .tiny.evaluate import grid, r0_images, sample_images

PROMPTS = [
    "a red circle", "a blue square on the left", "a yellow triangle at the top", "a green circle in the middle",
    "a purple square left of a yellow circle", "a blue triangle above a red square",
    "a green square right of a purple triangle", "a red triangle below a blue circle",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=TINY, help="'tiny', a diffusers folder or a .safetensors checkpoint")
    parser.add_argument("--out", default="out/demo", help="folder for grid.png and report.json")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--eta", type=float, default=0.0, help="η of the 4-step R0 sampler")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.time()
    pipe = load_pipeline(args.model)
    clip_score = load_reward("clip", TINY)
    prompts = [p for p in PROMPTS for _ in range(args.images_per_prompt)]
    report = {"model": args.model, "guidance": args.guidance, "seed": args.seed, "runs": {}}
    rows = []
    settings = {
        "50-step DDIM + CFG": lambda: sample_images(pipe, prompts, steps=50, guidance=args.guidance, seed=args.seed),
        "4-step R0 sampler": lambda: r0_images(pipe, prompts, steps=4, guidance=args.guidance, eta=args.eta,
                                               seed=args.seed),
    }
    for name, sample in settings.items():
        images = sample()
        verdicts = [oracle.judge(im, p) for im, p in zip(images, prompts)]
        per_prompt = {p: sum(v.correct for v, q in zip(verdicts, prompts) if q == p) / args.images_per_prompt
                      for p in PROMPTS}
        accuracy = sum(v.correct for v in verdicts) / len(verdicts)
        with torch.no_grad():
            reward = float(clip_score(torch.from_numpy(images).permute(0, 3, 1, 2), prompts).mean())
        report["runs"][name] = {"oracle_accuracy": accuracy, "tiny_clip_score": reward, "per_prompt": per_prompt}
        rows.append(images)
        print(f"\n{name} (guidance {args.guidance}): oracle accuracy {accuracy:.0%}, tiny-CLIP score {reward:.1f}")
        for p, a in per_prompt.items():
            print(f"  {a:4.0%}  {p}")

    os.makedirs(args.out, exist_ok=True)
    # one row per prompt: the 50-step images, then the 4-step images of the same seeds
    ordered = [im for i in range(len(PROMPTS)) for run in rows
               for im in run[i * args.images_per_prompt:(i + 1) * args.images_per_prompt]]
    png = os.path.join(args.out, "grid.png")
    Image.fromarray(grid(np.stack(ordered), columns=2 * args.images_per_prompt)).save(png)
    report["seconds"] = round(time.time() - started, 1)
    report["grid"] = "one row per prompt: 50-step DDIM images on the left, 4-step R0 images of the same seeds right"
    report["prompts"] = PROMPTS
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {png} and {os.path.join(args.out, 'report.json')} in {report['seconds']} s")


if __name__ == "__main__":
    main()
