"""The demo: `python -m r0_core.demo`. Renders the built-in tiny model on a few prompts with diffusers' 50-step
DDIM + CFG, with the R0 sampler at 4 steps, and (on the tiny model) with the shipped R0 LoRA at 4 steps, scores
every image with the oracle and the tiny CLIP, and writes a grid PNG and a JSON report."""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from . import lora
from .loading import TINY, TINY_R0_LORA, load_pipeline
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
    parser.add_argument("--r0-guidance", type=float, default=2.0, help="CFG of the R0 LoRA row (as it was trained)")
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
    if args.model == TINY and os.path.isfile(TINY_R0_LORA):
        def trained():
            lora.use_loras(pipe, [(lora.load_lora(pipe, TINY_R0_LORA, name="r0"), 1.0)])
            images = r0_images(pipe, prompts, steps=4, guidance=args.r0_guidance, eta=args.eta, seed=args.seed)
            lora.use_loras(pipe, [])
            return images
        settings["4-step R0 LoRA (trained by R0)"] = trained
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
        print(f"\n{name}: oracle accuracy {accuracy:.0%}, tiny-CLIP score {reward:.1f}")
        for p, a in per_prompt.items():
            print(f"  {a:4.0%}  {p}")

    os.makedirs(args.out, exist_ok=True)
    # one row per prompt: the 50-step images, then the 4-step images of the same seeds, then the R0 LoRA's
    ordered = [im for i in range(len(PROMPTS)) for run in rows
               for im in run[i * args.images_per_prompt:(i + 1) * args.images_per_prompt]]
    png = os.path.join(args.out, "grid.png")
    Image.fromarray(grid(np.stack(ordered), columns=len(rows) * args.images_per_prompt)).save(png)
    report["seconds"] = round(time.time() - started, 1)
    report["grid"] = ("one row per prompt, same seeds in each group: " + ", then ".join(settings))
    report["prompts"] = PROMPTS
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {png} and {os.path.join(args.out, 'report.json')} in {report['seconds']} s")


if __name__ == "__main__":
    main()
