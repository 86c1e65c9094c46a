"""Quality of the built-in tiny world's base model, measured by its oracle on the one protocol:
`python benchmarks/tiny_quality.py` (`--smoke` for a quick look).

On the **test** half of the held-out captions of both kinds (`r0_core.tiny.protocol`: `positioned`, one object
with a position; `pair`, two objects with a relation), every caption x --seeds seeds (image i of a cell from noise
seed SEED + i, so all settings see the same noise), it measures:
  - the base model with the R0 sampler at η = 0 (x_next = x̂0 + σ_next ε̂: DDIM's deterministic update) at 1, 2,
    4, 8, 16 and 50 steps, with CFG 2 (2 UNet evaluations, NFE, per step) and without (guidance 1, 1 NFE a step);
  - diffusers' own DDIM pipeline at 50 steps with CFG 2, the reference row the README quotes;
  - per cell: accuracy (everything right), objects right (any layout) and validity, each with its 95% interval;
    paired differences: every other setting against the longest with CFG, CFG against none, and the R0 sampler
    at η = 0 against diffusers' DDIM at the same steps (equal up to rounding: at 50 steps the images differ by
    at most 0.002);
  - ceilings: the oracle on the cells' ground truth, on that ground truth through the VAE, and on pure noise;
  - the tiny reward CLIP's zero-shot accuracy: how often it ranks an image's own caption first among all
    captions of its kind (ground-truth images of the test captions; single objects: every caption).
Writes <results>/tiny_quality.json and .md (with an `nfe_curve` for benchmarks/nfe_plot.py), the sample grid
<results>/tiny_quality_samples.png and <results>/nfe.png. Resumable: each cell's verdicts and images are cached
under --cache, keyed by the model's weights and the oracle's code, so a rerun measures only what is missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import os
import time
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

import nfe_plot
from r0_core.loading import TINY, TINY_PIPELINE_DIR, load_pipeline
from r0_core.rewards import load_reward
from r0_core.tiny import oracle, protocol, world
from r0_core.tiny.evaluate import grid, r0_images, sample_images

SEED = 1000                                  # noise seed of image 0 of every cell (mini_table1.py uses it too)
FIELDS = ("correct", "objects_correct", "valid")
STEPS = (1, 2, 4, 8, 16, 50)
GUIDANCE = 2.0


def nfe(steps: int, guidance: float) -> int:
    """UNet evaluations per image: CFG runs the conditional and the unconditional branch at every step."""
    return steps * (1 if guidance == 1 else 2)


def cfg_label(guidance: float) -> str:
    return f"CFG {guidance:g}" if guidance != 1 else "no CFG"


@dataclasses.dataclass(frozen=True)
class Setting:
    sampler: str       # "r0": the R0 sampler at η = 0; "ddim": diffusers' DDIM pipeline
    steps: int
    guidance: float

    @property
    def nfe(self) -> int:
        return nfe(self.steps, self.guidance)

    @property
    def key(self) -> str:
        return f"{self.sampler}-{self.steps}steps-cfg{self.guidance:g}"

    @property
    def label(self) -> str:
        sampler, cfg = self.family.split(", ")
        return f"{sampler}, {self.steps} step{'s' if self.steps > 1 else ''}, {cfg}"

    @property
    def family(self) -> str:
        """The setting without its step count: one line of the NFE picture."""
        sampler = "R0 sampler η=0" if self.sampler == "r0" else "diffusers DDIM pipeline"
        return f"{sampler}, {cfg_label(self.guidance)}"

    def sample(self, pipe, prompts: list[str], seed: int, batch_size: int) -> np.ndarray:
        run = r0_images if self.sampler == "r0" else sample_images
        return run(pipe, prompts, steps=self.steps, guidance=self.guidance, seed=seed, batch_size=batch_size,
                   progress=False)


def weights_fingerprint(*paths: str) -> str:
    """A short hash of the files under `paths` (folders or files) and of the oracle's and the world's code: a
    cache made with other weights, another judge or other captions is not reused."""
    paths += (oracle.__file__, world.__file__)
    h = hashlib.sha256()
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
        for name in files:
            if os.path.isfile(name):
                h.update(os.path.basename(name).encode())
                with open(name, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]


def measure(make: Callable[[list[str], int], np.ndarray], kind: str, half: str, seeds: int, cache: str, key: str,
            score: Optional[Callable[[np.ndarray, list[str]], dict]] = None) -> dict:
    """Per-image verdicts (FIELDS), the images (uint8) and the seconds spent of one cell, from the cache or from
    make(prompts, seed) -> images [N, H, W, 3] in [0, 1]; score(images, prompts) adds per-image arrays."""
    path = os.path.join(cache, f"{key}-{kind}-{half}-{seeds}x-seed{SEED}.npz")
    if os.path.exists(path):
        with np.load(path) as saved:
            return dict(saved)
    prompts, _ = protocol.cell(kind, half, seeds)
    started = time.time()
    images = make(prompts, SEED)
    sampled = time.time()
    verdicts = [oracle.judge(im, p) for im, p in zip(images, prompts)]
    out = {f: np.array([getattr(v, f) for v in verdicts]) for f in FIELDS}
    out.update(score(images, prompts) if score else {})
    out.update(images=np.clip(images * 255 + 0.5, 0, 255).astype(np.uint8),
               sample_seconds=np.float64(sampled - started), judge_seconds=np.float64(time.time() - sampled))
    os.makedirs(cache, exist_ok=True)
    np.savez(path + ".tmp.npz", **out)
    os.replace(path + ".tmp.npz", path)
    return out


def summaries(cell: dict, groups: np.ndarray, fields=FIELDS) -> dict:
    return {f: protocol.summarize(cell[f], groups) for f in fields}


# ------------------------------------------------------------------------------------------ ceilings and CLIP

def ground_truth(kind: str, seeds: int) -> tuple[np.ndarray, list[str]]:
    """The world's own renders of a test cell's captions (image i rendered with seed SEED + i)."""
    prompts, _ = protocol.cell(kind, "test", seeds)
    return np.stack([world.render(world.parse_caption(p), SEED + i) for i, p in enumerate(prompts)]), prompts


def ceilings(pipe, seeds: int) -> dict:
    """Oracle accuracy on ground truth, on ground truth after a VAE encode/decode round trip, and on noise."""
    out = {}
    for kind in protocol.KINDS:
        images, prompts = ground_truth(kind, seeds)
        groups = protocol.cell(kind, "test", seeds)[1]
        x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            y = torch.cat([pipe.vae.decode(pipe.vae.encode(b).latent_dist.mean).sample for b in x.split(128)])
        trip = ((y.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        noise = np.random.default_rng(0).random(images.shape)
        out[kind] = {name: protocol.summarize([oracle.judge(im, p).correct for im, p in zip(ims, prompts)], groups)
                     for name, ims in (("ground_truth", images), ("vae_round_trip", trip), ("noise", noise))}
    return out


def clip_zero_shot(seeds: int) -> dict:
    """How often the tiny reward CLIP ranks an image's own caption first among all captions of its kind."""
    scorer = load_reward("clip", TINY)
    out = {}
    for kind in ("single",) + protocol.KINDS:
        candidates = [world.caption(s) for s in world.all_scenes()[kind]]
        if kind == "single":  # never held out: every caption, rendered as a cell would be
            prompts = [c for c in candidates for _ in range(seeds)]
            images = np.stack([world.render(world.parse_caption(p), SEED + i) for i, p in enumerate(prompts)])
            groups = np.repeat(np.arange(len(candidates)), seeds)
        else:
            (images, prompts), groups = ground_truth(kind, seeds), protocol.cell(kind, "test", seeds)[1]
        with torch.no_grad():
            texts = scorer.text_embeds(candidates)
            best = torch.cat([(scorer.image_embeds(b) @ texts.T).argmax(1)
                              for b in torch.from_numpy(images).permute(0, 3, 1, 2).split(128)])
        hits = [candidates[i] == p for i, p in zip(best.tolist(), prompts)]
        out[kind] = {**protocol.summarize(hits, groups), "candidates": len(candidates)}
    return out


# ----------------------------------------------------------------------------------------------- the report

def comparisons(settings: list[Setting]) -> list[tuple[Setting, Setting]]:
    """(a, b) pairs whose paired difference a - b is reported."""
    present = set(settings)
    longest = Setting("r0", max(s.steps for s in settings if s.sampler == "r0"), GUIDANCE)
    out = [(s, longest) for s in settings if s.sampler == "r0" and s != longest]  # what few steps lose
    out += [(s, Setting("r0", s.steps, 1.0)) for s in settings if s.sampler == "r0" and s.guidance == GUIDANCE]
    out += [(Setting("r0", s.steps, s.guidance), s) for s in settings if s.sampler == "ddim"]
    kept = []
    for a, b in out:  # each pair once, in its first direction
        if a in present and b in present and (b, a) not in kept:
            kept.append((a, b))
    return kept


def base_curve(report: dict, settings: list[Setting]) -> list[dict]:
    """The base model's `nfe_curve` series: one per kind and sampler family (with CFG, without, the reference)."""
    families = dict.fromkeys(s.family for s in settings)
    return [nfe_plot.series(f"base, {family}", kind, [(s.nfe, report["cells"][s.key][kind]["correct"])
                                                      for s in settings if s.family == family])
            for kind in protocol.KINDS for family in families]


def time_fit(cells: dict) -> tuple[float, float, float]:
    """Seconds per image-NFE and per image (text encoding, decoding) of sampling, and per image of judging,
    fitted to the cells measured (whatever run measured them)."""
    rows = [(len(c["correct"]) * s.nfe, len(c["correct"]), float(c["sample_seconds"]), float(c["judge_seconds"]))
            for (s, _), c in cells.items()]
    a = np.array([[r[0], r[1]] for r in rows], dtype=float)
    seconds = np.array([r[2] for r in rows])
    if len({r[0] / r[1] for r in rows}) > 1:
        per_nfe, per_image = np.clip(np.linalg.lstsq(a, seconds, rcond=None)[0], 0, None)
    else:
        per_nfe, per_image = seconds.sum() / a[:, 0].sum(), 0.0
    return float(per_nfe), float(per_image), sum(r[3] for r in rows) / sum(r[1] for r in rows)


def full_run_seconds(per_nfe: float, per_image: float, judge: float) -> float:
    """The default run (SEEDS seeds, every step count with and without CFG, the DDIM reference), one thread."""
    images = sum(len(protocol.captions(k, "test")) for k in protocol.KINDS) * protocol.SEEDS
    total_nfe = sum(nfe(s, g) for s in STEPS for g in (GUIDANCE, 1.0)) + nfe(50, GUIDANCE)
    return images * (total_nfe * per_nfe + (2 * len(STEPS) + 1) * (per_image + judge))


def markdown(report: dict) -> str:
    lines = ["Base model, test half of the held-out captions, every caption x "
             f"{report['settings']['seeds']} seeds; 95% intervals from a bootstrap over captions. "
             "The R0 sampler at η=0 is DDIM's deterministic update.", "",
             "| setting | NFE | one object + position: accuracy | objects | valid "
             "| two objects + relation: accuracy | objects | valid |", "|---|---|---|---|---|---|---|---|"]
    for row in report["cells"].values():
        cells = [protocol.fmt(row[k][f]) for k in protocol.KINDS for f in FIELDS]
        lines.append(f"| {row['label']} | {row['nfe']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences of accuracy (points, a - b, same captions and noise):", "",
              "| a | b | one object + position | two objects + relation |", "|---|---|---|---|"]
    for p in report["paired"]:
        lines.append(f"| {p['a']} | {p['b']} | {protocol.fmt(p['positioned'])} | {protocol.fmt(p['pair'])} |")
    c = report["ceilings"]
    lines += ["", "Ceilings (accuracy): " + "; ".join(
        f"{k}: ground truth {protocol.fmt(c[k]['ground_truth'])}, through the VAE "
        f"{protocol.fmt(c[k]['vae_round_trip'])}, noise {protocol.fmt(c[k]['noise'])}" for k in protocol.KINDS) + ".",
              "", "Tiny reward CLIP, own caption ranked first among all of its kind: " + "; ".join(
        f"{k} {protocol.fmt(v)} of {v['candidates']}" for k, v in report["clip_zero_shot"].items()) + ".",
              "", f"Sample grid (`tiny_quality_samples.png`): columns are {report['grid']['columns']}; rows are "
                  f"ground truth, then " + ", ".join(report["grid"]["rows"]) + ".",
              "", f"Time: {report['time']['seconds']:.0f} s for this run; the full run (8 seeds, all cells) is "
                  f"estimated at {report['time']['full_run_estimate_seconds'] / 60:.0f} min on "
                  f"{report['settings']['threads']} thread(s), from the fitted sampling and judging rates."]
    return "\n".join(lines)


def sample_grid(cells: dict, settings: list[Setting], seeds: int, path: str) -> dict:
    """Seed 0 of the first four test captions of each kind: ground truth on top, then one row per setting."""
    columns = {k: list(range(0, 4 * seeds, seeds)) for k in protocol.KINDS}
    rows = [np.concatenate([ground_truth(k, seeds)[0][columns[k]] for k in protocol.KINDS])]
    rows += [np.concatenate([cells[s, k]["images"][columns[k]] / 255.0 for k in protocol.KINDS]) for s in settings]
    Image.fromarray(grid(np.concatenate(rows), columns=8, scale=2)).save(path)
    names = [protocol.captions(k, "test")[i] for k in protocol.KINDS for i in range(4)]
    return {"columns": names, "rows": [s.label for s in settings]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--seeds", type=int, default=protocol.SEEDS, help="noise seeds per test caption")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="step counts of the R0 sampler")
    parser.add_argument("--reference-steps", type=int, default=50, help="steps of the diffusers DDIM reference")
    parser.add_argument("--smoke", action="store_true", help="a quick look: --seeds 1 --steps 1,4 --reference-steps 4")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default="benchmarks/results", help="where the json, md and PNGs go")
    parser.add_argument("--cache", default="out/benchmarks/tiny_quality", help="per-cell verdicts and images")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.reference_steps = 1, "1,4", 4
    torch.set_num_threads(args.threads)
    started = time.time()
    pipe = load_pipeline(args.model)
    cache = os.path.join(args.cache, weights_fingerprint(TINY_PIPELINE_DIR if args.model == TINY else args.model))
    steps = sorted({int(s) for s in args.steps.split(",")})
    settings = [Setting("r0", s, g) for s in steps for g in (GUIDANCE, 1.0)]
    settings.append(Setting("ddim", args.reference_steps, GUIDANCE))

    cells = {}
    for setting in settings:
        for kind in protocol.KINDS:
            make = lambda prompts, seed: setting.sample(pipe, prompts, seed, args.batch_size)  # noqa: E731
            cells[setting, kind] = measure(make, kind, "test", args.seeds, cache, setting.key)
            print(f"{setting.label:45s} {kind:10s} accuracy {cells[setting, kind]['correct'].mean():6.1%}",
                  flush=True)
    groups = {k: protocol.cell(k, "test", args.seeds)[1] for k in protocol.KINDS}
    report = {"settings": {"model": args.model, "seeds": args.seeds, "seed": SEED, "eta": 0.0,
                           "guidance": GUIDANCE, "threads": args.threads, "half": "test"},
              "cells": {s.key: {"label": s.label, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                                "nfe": s.nfe, **{k: summaries(cells[s, k], groups[k]) for k in protocol.KINDS}}
                        for s in settings},
              "paired": [{"a": a.label, "b": b.label, **{k: protocol.paired(cells[a, k]["correct"],
                                                                            cells[b, k]["correct"], groups[k])
                                                         for k in protocol.KINDS}}
                         for a, b in comparisons(settings)],
              "ceilings": ceilings(pipe, args.seeds), "clip_zero_shot": clip_zero_shot(args.seeds)}
    report["nfe_curve"] = base_curve(report, settings)
    os.makedirs(args.results, exist_ok=True)
    report["grid"] = sample_grid(cells, settings, args.seeds, os.path.join(args.results, "tiny_quality_samples.png"))
    per_nfe, per_image, judge = time_fit(cells)
    report["time"] = {"seconds": time.time() - started, "sample_seconds_per_image_nfe": per_nfe,
                      "sample_seconds_per_image": per_image, "judge_seconds_per_image": judge,
                      "full_run_estimate_seconds": full_run_seconds(per_nfe, per_image, judge)}
    text = markdown(report)
    paths = protocol.write_results("tiny_quality", report, text, out=args.results)
    print("\n" + text)
    nfe_plot.main(["--results", args.results])
    print(f"wrote {', '.join(paths)}, tiny_quality_samples.png and nfe.png in {args.results}")


if __name__ == "__main__":
    main()
