"""R0's Table 1 in miniature, in the tiny world: `python benchmarks/r0_table.py`.

Trains R0 and R0+ LoRAs on the built-in model with the tiny CLIP reward, on training captions only (resumable:
rerun the same command after a stop), then measures on held-out captions, for each row:
  - oracle accuracy on one-object captions with a position, and on two-object captions with a relation;
  - the tiny CLIP reward (mean);
  - diversity: mean pairwise RMS pixel distance between the images of one caption (different seeds);
  - validity: the oracle's clean-shapes-on-a-clean-background rate.
Rows: the base model with CFG at 50 steps, the base model at 4 steps, R0 and R0+ at 4 steps, and the base model
at 4 steps with test-time R0 (the start noise optimised per image, weights untouched).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch

from r0_core import lora
from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import load_reward
from r0_core.test_time import refine_noise
from r0_core.tiny import oracle, world
from r0_core.tiny.evaluate import eval_prompts, grid, r0_images, sample_images
from r0_core.train import R0Config, train_r0


def diversity(images: np.ndarray, per_caption: int) -> float:
    groups = images.reshape(-1, per_caption, *images.shape[1:])
    d = [np.sqrt(((g[i] - g[j]) ** 2).mean()) for g in groups for i, j in itertools.combinations(range(len(g)), 2)]
    return float(np.mean(d))


def measure(images: np.ndarray, prompts: list[str], scorer, per_caption: int) -> dict:
    verdicts = [oracle.judge(im, p) for im, p in zip(images, prompts)]
    with torch.no_grad():
        reward = scorer(torch.from_numpy(images).permute(0, 3, 1, 2).float(), prompts)
    return {"accuracy": float(np.mean([v.correct for v in verdicts])),
            "valid": float(np.mean([v.valid for v in verdicts])),
            "reward": float(reward.mean()), "diversity": diversity(images, per_caption)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=40, help="held-out captions per kind")
    parser.add_argument("--seeds", type=int, default=4, help="images per caption")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reg-weight", type=float, default=0.1)
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG of the base model's 4-step rows")
    parser.add_argument("--train-guidance", type=float, default=2.0,
                        help="CFG inside the R0 generator (1: none, one UNet call per step)")
    parser.add_argument("--refine-iterations", type=int, default=30)
    parser.add_argument("--out", default="out/benchmarks/r0_table")
    parser.add_argument("--reuse", help="a table.json of an earlier run: its rows that do not depend on the "
                                        "training settings are taken as they are when captions, seeds and CFG match")
    parser.add_argument("--trained-only", action="store_true", help="measure only the R0 and R0+ rows")
    parser.add_argument("--ship", action="store_true", help="copy the R0 LoRA into the shipped tiny weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    scorer = load_reward("clip", TINY)

    loras, times = {}, {}
    for mode in ("r0", "r0+"):
        config = R0Config(prompts=world.training_captions(), iterations=args.iterations, batch_size=args.batch_size,
                          lr=args.lr, lora_rank=args.rank, reg_weight=args.reg_weight, mode=mode,
                          guidance=args.train_guidance, seed=0)
        started = time.time()
        result = train_r0(load_pipeline(TINY), scorer, config, os.path.join(args.out, mode.replace("+", "plus")))
        loras[mode], times[mode] = result.lora_path, time.time() - started

    kinds = ("positioned", "pair")
    prompts = {k: [p for p in eval_prompts(k, args.captions) for _ in range(args.seeds)] for k in kinds}
    seeds = {k: [1000 + i for i in range(len(prompts[k]))] for k in kinds}
    pipe = load_pipeline(TINY)
    rows, earlier = {}, {}
    if args.reuse:
        with open(args.reuse) as f:
            old = json.load(f)
        same = all(old["settings"][k] == getattr(args, k) for k in ("captions", "seeds", "guidance",
                                                                      "refine_iterations"))
        earlier = old["rows"] if same else {}

    def row(name, make):
        if args.trained_only and not name.startswith("R0"):
            return
        if name in earlier and not name.startswith(("R0", "base, 4 steps, generator")):
            rows[name] = earlier[name]
            print(name, "(reused)", json.dumps(rows[name]), flush=True)
            return
        started = time.time()
        rows[name] = {k: measure(make(k), prompts[k], scorer, args.seeds) for k in kinds}
        rows[name]["seconds"] = time.time() - started
        print(name, json.dumps(rows[name]), flush=True)

    row("base + CFG, 50 steps", lambda k: sample_images(pipe, prompts[k], steps=50, guidance=2.0, seed=1000))
    row("base + CFG, 4 steps", lambda k: r0_images(pipe, prompts[k], steps=4, guidance=args.guidance, seed=1000))
    if args.train_guidance != args.guidance:
        row("base, 4 steps, generator's CFG", lambda k: r0_images(pipe, prompts[k], steps=4,
                                                                 guidance=args.train_guidance, seed=1000))
    for mode in ("r0", "r0+"):
        name = lora.load_lora(pipe, loras[mode], name=mode.replace("+", "plus"))
        lora.use_loras(pipe, [(name, 1.0)])
        row(f"{mode.upper()}, 4 steps", lambda k: r0_images(pipe, prompts[k], steps=4,
                                                             guidance=args.train_guidance, seed=1000))
        lora.use_loras(pipe, [])

    def refined(kind):
        out = []
        for start in range(0, len(prompts[kind]), args.seeds):
            result = refine_noise(pipe, scorer, prompts[kind][start], iterations=args.refine_iterations,
                                  seed=seeds[kind][start], steps=4, guidance=args.guidance,
                                  batch_size=args.seeds)
            out.append(result.images.permute(0, 2, 3, 1).float().numpy())
        return np.concatenate(out)
    row("base + test-time R0, 4 steps", refined)

    report = {"rows": rows, "train_seconds": times, "settings": vars(args)}
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n| setting | one-object acc. | two-object acc. | tiny-CLIP reward | diversity | validity |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        p, q = r["positioned"], r["pair"]
        print(f"| {name} | {p['accuracy']:.1%} | {q['accuracy']:.1%} | {(p['reward'] + q['reward']) / 2:.2f} | "
              f"{(p['diversity'] + q['diversity']) / 2:.3f} | {(p['valid'] + q['valid']) / 2:.1%} |")
    # side by side from the same noise: base (top) and R0 (bottom), for the README and a person's eye
    sample = prompts["pair"][::args.seeds][:8]
    base_images = r0_images(pipe, sample, steps=4, guidance=args.train_guidance, seed=7, progress=False)
    lora.use_loras(pipe, [("r0", 1.0)])
    r0_out = r0_images(pipe, sample, steps=4, guidance=args.train_guidance, seed=7, progress=False)
    lora.use_loras(pipe, [])
    from PIL import Image
    Image.fromarray(grid(np.concatenate([base_images, r0_out]), len(sample), 4)).save(
        os.path.join(args.out, "base_vs_r0.png"))
    if args.ship:
        import shutil
        shutil.copy(loras["r0"], os.path.join(os.path.dirname(world.__file__), "weights", "tiny-r0-lora.safetensors"))


if __name__ == "__main__":
    main()
