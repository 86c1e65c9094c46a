"""How well the tiny CLIP's reward agrees with the oracle on generated samples:
`python benchmarks/reward_agreement.py`.

Samples the tiny model (50-step DDIM, CFG 2) on held-out captions, scores each image with the tiny CLIP score
and with the oracle (1 if the image shows what its caption asks for, else 0), and prints the Spearman rank
correlation between the two (average ranks for ties), overall and per caption kind.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from r0_core.loading import TINY, TINY_CLIP_DIR, load_pipeline
from r0_core.rewards import ClipScore, cached
from r0_core.tiny import oracle
from r0_core.tiny.evaluate import eval_prompts, sample_images


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=120, help="samples per caption kind (two kinds)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="out/benchmarks/reward_agreement.json")
    args = parser.parse_args(argv)
    pipe = load_pipeline(TINY)
    scorer = cached(ClipScore, TINY_CLIP_DIR)
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
    for kind, row in report.items():
        print(f"{kind:10s} " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
