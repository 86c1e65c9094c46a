"""How well the tiny CLIP's reward agrees with the oracle on generated samples:
`python benchmarks/reward_agreement.py`.

Samples the tiny model (50-step DDIM, CFG 2) on held-out captions, scores each image with the tiny CLIP score
and with the oracle (1 if the image shows what its caption asks for, else 0), and prints the Spearman rank
correlation between the two (average ranks for ties), overall and per caption kind.

Then near misses: on rendered images of held-out captions, how often the true caption outscores each caption
one edit away (another colour, shape, position, the opposite relation, the objects swapped).

Then best-of-N, what the Reward Rank / Select node does: for each caption, N images from the 4-step R0 sampler,
the one the tiny CLIP ranks first; its oracle accuracy against a random pick (the mean over the N) and against an
oracle pick (any of the N correct).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import load_reward
from r0_core.tiny import oracle, world
from r0_core.tiny.evaluate import eval_prompts, r0_images, sample_images


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        r[values == v] = r[values == v].mean()
    return r


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(np.asarray(a, float)), ranks(np.asarray(b, float)))[0, 1])


def near_miss_accuracy(scorer, kind: str, n: int) -> dict:
    scenes = world.prompt_split(kind)[1 if kind != "single" else 0]
    wins = {}
    for i in range(n):
        scene = scenes[i % len(scenes)]
        image = torch.from_numpy(world.render(scene, seed=i)).permute(2, 0, 1)[None].float()
        misses = world.near_misses(scene)
        with torch.no_grad():
            r = scorer(image.expand(len(misses) + 1, -1, -1, -1), [world.caption(scene)]
                       + [world.caption(m) for m in misses]).numpy()
        for m, score in zip(misses, r[1:]):
            edit = "relation" if m.relation != scene.relation else "position" if m.position != scene.position \
                else "colour" if [o.colour for o in m.objects] != [o.colour for o in scene.objects] else "shape"
            if scene.relation is not None and m.objects == scene.objects[::-1]:
                edit = "swap"
            wins.setdefault(edit, []).append(float(r[0] > score))
    return {edit: float(np.mean(v)) for edit, v in sorted(wins.items())}


def best_of_n(pipe, scorer, kind: str, captions: int, n: int) -> dict:
    held_out = kind != "single"  # every single-object caption is trained on
    prompts = [p for p in eval_prompts(kind, captions, seed=1, held_out=held_out) for _ in range(n)]
    images = r0_images(pipe, prompts, steps=4, guidance=2.0, seed=1000)
    with torch.no_grad():
        r = scorer(torch.from_numpy(images).permute(0, 3, 1, 2), prompts).numpy().reshape(captions, n)
    c = np.array([oracle.judge(im, p).correct for im, p in zip(images, prompts)], float).reshape(captions, n)
    picked = c[np.arange(captions), r.argmax(1)]
    return {"random_pick": float(c.mean()), "reward_pick": float(picked.mean()), "oracle_pick": float(c.max(1).mean()),
            "captions": captions}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=120, help="samples per caption kind (two kinds)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--captions", type=int, default=40, help="best-of-N: captions per kind")
    parser.add_argument("--best-of", type=int, default=8, help="best-of-N: N")
    parser.add_argument("--out", default="out/benchmarks/reward_agreement.json")
    args = parser.parse_args(argv)
    pipe = load_pipeline(TINY)
    scorer = load_reward("clip", TINY)
    report = {}
    rewards, correct = [], []
    for kind in ("positioned", "pair"):
        prompts = eval_prompts(kind, args.n)
        images = sample_images(pipe, prompts, steps=args.steps, guidance=2.0)
        with torch.no_grad():
            r = scorer(torch.from_numpy(images).permute(0, 3, 1, 2), prompts).numpy()
        c = np.array([oracle.judge(im, p).correct for im, p in zip(images, prompts)], float)
        report[kind] = {"spearman": spearman(r, c), "oracle_accuracy": c.mean(), "mean_reward": float(r.mean())}
        rewards.append(r)
        correct.append(c)
    report["all"] = {"spearman": spearman(np.concatenate(rewards), np.concatenate(correct)),
                     "n": int(sum(len(c) for c in correct))}
    for kind in ("single", "positioned", "pair"):
        report[f"near_miss_{kind}"] = near_miss_accuracy(scorer, kind, args.n)
    for kind in ("single", "positioned", "pair"):
        report[f"best_of_{args.best_of}_{kind}"] = best_of_n(pipe, scorer, kind, args.captions, args.best_of)
    for kind, row in report.items():
        print(f"{kind:10s} " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
