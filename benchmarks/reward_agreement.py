"""How well each tiny reward agrees with the oracle: `python benchmarks/reward_agreement.py`.

The rewards: the tiny CLIP score and the tiny HPS, ImageReward and aesthetic models (r0_core.tiny.reward_stack).
They are measured on the base model's own samples (4-step R0 sampler, CFG 2 and no CFG) of the test half of the
held-out captions (r0_core.tiny.protocol), each caption drawn with --seeds noise seeds:
  - Spearman rank correlation of the score with the oracle's `correct` and with its `valid` (ties share their
    average rank), over all images of a cell, with a 95% interval from a bootstrap over captions;
  - best-of-8, what the Reward Rank / Select node does: the oracle accuracy of the image the reward ranks first
    among a caption's first 8, against a random pick (the mean of the 8) and an oracle pick (any of the 8
    correct), and the paired gain over the random pick;
  - near misses: on ground-truth images of the same captions, how often the true caption outscores a caption
    one edit away (another colour, shape, position, the opposite relation, the objects swapped); n/a for the
    aesthetic head, which ignores the prompt.
Intervals are 95% bootstrap intervals over captions (protocol.summarize, protocol.paired). Writes
<out>/reward_quality.json and .md.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from r0_core.loading import TINY, TINY_CLIP_DIR, load_pipeline
from r0_core.rewards import load_reward, score_in_batches
from r0_core.tiny import oracle, protocol, world
from r0_core.tiny.evaluate import r0_images
from r0_core.tiny.reward_stack import AESTHETIC_FILE, FOLDERS, HPS_FILE, IMAGE_REWARD_FILE

REWARDS = ("clip", "hpsv2", "image_reward", "aesthetic")
FILES = {"hpsv2": HPS_FILE, "image_reward": IMAGE_REWARD_FILE, "aesthetic": AESTHETIC_FILE}
PROMPT_FREE = ("aesthetic",)  # scores that ignore the prompt: no near-miss test


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        r[values == v] = r[values == v].mean()
    return r


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")  # a constant has no ranking
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def spearman_summary(scores, labels, groups, seed: int = 0) -> dict:
    """Spearman over all images, with its 95% interval from resampling captions (protocol.resample_captions)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    low, high = protocol.resample_captions(lambda idx: spearman(scores[idx], labels[idx]), groups, seed)
    return {"mean": spearman(scores, labels), "low": low, "high": high, "images": len(scores),
            "captions": len(np.unique(groups))}


def fmt_rho(summary: dict) -> str:
    if np.isnan(summary["mean"]):
        return "n/a (one label)"  # every image judged alike: no ranking to agree with
    return f"{summary['mean']:+.2f} [{summary['low']:+.2f}, {summary['high']:+.2f}]"


def load_rewards(names, stack, clip) -> dict:
    """The scorers: the shipped tiny models, or those of a reward stack folder (`--stack`) on `clip`."""
    out = {}
    for name in names:
        if name == "clip":
            out[name] = load_reward("clip", clip, device="cpu", dtype=torch.float32)
        elif stack is None:
            out[name] = load_reward(name, TINY, device="cpu", dtype=torch.float32)
        else:
            path = os.path.join(stack, FOLDERS[name], FILES[name])
            support = (TINY_CLIP_DIR if clip == TINY else clip) if name == "aesthetic" else None
            out[name] = load_reward(name, path, support, device="cpu", dtype=torch.float32)
    return out


def best_of(scores: np.ndarray, correct: np.ndarray, n: int) -> dict:
    """Pick accuracy among each caption's first n images (scores and verdicts as [captions, seeds])."""
    s, c = scores[:, :n], correct[:, :n].astype(float)
    picked, random_pick, oracle_pick = c[np.arange(len(c)), s.argmax(1)], c.mean(1), c.max(1)
    groups = np.arange(len(c))
    return {"n": n, "reward_pick": protocol.summarize(picked, groups), "random_pick": protocol.summarize(random_pick,
                                                                                                         groups),
            "oracle_pick": protocol.summarize(oracle_pick, groups),
            "gain_over_random": protocol.paired(picked, random_pick, groups)}


def edit_of(scene: world.Scene, miss: world.Scene) -> str:
    if scene.relation is not None and miss.objects == scene.objects[::-1]:
        return "swap"
    if miss.relation != scene.relation:
        return "relation"
    if miss.position != scene.position:
        return "position"
    return "colour" if [o.colour for o in miss.objects] != [o.colour for o in scene.objects] else "shape"


def near_misses(scorer, texts: list[str], seeds: int) -> dict:
    """Per ground-truth image (seeds renders of each caption), the share of near-miss captions it scores below
    its own caption; summarised over captions, and per kind of edit."""
    shares, groups, by_edit = [], [], {}
    for g, text in enumerate(texts):
        scene = world.parse_caption(text)
        misses = world.near_misses(scene)
        candidates = [text] + [world.caption(m) for m in misses]
        for seed in range(seeds):
            image = torch.from_numpy(world.render(scene, seed=10_000 * g + seed)).permute(2, 0, 1)[None]
            r = score_in_batches(scorer, image.expand(len(candidates), -1, -1, -1), candidates, batch_size=64)
            wins = (r[0] > r[1:]).float().numpy()
            shares.append(wins.mean())
            groups.append(g)
            for m, w in zip(misses, wins):
                by_edit.setdefault(edit_of(scene, m), []).append(float(w))
    return {"true_beats_near_miss": protocol.summarize(shares, groups),
            "by_edit": {edit: float(np.mean(w)) for edit, w in sorted(by_edit.items())}}


def measure_cell(pipe, scorers, kind, half, seeds, guidance, steps, n_best, max_captions) -> dict:
    prompts, groups = protocol.cell(kind, half, seeds)
    if max_captions:
        keep = groups < max_captions
        prompts, groups = [p for p, k in zip(prompts, keep) if k], groups[keep]
    images = r0_images(pipe, prompts, steps=steps, guidance=guidance, seed=0)
    verdicts = [oracle.judge(im, p) for im, p in zip(images, prompts)]
    correct = np.array([v.correct for v in verdicts], float)
    valid = np.array([v.valid for v in verdicts], float)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    cell = {"oracle": {"correct": protocol.summarize(correct, groups), "valid": protocol.summarize(valid, groups)},
            "rewards": {}}
    for name, scorer in scorers.items():
        scores = score_in_batches(scorer, x, prompts, batch_size=64).numpy()
        cell["rewards"][name] = {
            "spearman_correct": spearman_summary(scores, correct, groups),
            "spearman_valid": spearman_summary(scores, valid, groups),
            "best_of": best_of(scores.reshape(-1, seeds), correct.reshape(-1, seeds), n_best)}
    return cell


def markdown(results: dict) -> str:
    n = results["settings"]["best_of"]
    lines = [f"Base model samples ({results['settings']['steps']}-step R0 sampler) of the {results['settings']['half']}"
             f" half of the held-out captions, {results['settings']['seeds']} seeds per caption; 95% bootstrap "
             f"intervals over captions.", "",
             f"| cell | reward | Spearman vs correct | Spearman vs valid | best-of-{n} pick | random pick | oracle "
             f"pick | gain over random |", "|---|---|---|---|---|---|---|---|"]
    for key, cell in results["cells"].items():
        for name, r in cell["rewards"].items():
            b = r["best_of"]
            lines.append(f"| {key} | {name} | {fmt_rho(r['spearman_correct'])} | {fmt_rho(r['spearman_valid'])} | "
                         f"{protocol.fmt(b['reward_pick'])} | {protocol.fmt(b['random_pick'])} | "
                         f"{protocol.fmt(b['oracle_pick'])} | {protocol.fmt(b['gain_over_random'])} |")
    kinds = list(results["near_miss"])
    lines += ["", "Ground-truth images of the same captions: how often the true caption outscores a near miss.", "",
              "| reward | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name in results["settings"]["rewards"]:
        row = [protocol.fmt(results["near_miss"][k][name]["true_beats_near_miss"])
               if name in results["near_miss"][k] else "n/a" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY, help="the base pipeline whose samples are scored")
    parser.add_argument("--rewards", nargs="+", choices=REWARDS, default=list(REWARDS))
    parser.add_argument("--stack", help="a folder with tiny-hps/, tiny-image-reward/, tiny-aesthetic/ (default: the "
                                        "shipped ones, load_reward(family, 'tiny'))")
    parser.add_argument("--clip", default=TINY, help="the CLIP reward, and the aesthetic head's CLIP with --stack")
    parser.add_argument("--kinds", nargs="+", choices=protocol.KINDS, default=list(protocol.KINDS))
    parser.add_argument("--half", choices=protocol.HALVES, default="test",
                        help="report on test; choose settings on validation")
    parser.add_argument("--seeds", type=int, default=protocol.SEEDS, help="noise seeds per caption (at least 8 for "
                                                                          "reported cells)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--best-of", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="3 captions per kind and 4 seeds: checks the script runs")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds, max_captions = (4, 3) if args.smoke else (args.seeds, 0)
    n_best = min(args.best_of, seeds)
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
    scorers = load_rewards(args.rewards, args.stack, args.clip)
    results = {"settings": {"model": args.model, "stack": args.stack or "shipped", "rewards": args.rewards,
                            "kinds": args.kinds, "half": args.half, "seeds": seeds, "guidance": args.guidance,
                            "steps": args.steps, "best_of": n_best, "smoke": args.smoke},
               "cells": {}, "near_miss": {}}
    for kind in args.kinds:
        for guidance in args.guidance:
            results["cells"][f"{kind}, CFG {guidance:g}"] = measure_cell(
                pipe, scorers, kind, args.half, seeds, guidance, args.steps, n_best, max_captions)
        texts = protocol.captions(kind, args.half)[:max_captions or None]
        results["near_miss"][kind] = {name: near_misses(scorer, texts, seeds) for name, scorer in scorers.items()
                                      if name not in PROMPT_FREE}
    text = markdown(results)
    print(text)
    protocol.write_results("reward_quality", results, text, out=args.out)


if __name__ == "__main__":
    main()
