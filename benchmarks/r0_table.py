"""R0's Table 1 in miniature, in the tiny world, on the one measurement protocol: `python benchmarks/r0_table.py`.

Trains R0 and R0+ LoRAs on the built-in model with the tiny CLIP reward, on the training captions only, and
measures them on the held-out captions as `r0_core.tiny.protocol` says:
  - selection, on the **validation** half only: when --lr, --reg-weight or --iterations (checkpoints of one run)
    list more than one value, every candidate is trained with seed 0 and measured on the validation captions x
    --val-seeds seeds at 4 steps; the best mean of the two kinds' accuracies is chosen. Nothing is chosen on test;
  - report, on the **test** half x --seeds seeds: the chosen setting trained with --train-seeds seeds (0, 1, ...),
    each row and kind with accuracy, objects right, validity, the tiny-CLIP reward and diversity (mean pairwise
    RMS pixel distance between the images of a caption), each with its 95% interval; trained rows as the mean
    and spread over training seeds, and per seed the paired difference of accuracy to the base model at 4 steps
    with the same CFG and to the base model at 50 steps with CFG 2.
Rows: the base model (R0 sampler at η = 0, the noise of tiny_quality.py) at 50 steps with CFG 2 and at 4 steps
with --guidance (and with --train-guidance when it differs), R0 and R0+ at 4 steps with --train-guidance, and the
base model at 4 steps with test-time R0 (`refine_noise`: the start noise optimised per image, weights untouched).
Resumable: every run, its checkpoint LoRAs and every measured cell are kept under --out; a rerun skips them.
Writes <results>/r0_table.json and .md (with an `nfe_curve` entry per trained row, for benchmarks/nfe_plot.py)
and <out>/base_vs_r0.png. (The shipped LoRA comes from mini_table1.py --ship: the full mix, no CFG.)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os

import numpy as np
import torch
from PIL import Image

import nfe_plot
from r0_core import lora
from r0_core.loading import TINY, TINY_CLIP_DIR, TINY_PIPELINE_DIR, load_pipeline
from r0_core.rewards import load_reward
from r0_core.test_time import refine_noise
from r0_core.tiny import protocol, world
from r0_core.tiny.evaluate import grid
from r0_core.train import R0Config, train_r0
from tiny_quality import FIELDS, GUIDANCE, SEED, Setting, cfg_label, measure, weights_fingerprint

STEPS = 4                 # K, the generator's steps, and the base rows R0 must beat
METRICS = FIELDS + ("reward", "diversity")


def diversity(images: np.ndarray, seeds: int) -> np.ndarray:
    """Per image: its mean RMS pixel distance to the other images of its caption (so a caption's mean is the
    mean pairwise distance); NaN with one seed."""
    if seeds < 2:
        return np.full(len(images), np.nan)
    g = images.reshape(-1, seeds, images[0].size)
    d = np.sqrt(((g[:, :, None] - g[:, None]) ** 2).mean(-1))
    return (d.sum(-1) / (seeds - 1)).ravel()


def scorer_extras(scorer, seeds: int):
    """score(images, prompts) for `measure`: the tiny-CLIP reward and the diversity of every image."""
    def score(images, prompts):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            reward = torch.cat([scorer(x[i:i + 128], prompts[i:i + 128]) for i in range(0, len(x), 128)])
        return {"reward": reward.float().numpy(), "diversity": diversity(images, seeds)}
    return score


def summaries(cell: dict, groups: np.ndarray) -> dict:
    return {m: protocol.summarize(cell[m], groups) for m in METRICS if not np.isnan(cell[m]).any()}


# ----------------------------------------------------------------------------------------------- training

def train(args, scorer, mode: str, lr: float, reg: float, seed: int, checkpoints: list[int]) -> dict[int, str]:
    """The LoRA of one run after each number of iterations in `checkpoints`, training (or resuming) only what is
    not on disk yet; the run continues from one checkpoint to the next, so they cost one run to the last."""
    config = R0Config(prompts=world.training_captions(), batch_size=args.batch_size, lr=lr, lora_rank=args.rank,
                      reg_weight=reg, mode=mode, guidance=args.train_guidance, seed=seed)
    # one folder per run: the settings in its name, the fingerprint of all of them (iterations excepted) and of
    # the weights it trains on and with, so that a rebuilt world never reuses an earlier world's LoRAs
    weights = weights_fingerprint(TINY_PIPELINE_DIR, TINY_CLIP_DIR)[:8]
    folder = os.path.join(args.out, "runs", f"{mode.replace('+', 'plus')}-lr{lr:g}-reg{reg:g}-seed{seed}-"
                                            f"{config.fingerprint()[:8]}-{weights}")
    paths = {}
    for iterations in sorted(checkpoints):
        paths[iterations] = os.path.join(folder, f"lora-{iterations}it.safetensors")
        if os.path.exists(paths[iterations]):
            continue
        state = os.path.join(folder, "trainer_state.pt")
        done = torch.load(state, weights_only=True)["iteration"] if os.path.exists(state) else 0
        if done > iterations:
            raise ValueError(f"{folder} is trained past {iterations} iterations ({done}), so its {iterations}-"
                             f"iteration LoRA cannot be made again; drop {iterations} from --iterations or delete "
                             f"{folder} to retrain")
        print(f"training {mode} lr {lr:g} reg {reg:g} seed {seed} to {iterations} iterations", flush=True)
        train_r0(load_pipeline(TINY), scorer, dataclasses.replace(config, iterations=iterations), folder,
                 lora_path=paths[iterations])
    return paths


def lora_cells(args, pipe, score, path: str, half: str, seeds: int) -> dict:
    """The cells of both kinds of a LoRA at 4 steps with --train-guidance, cached beside it."""
    setting = Setting("r0", STEPS, args.train_guidance)
    cache = os.path.join(os.path.dirname(path), "cells", weights_fingerprint(path, TINY_PIPELINE_DIR, TINY_CLIP_DIR))

    def make(prompts, seed):
        lora.use_loras(pipe, [(lora.load_lora(pipe, path, name="measured"), 1.0)])
        try:
            return setting.sample(pipe, prompts, seed, args.sample_batch)
        finally:
            lora.use_loras(pipe, [])
    return {k: measure(make, k, half, seeds, cache, setting.key, score(seeds)) for k in protocol.KINDS}


def select(args, scorer, pipe, score, mode: str) -> dict:
    """The (lr, reg_weight, iterations) of a mode, chosen on validation captions when there is a choice."""
    candidates = list(itertools.product(args.lr, args.reg_weight))
    if len(candidates) == 1 and len(args.iterations) == 1:
        return {"lr": args.lr[0], "reg_weight": args.reg_weight[0], "iterations": args.iterations[0],
                "validation": "one candidate: nothing to choose"}
    rows = []
    for lr, reg in candidates:
        for iterations, path in train(args, scorer, mode, lr, reg, 0, args.iterations).items():
            cells = lora_cells(args, pipe, score, path, "validation", args.val_seeds)
            accuracy = {k: protocol.summarize(cells[k]["correct"], protocol.cell(k, "validation", args.val_seeds)[1])
                        for k in protocol.KINDS}
            rows.append({"lr": lr, "reg_weight": reg, "iterations": iterations, **accuracy,
                         "score": float(np.mean([a["mean"] for a in accuracy.values()]))})
            print(f"validation {mode} lr {lr:g} reg {reg:g} {iterations} it.: mean accuracy {rows[-1]['score']:.1%}",
                  flush=True)
    best = max(rows, key=lambda r: r["score"])
    return {"lr": best["lr"], "reg_weight": best["reg_weight"], "iterations": best["iterations"], "validation": rows}


# ----------------------------------------------------------------------------------------------- test rows

def base_cells(args, pipe, score, settings: list[Setting]) -> dict[Setting, dict]:
    """The base model's cells on test (by kind) for each setting."""
    cache = os.path.join(args.out, "base", weights_fingerprint(TINY_PIPELINE_DIR, TINY_CLIP_DIR))
    out = {}
    for setting in dict.fromkeys(settings):
        make = lambda prompts, seed: setting.sample(pipe, prompts, seed, args.sample_batch)  # noqa: E731
        out[setting] = {k: measure(make, k, "test", args.seeds, cache, setting.key, score(args.seeds))
                        for k in protocol.KINDS}
        print(f"base, {setting.label}: accuracy " + ", ".join(
            f"{k} {out[setting][k]['correct'].mean():.1%}" for k in protocol.KINDS), flush=True)
    return out


def refined_cells(args, pipe, scorer, score) -> dict:
    """Test-time R0 on the base model: each image's start noise optimised for the tiny-CLIP reward."""
    cache = os.path.join(args.out, "base", weights_fingerprint(TINY_PIPELINE_DIR, TINY_CLIP_DIR))

    def make(prompts, seed):
        out = []
        for start in range(0, len(prompts), args.sample_batch):
            chunk = prompts[start:start + args.sample_batch]
            result = refine_noise(pipe, scorer, chunk, iterations=args.refine_iterations, seed=seed + start,
                                  steps=STEPS, guidance=args.guidance, batch_size=len(chunk))
            out.append(result.images.permute(0, 2, 3, 1).float().numpy())
        return np.concatenate(out)
    key = f"test-time-r0-{args.refine_iterations}it-{STEPS}steps-cfg{args.guidance:g}"
    return {k: measure(make, k, "test", args.seeds, cache, key, score(args.seeds)) for k in protocol.KINDS}


def trained_row(cells_by_seed: dict, base: dict[str, dict], groups: dict) -> dict:
    """A trained row: per seed its summaries and paired differences to the base rows; the mean and spread over
    seeds (none with one seed: a smoke run)."""
    seeds = {s: {k: summaries(c[k], groups[k]) for k in protocol.KINDS} for s, c in cells_by_seed.items()}
    for s, c in cells_by_seed.items():
        seeds[s]["paired"] = {role: {k: protocol.paired(c[k]["correct"], cells[k]["correct"], groups[k])
                                     for k in protocol.KINDS} for role, cells in base.items()}
    spread = None
    if len(seeds) > 1:
        spread = {k: {m: protocol.across_seeds([seeds[s][k][m]["mean"] for s in seeds]) for m in seeds[0][k]}
                  for k in protocol.KINDS}
    return {"seeds": seeds, "across_seeds": spread}


def base_table(args, pipe, scorer, score, groups: dict) -> tuple[dict, dict]:
    """The base rows on test, by name, and the cells each trained seed is paired with: the base at 4 steps with
    the generator's CFG, and at --base-steps with CFG 2."""
    generator, long = Setting("r0", STEPS, args.train_guidance), Setting("r0", args.base_steps, GUIDANCE)
    base = base_cells(args, pipe, score, [long, Setting("r0", STEPS, args.guidance), generator])
    rows = {f"base, {s.label}": {"nfe": s.nfe, **{k: summaries(c[k], groups[k]) for k in protocol.KINDS}}
            for s, c in base.items()}
    if args.refine_iterations:
        cells = refined_cells(args, pipe, scorer, score)
        # NFE: the forward passes of the initial sample and of every optimisation step (each also backpropagates)
        forward = Setting("r0", STEPS, args.guidance).nfe * (args.refine_iterations + 1)
        rows[f"base + test-time R0 ({args.refine_iterations} it.), {STEPS} steps, {cfg_label(args.guidance)}"] = {
            "nfe": forward, "nfe_text": f"{forward} + backward",
            **{k: summaries(cells[k], groups[k]) for k in protocol.KINDS}}
    return rows, {f"base, {generator.label}": base[generator], f"base, {long.label}": base[long]}


def trained_table(args, pipe, scorer, score, groups: dict, paired_with: dict, modes: list[str]) -> dict:
    """Per mode: the setting chosen on validation, the row of its --train-seeds runs on test, their LoRAs and
    their `nfe_curve` series."""
    generator = Setting("r0", STEPS, args.train_guidance)
    out = {"selection": {}, "trained": {}, "loras": {}, "nfe_curve": []}
    for mode in modes:
        chosen = out["selection"][mode] = select(args, scorer, pipe, score, mode)
        loras = out["loras"][mode] = {
            seed: train(args, scorer, mode, chosen["lr"], chosen["reg_weight"], seed, [chosen["iterations"]])[
                chosen["iterations"]] for seed in range(args.train_seeds)}
        cells = {seed: lora_cells(args, pipe, score, path, "test", args.seeds) for seed, path in loras.items()}
        name = (f"{mode.upper()} LoRA (lr {chosen['lr']:g}, reg {chosen['reg_weight']:g}, {chosen['iterations']} "
                f"it.), {STEPS} steps, {cfg_label(args.train_guidance)}")
        row = out["trained"][name] = {"nfe": generator.nfe, "mode": mode, **trained_row(cells, paired_with, groups)}
        label = (f"{mode.upper()} LoRA, {cfg_label(args.train_guidance)} ({args.train_seeds} training "
                 f"seed{'s' if args.train_seeds > 1 else ''})")
        out["nfe_curve"] += [nfe_plot.series(label, kind, [(generator.nfe, nfe_plot.envelope(
            r[kind]["correct"] for r in row["seeds"].values()))]) for kind in protocol.KINDS]
        print(name, "seed 0 accuracy", {k: round(row["seeds"][0][k]["correct"]["mean"], 3) for k in protocol.KINDS},
              flush=True)
    return out


def side_by_side(args, pipe, score, base: dict, r0_lora: str) -> None:
    """<out>/base_vs_r0.png: seed 0 of eight two-object test captions, the base at 4 steps (top) and R0 (bottom),
    from the same noise."""
    trained = lora_cells(args, pipe, score, r0_lora, "test", args.seeds)["pair"]["images"]
    picks = list(range(0, 8 * args.seeds, args.seeds))
    Image.fromarray(grid(np.concatenate([base["pair"]["images"][picks], trained[picks]]) / 255.0, 8, 4)).save(
        os.path.join(args.out, "base_vs_r0.png"))


def fmt_metric(summary: dict, metric: str) -> str:
    if metric in FIELDS:
        return protocol.fmt(summary)
    digits = 3 if metric == "diversity" else 1
    return f"{summary['mean']:.{digits}f} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"


def fmt_spread(spread: dict, metric: str) -> str:
    scale, unit, digits = (100, "%", 1) if metric in FIELDS else (1, "", 3 if metric == "diversity" else 1)
    return (f"{spread['mean'] * scale:.{digits}f}{unit} ± {spread['std'] * scale:.{digits}f} "
            f"({spread['min'] * scale:.{digits}f}–{spread['max'] * scale:.{digits}f})")


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Test half of the held-out captions x {s['seeds']} seeds, 95% intervals from a bootstrap over "
             f"captions; trained rows: mean ± sample std (min–max) over {s['train_seeds']} training seed(s), "
             f"settings chosen on the validation half. The base rows use the R0 sampler at η=0 (DDIM)."]
    for kind, title in (("positioned", "One object with a position"), ("pair", "Two objects with a relation")):
        lines += ["", f"**{title}**", "", "| row | NFE | accuracy | objects right | validity | tiny-CLIP reward "
                  "| diversity |", "|---|---|---|---|---|---|---|"]
        for name, row in report["rows"].items():
            cells = [fmt_metric(row[kind][m], m) if m in row[kind] else "n/a" for m in METRICS]
            lines.append(f"| {name} | {row.get('nfe_text', row['nfe'])} | " + " | ".join(cells) + " |")
        for name, row in report["trained"].items():
            spread = row["across_seeds"]
            if spread is None:  # one training seed: its own intervals, no spread
                first = row["seeds"][0][kind]
                cells = [fmt_metric(first[m], m) + " (1 seed)" if m in first else "n/a" for m in METRICS]
            else:
                cells = [fmt_spread(spread[kind][m], m) if m in spread[kind] else "n/a" for m in METRICS]
            lines.append(f"| {name} | {row['nfe']} | " + " | ".join(cells) + " |")
    against = report["paired_with"]
    heads = [h for title in ("one object", "two objects")
             for h in [f"{title}: accuracy"] + [f"vs {b}" for b in against]]
    lines += ["", "Per training seed, accuracy and its paired difference (points, same captions and noise) to the "
              "base rows:", "", "| row | seed | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for name, row in report["trained"].items():
        for seed, r in row["seeds"].items():
            cells = [x for k in protocol.KINDS for x in
                     [protocol.fmt(r[k]["correct"])] + [protocol.fmt(r["paired"][b][k]) for b in against]]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    for mode, chosen in report["selection"].items():
        if isinstance(chosen["validation"], str):
            lines += ["", f"{mode}: lr {chosen['lr']:g}, reg {chosen['reg_weight']:g}, {chosen['iterations']} it. "
                          f"({chosen['validation']})."]
            continue
        lines += ["", f"{mode} selection on the validation half (x {s['val_seeds']} seeds), chosen: lr "
                      f"{chosen['lr']:g}, reg {chosen['reg_weight']:g}, {chosen['iterations']} it.", "",
                  "| lr | reg | iterations | one object | two objects | mean |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['lr']:g} | {r['reg_weight']:g} | {r['iterations']} | {protocol.fmt(r['positioned'])} | "
                  f"{protocol.fmt(r['pair'])} | {r['score']:.1%} |" for r in chosen["validation"]]
    return "\n".join(lines)


def main(argv=None):
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=protocol.SEEDS, help="noise seeds per test caption")
    parser.add_argument("--val-seeds", type=int, default=4, help="noise seeds per validation caption (selection)")
    parser.add_argument("--train-seeds", type=int, default=2, help="training seeds of every trained row")
    parser.add_argument("--iterations", default="200", help="checkpoints to choose from, e.g. 100,200,400")
    parser.add_argument("--lr", default="1e-3", help="learning rates to choose from, e.g. 3e-4,1e-3")
    parser.add_argument("--reg-weight", default="0.1", help="weights of the pull to the base, to choose from")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG of the base model's 4-step row")
    parser.add_argument("--train-guidance", type=float, default=2.0,
                        help="CFG inside the R0 generator (1: none, one UNet call per step)")
    parser.add_argument("--modes", default="r0,r0+")
    parser.add_argument("--refine-iterations", type=int, default=30, help="test-time R0; 0 leaves the row out")
    parser.add_argument("--base-steps", type=int, default=50, help="steps of the long base row (CFG 2)")
    parser.add_argument("--sample-batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/benchmarks/r0_table", help="runs, LoRAs and cached cells")
    parser.add_argument("--results", default="benchmarks/results", help="where r0_table.json and .md go")
    parser.add_argument("--tag", help="a variant's name: writes r0_table_<tag>.json/.md")
    args = parser.parse_args(argv)
    args.iterations = [int(v) for v in args.iterations.split(",")]
    args.lr, args.reg_weight, modes = floats(args.lr), floats(args.reg_weight), args.modes.split(",")
    torch.set_num_threads(args.threads)
    scorer = load_reward("clip", TINY)
    score = functools.partial(scorer_extras, scorer)
    pipe = load_pipeline(TINY)
    groups = {k: protocol.cell(k, "test", args.seeds)[1] for k in protocol.KINDS}

    rows, paired_with = base_table(args, pipe, scorer, score, groups)
    report = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "results")},
                           "seed": SEED, "steps": STEPS},
              "rows": rows, "paired_with": list(paired_with),
              **trained_table(args, pipe, scorer, score, groups, paired_with, modes)}
    text = markdown(report)
    paths = protocol.write_results("r0_table" + (f"_{args.tag}" if args.tag else ""), report, text, out=args.results)
    print("\n" + text)
    nfe_plot.main(["--results", args.results])
    if "r0" in modes:
        side_by_side(args, pipe, score, next(iter(paired_with.values())), report["loras"]["r0"][0])
    print(f"wrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
