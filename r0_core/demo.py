"""The demo: `python -m r0_core.demo`. Renders the built-in tiny model on a few prompts with diffusers' 50-step
DDIM + CFG, with the R0 sampler at 4 steps, and (on the tiny model) with the shipped R0 LoRA at 4 steps (trained by
R0 on the full reward mix, run without CFG as it was trained: 4 NFE), scores
every image with the oracle and the tiny CLIP, and writes a labelled grid PNG and a JSON report."""
from __future__ import annotations

import json
import os
import time

import torch
from PIL import Image

from . import cli, lora
from .loading import TINY, TINY_R0_LORA, load_pipeline
from .tiny import oracle
from .rewards import load_reward
from .tiny.evaluate import r0_images, sample_images
from .tiny.figures import labelled_grid, verdict_kind

PROMPTS = [
    "a red circle", "a blue square on the left", "a yellow triangle at the top", "a green circle in the middle",
    "a purple square left of a yellow circle", "a blue triangle above a red square",
    "a green square right of a purple triangle", "a red triangle below a blue circle",
]


def nfe(steps: int, cfg: bool) -> int:
    """UNet evaluations per image: classifier-free guidance runs the UNet twice per step."""
    return steps * (2 if cfg else 1)


def describe(weights: str, steps: int, sampler: str, guidance: float, cfg: bool) -> str:
    """A column header such as 'base · 50-step DDIM + CFG 2 · 100 NFE'."""
    guided = f" + CFG {guidance:g}" if cfg else " (no CFG)"
    return f"{weights} · {steps}-step {sampler}{guided} · {nfe(steps, cfg)} NFE"


def settings(pipe, args, prompts: list[str]) -> dict[str, dict]:
    """The settings to compare, by their report.json name: header label, steps, NFE and a sampling function."""
    # diffusers guides when guidance > 1, the R0 sampler whenever guidance != 1 (r0_core.generate)
    base_cfg, r0_cfg, lora_cfg = args.guidance > 1, args.guidance != 1, args.r0_guidance != 1
    out = {
        "base model, 50-step DDIM + CFG": dict(
            label=describe("base", 50, "DDIM", args.guidance, base_cfg), steps=50, nfe=nfe(50, base_cfg),
            sample=lambda: sample_images(pipe, prompts, steps=50, guidance=args.guidance, seed=args.seed)),
        "base model, 4-step R0 sampler (no training)": dict(
            label=describe("base", 4, "R0 sampler", args.guidance, r0_cfg), steps=4, nfe=nfe(4, r0_cfg),
            sample=lambda: r0_images(pipe, prompts, steps=4, guidance=args.guidance, eta=args.eta, seed=args.seed)),
    }
    if args.model != TINY:
        print(f"\nnotice: the shipped R0 LoRA belongs to the tiny model; not shown for --model {args.model}")
        return out
    if not os.path.isfile(TINY_R0_LORA):
        print(f"\nnotice: skipping the R0 LoRA group: {TINY_R0_LORA} is missing "
              "(rebuild it with benchmarks/mini_table1.py --row r0-mix, then --ship)")
        return out

    def trained():
        lora.use_loras(pipe, [(lora.load_lora(pipe, TINY_R0_LORA, name="r0"), 1.0)])
        images = r0_images(pipe, prompts, steps=4, guidance=args.r0_guidance, eta=args.eta, seed=args.seed)
        lora.use_loras(pipe, [])
        return images
    out["R0 LoRA (trained by R0), 4-step R0 sampler"] = dict(
        label=describe("R0 LoRA, full mix", 4, "R0 sampler", args.r0_guidance, lora_cfg), steps=4, nfe=nfe(4, lora_cfg),
        sample=trained)
    return out


def main(argv=None):
    parser = cli.make_parser("r0_core.demo", __doc__)
    parser.add_argument("--model", default=TINY, help="'tiny', a diffusers folder or a .safetensors checkpoint")
    parser.add_argument("--out", default="out/demo", help="folder for grid.png and report.json")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="images of each prompt per setting")
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG of the base model's settings")
    parser.add_argument("--eta", type=float, default=0.0, help="η of the 4-step R0 sampler")
    parser.add_argument("--seed", type=int, default=0, help="image i of a setting uses seed + i")
    parser.add_argument("--r0-guidance", type=float, default=1.0,
                        help="CFG of the R0 LoRA row (1: none, as it was trained)")
    parser.add_argument("--scale", type=int, default=4, help="how many times the grid enlarges each image")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    if args.images_per_prompt < 1:
        parser.error(f"--images-per-prompt is {args.images_per_prompt}; use 1 or more")

    started = time.time()
    pipe = load_pipeline(args.model)
    clip_score = load_reward("clip", TINY)
    k = args.images_per_prompt
    # all prompts of a setting go through the sampler in one batch; image i uses seed + i in every setting
    prompts = [p for p in PROMPTS for _ in range(k)]
    report = {"model": args.model, "guidance": args.guidance, "seed": args.seed, "images_per_prompt": k,
              "runs": {}}
    chosen = settings(pipe, args, prompts)
    all_images, all_verdicts = [], []
    for name, setting in chosen.items():
        images = setting["sample"]()
        verdicts = [oracle.judge(im, p) for im, p in zip(images, prompts)]
        per_prompt = {p: sum(v.correct for v, q in zip(verdicts, prompts) if q == p) / k for p in PROMPTS}
        accuracy = sum(v.correct for v in verdicts) / len(verdicts)
        with torch.no_grad():
            reward = float(clip_score(torch.from_numpy(images).permute(0, 3, 1, 2), prompts).mean())
        report["runs"][name] = {
            "oracle_accuracy": accuracy, "tiny_clip_score": reward, "per_prompt": per_prompt,
            "label": setting["label"], "steps": setting["steps"], "nfe": setting["nfe"],
            "objects_accuracy": sum(v.objects_correct for v in verdicts) / len(verdicts),
            "verdicts": [verdict_kind(v) for v in verdicts]}
        all_images.append(images)
        all_verdicts.append(verdicts)
        print(f"\n{setting['label']}: oracle accuracy {accuracy:.0%}, tiny-CLIP score {reward:.1f}")
        for p, a in per_prompt.items():
            print(f"  {a:4.0%}  {p}")

    os.makedirs(args.out, exist_ok=True)
    headers = [f"{s['label']}\noracle: {sum(v.correct for v in vs)}/{len(vs)} correct"
               for s, vs in zip(chosen.values(), all_verdicts)]
    title = (f"Tiny world, {k} image{'s' if k > 1 else ''} per prompt; image i starts from the same noise "
             f"(seed {args.seed} + i) in every group.")
    png = os.path.join(args.out, "grid.png")
    Image.fromarray(labelled_grid(headers, PROMPTS, all_images, all_verdicts, scale=args.scale,
                                  title=title)).save(png)
    report["seconds"] = round(time.time() - started, 1)
    report["grid"] = ("one row per prompt, same seeds in each group: " + ", then ".join(chosen)
                      + "; frames: green correct, amber right objects but wrong layout, red wrong")
    report["prompts"] = PROMPTS
    path = os.path.join(args.out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nsummary ({len(prompts)} images per setting, {report['seconds']} s):")
    for run in report["runs"].values():
        n = len(run["verdicts"])
        print(f"  {run['label']}: {run['verdicts'].count('correct')}/{n} correct ({run['oracle_accuracy']:.0%}), "
              f"{run['objects_accuracy']:.0%} right objects, tiny-CLIP {run['tiny_clip_score']:.1f}")
    print(f"grid:   {os.path.abspath(png)}\nreport: {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
