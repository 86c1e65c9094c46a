"""R0's Table 1 in miniature, with R0's whole recipe and a distillation baseline: `python benchmarks/mini_table1.py`.

Every row is one recipe, run in its own resumable process (`--row NAME`), its LoRAs and measured cells kept
under --out/<row>, and its per-image outcomes and training seconds also in benchmarks/results/mini_table1_runs/
<row>.json (benchmarks/kept.py: commit it; a rerun with the same settings reads it instead of recomputing);
`--report` (or no --row) runs whatever rows are missing, then writes benchmarks/results/mini_table1.json and .md
(r0_core.tiny.protocol.write_results).

Rows (4 sampler steps unless named; the generator runs without CFG, one UNet call a step):
  base-50-cfg, base-4-cfg, base-4   the base model (R0 sampler at η = 0 = DDIM), 50 steps CFG 2, 4 steps with
                                    and without CFG 2;
  lcm                               an LCM-LoRA (r0_core.lcm), distilled from the base with CFG on the world's own
                                    renders of the training captions, for the wall-clock time of r0-mix's
                                    training; sampled as LCM is (η = 1, no CFG);
  r0-clip, r0-clip-hps, r0-mix      R0 with one, two and three learned rewards (tiny CLIP, HPS, ImageReward) and
                                    the implicit CFG reward (the paper's Fig. 9: one -> two -> three rewards);
  r0plus-mix                        R0+ with the full mix;
  test-time-mix                     test-time R0 (start noise optimised per image) with the full mix on the base;
  no-reg, fixed-eta, no-norm, no-cfg-reward
                                    ablations of r0-mix: no weight regularisation, η fixed at 0.5, no per-reward
                                    gradient normalisation, no implicit CFG reward;
  r0-mix-2steps                     r0-mix trained and sampled at 2 steps.
--ship copies r0-mix's LoRA of training seed 0 (the full mix with the settings chosen on the validation half, meant
to run at guidance 1) into the shipped tiny weights (r0_core/tiny/weights/tiny-r0-lora.safetensors), training it
first where --out lacks it, and only if it reproduces the kept row's seed-0 test accuracy.
Settings of the full mix (lr, implicit CFG weight, iterations) are chosen once, on the **validation** half
(`--row select`: every candidate trained with seed 0, measured at 4 steps on validation captions x --val-seeds
seeds, the best mean accuracy of the two kinds wins); every trained row then uses them, changed only where the
row says. Report: the **test** half x --seeds seeds, trained rows with --train-seeds training seeds; each cell
with its 95% interval, every trained row's accuracy as a paired difference to base-50-cfg, base-4-cfg, base-4 and lcm
(per training seed), and the rewards' scores, validity, diversity, NFE and training time.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time

import numpy as np
import torch

import kept
import nfe_plot
from r0_core import lora
from r0_core.lcm import LCMConfig, train_lcm
from r0_core.loading import TINY, TINY_PIPELINE_DIR, TINY_R0_LORA, load_pipeline
from r0_core.rewards import WeightedReward, load_reward
from r0_core.test_time import refine_noise
from r0_core.tiny import protocol, world
from r0_core.tiny.evaluate import r0_images
from r0_core.train import R0Config, train_r0
from tiny_quality import FIELDS, SEED, measure, weights_fingerprint

REWARDS = ("clip", "hpsv2", "image_reward", "aesthetic")     # every image is scored by each
MIX = {"clip": 1.0, "hpsv2": 1.0, "image_reward": 1.0}        # the full mix's learned rewards
# name: (kind, what it changes); kind "base" takes (steps, guidance), the others R0Config fields or rewards
ROWS = {
    "base-50-cfg": ("base", {"steps": 50, "guidance": 2.0}),
    "base-4-cfg": ("base", {"steps": 4, "guidance": 2.0}),
    "base-4": ("base", {"steps": 4, "guidance": 1.0}),
    "lcm": ("lcm", {}),
    "r0-clip": ("r0", {"rewards": {"clip": 1.0}}),
    "r0-clip-hps": ("r0", {"rewards": {"clip": 1.0, "hpsv2": 1.0}}),
    "r0-mix": ("r0", {}),
    "r0plus-mix": ("r0", {"mode": "r0+"}),
    "test-time-mix": ("test-time", {}),
    "no-reg": ("r0", {"reg_weight": 0.0}),
    "fixed-eta": ("r0", {"eta_range": (0.5, 0.5)}),
    "no-norm": ("r0", {"normalize_gradients": False}),
    "no-cfg-reward": ("r0", {"cfg_reward_weight": 0.0}),
    "r0-mix-2steps": ("r0", {"steps": 2}),
}
# the rows of the NFE picture (benchmarks/nfe_plot.py), a point each; the ablations stay in the table only
CURVES = {"R0, full mix, no CFG": ("r0-mix-2steps", "r0-mix"), "R0, tiny CLIP only": ("r0-clip",),
          "R0+, full mix": ("r0plus-mix",), "test-time R0, full mix": ("test-time-mix",),
          "LCM-LoRA (distilled)": ("lcm",)}
PAIRED_WITH = ("base-50-cfg", "base-4-cfg", "base-4", "lcm")   # base-4: the same 4 NFE, no reward training


def nfe(steps: int, guidance: float) -> int:
    return steps * (2 if guidance != 1 else 1)


# ----------------------------------------------------------------------------------------------- measuring

def scorer(rewards: dict, seeds: int):
    """score(images, prompts) for `measure`: every reward of REWARDS and the diversity of each image."""
    def score(images, prompts):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        out = {}
        with torch.no_grad():
            for name in REWARDS:
                out[name] = torch.cat([rewards[name](x[i:i + 128], prompts[i:i + 128])
                                       for i in range(0, len(x), 128)]).float().numpy()
        g = images.reshape(-1, seeds, images[0].size)
        d = np.sqrt(((g[:, :, None] - g[:, None]) ** 2).mean(-1))
        out["diversity"] = (d.sum(-1) / max(seeds - 1, 1)).ravel()
        return out
    return score


def cells(args, rewards, make, key: str, half: str, seeds: int, cache: str) -> dict:
    score = scorer(rewards, seeds)
    return {k: measure(make, k, half, seeds, cache, key, score) for k in protocol.KINDS}


def lora_maker(pipe, path: str, steps: int, eta: float):
    def make(prompts, seed):
        lora.use_loras(pipe, [(lora.load_lora(pipe, path, name="measured"), 1.0)])
        try:
            return r0_images(pipe, prompts, steps=steps, guidance=1.0, eta=eta, seed=seed, batch_size=128,
                             progress=False)
        finally:
            lora.use_loras(pipe, [])
    return make


# ----------------------------------------------------------------------------------------------- training

def mix(rewards: dict, weights: dict) -> WeightedReward:
    return WeightedReward([rewards[n] for n in weights], list(weights.values()))


def r0_config(args, chosen: dict, change: dict, seed: int) -> tuple[R0Config, dict]:
    """The R0Config of a row (the chosen full-mix settings, then the row's change) and its reward weights."""
    change = dict(change)
    weights = change.pop("rewards", MIX)
    config = R0Config(prompts=world.training_captions(), iterations=chosen["iterations"],
                      batch_size=args.batch_size, lr=chosen["lr"], lora_rank=args.rank, reg_weight=args.reg_weight,
                      cfg_reward_weight=chosen["cfg_reward_weight"], guidance=1.0, seed=seed)
    return dataclasses.replace(config, **change), weights


def trained(folder: str, train) -> tuple[str, float]:
    """(LoRA path, training seconds) of a run, training (or resuming) it if its LoRA is not on disk. A resumed
    run's time is the attempt's seconds per iteration times all its iterations."""
    path, meta = os.path.join(folder, "lora.safetensors"), os.path.join(folder, "seconds.json")
    if not os.path.exists(path):
        state = os.path.join(folder, "trainer_state.pt")
        done = torch.load(state, weights_only=True)["iteration"] if os.path.exists(state) else 0
        started = time.time()
        result = train(path)
        ran = max(len(result.history) - done, 1)
        with open(meta + ".tmp", "w") as f:
            json.dump({"seconds": (time.time() - started) * len(result.history) / ran}, f)
        os.replace(meta + ".tmp", meta)
    return path, json.load(open(meta))["seconds"] if os.path.exists(meta) else float("nan")


def train_r0_row(args, pipe_loader, rewards, config: R0Config, weights: dict, folder: str) -> tuple[str, float]:
    def run(path):
        print(f"training {folder}", flush=True)
        return train_r0(pipe_loader(), mix(rewards, weights), config, folder, lora_path=path)
    return trained(folder, run)


# ----------------------------------------------------------------------------------------------- selection

def select(args, rewards, pipe) -> dict:
    """The full mix's lr, implicit CFG weight and iterations, chosen on the validation half."""
    key = {k: getattr(args, k) for k in ("lr", "cfg_reward_weight", "iterations", "val_seeds", "batch_size",
                                          "rank", "reg_weight")} | {"weights": weights_fingerprint(TINY_PIPELINE_DIR)}
    if (done := kept.load("mini_table1", "select", key)) is not None:
        return done
    rows = []
    for lr, weight in itertools.product(args.lr, args.cfg_reward_weight):
        for iterations in sorted(args.iterations):
            chosen = {"lr": lr, "cfg_reward_weight": weight, "iterations": iterations}
            config, weights = r0_config(args, chosen, {}, seed=0)
            folder = os.path.join(args.out, "select", f"lr{lr:g}-cfg{weight:g}-{config.fingerprint()[:8]}",
                                  f"{iterations}it")
            # one run per (lr, weight): each checkpoint continues the previous one's state
            run_dir = os.path.dirname(folder)
            lora_path = os.path.join(folder, "lora.safetensors")
            if not os.path.exists(lora_path):
                os.makedirs(folder, exist_ok=True)
                train_r0(load_pipeline(TINY), mix(rewards, weights), config, run_dir, lora_path=lora_path)
            measured = cells(args, rewards, lora_maker(pipe, lora_path, config.steps, 0.0), "r0", "validation",
                             args.val_seeds, os.path.join(folder, "cells"))
            accuracy = {k: protocol.summarize(measured[k]["correct"],
                                              protocol.cell(k, "validation", args.val_seeds)[1])
                        for k in protocol.KINDS}
            rows.append({**chosen, **accuracy, "score": float(np.mean([a["mean"] for a in accuracy.values()]))})
            print(f"validation lr {lr:g} cfg {weight:g} {iterations} it.: {rows[-1]['score']:.1%}", flush=True)
    best = max(rows, key=lambda r: r["score"])
    out = {k: best[k] for k in ("lr", "cfg_reward_weight", "iterations")} | {"validation": rows}
    kept.save("mini_table1", "select", key, out)
    return out


# ----------------------------------------------------------------------------------------------- rows

def run_row(args, name: str, rewards, pipe) -> dict:
    """One row's measured cells on the test half: its kept record, or trained (if it is) and measured now."""
    key = row_key(args, name, rewards, pipe)
    if (done := kept.load("mini_table1", name, key)) is None:
        done = measure_row(args, name, rewards, pipe)
        done["cells"] = {seed: {k: {m: c[k][m] for m in METRICS} for k in c} for seed, c in done["cells"].items()}
        done.pop("loras", None)
        print(f"kept {kept.save('mini_table1', name, key, done)}: commit it", flush=True)
    as_arrays = {int(seed): {k: {m: np.asarray(v) for m, v in c.items()} for k, c in cells_.items()}
                 for seed, cells_ in done["cells"].items()}
    seconds = {int(seed): t for seed, t in (done.get("train_seconds") or {}).items()}
    return done | {"cells": as_arrays, "train_seconds": seconds or done.get("train_seconds")}


def row_key(args, name: str, rewards, pipe) -> dict:
    """The settings a row's kept record must have been made with."""
    kind = ROWS[name][0]
    key = {"row": ROWS[name], "seeds": args.seeds, "weights": weights_fingerprint(TINY_PIPELINE_DIR)}
    if kind != "base":
        key |= {k: getattr(args, k) for k in ("train_seeds", "batch_size", "rank", "reg_weight")}
        key |= {"chosen": {k: v for k, v in select(args, rewards, pipe).items() if k != "validation"}}
    key |= {"refine_iterations": args.refine_iterations} if kind == "test-time" else {}
    key |= {"lcm_images": args.lcm_images} if kind == "lcm" else {}
    return key


def measure_row(args, name: str, rewards, pipe) -> dict:
    """Measure one row on the test half (training it first if it is trained); cached under --out/<name>."""
    kind, change = ROWS[name]
    folder = os.path.join(args.out, name)
    cache = os.path.join(folder, "cells", weights_fingerprint(TINY_PIPELINE_DIR))
    if kind == "base":
        make = lambda prompts, seed: r0_images(pipe, prompts, seed=seed, batch_size=128, progress=False,  # noqa
                                               **change)
        return {"nfe": nfe(change["steps"], change["guidance"]),
                "cells": {0: cells(args, rewards, make, f"base-{change['steps']}-{change['guidance']:g}", "test",
                                   args.seeds, cache)}}
    chosen = select(args, rewards, pipe)
    if kind == "test-time":
        reward = mix(rewards, MIX)

        def make(prompts, seed):
            out = []
            for start in range(0, len(prompts), 128):
                chunk = prompts[start:start + 128]
                result = refine_noise(pipe, reward, chunk, iterations=args.refine_iterations, seed=seed + start,
                                      steps=4, batch_size=len(chunk), cfg_reward_weight=chosen["cfg_reward_weight"])
                out.append(result.images.permute(0, 2, 3, 1).float().numpy())
            return np.concatenate(out)
        started = time.time()
        measured = cells(args, rewards, make, f"test-time-{args.refine_iterations}it", "test", args.seeds, cache)
        return {"nfe": 4 * (args.refine_iterations + 1), "nfe_text": f"{4 * (args.refine_iterations + 1)} + backward",
                "cells": {0: measured}, "train_seconds": {0: 0.0}, "seconds": time.time() - started}
    runs, seconds, steps, eta = {}, {}, 4, 0.0
    for seed in range(args.train_seeds):
        run_dir = os.path.join(folder, f"seed{seed}")
        if kind == "lcm":
            budget = trained_seconds(args, "r0-mix", seed)
            config = LCMConfig(iterations=lcm_iterations(args, budget), batch_size=args.batch_size,
                               lora_rank=args.rank, seed=seed)
            images, prompts = lcm_data(args)
            runs[seed], seconds[seed] = trained(run_dir, lambda path: train_lcm(
                load_pipeline(TINY), images, prompts, config, run_dir, lora_path=path))
            eta = 1.0
        else:
            config, weights = r0_config(args, chosen, change, seed)
            runs[seed], seconds[seed] = train_r0_row(args, lambda: load_pipeline(TINY), rewards, config, weights,
                                                     run_dir)
            steps = config.steps
    measured = {seed: cells(args, rewards, lora_maker(pipe, path, steps, eta), f"lora-{steps}steps-eta{eta:g}",
                            "test", args.seeds, os.path.join(os.path.dirname(path), "cells",
                                                             weights_fingerprint(path, TINY_PIPELINE_DIR)))
                for seed, path in runs.items()}
    return {"nfe": steps, "cells": measured, "train_seconds": seconds, "loras": runs}


def ship(args, rewards, pipe) -> None:
    """Ship r0-mix's seed-0 LoRA, training it first if this machine has not (the same seed gives the same LoRA),
    and refuse it unless it reproduces the kept row's seed-0 accuracy on the test half."""
    record = kept.load("mini_table1", "r0-mix", row_key(args, "r0-mix", rewards, pipe))
    if record is None:
        raise SystemExit("--ship: r0-mix has no kept record with these settings; run `--row r0-mix` first")
    config, weights = r0_config(args, select(args, rewards, pipe), {}, seed=0)
    source, _ = train_r0_row(args, lambda: load_pipeline(TINY), rewards, config, weights,
                             os.path.join(args.out, "r0-mix", "seed0"))
    measured = cells(args, rewards, lora_maker(pipe, source, config.steps, 0.0), "lora-4steps-eta0", "test",
                     args.seeds, os.path.join(os.path.dirname(source), "cells",
                                              weights_fingerprint(source, TINY_PIPELINE_DIR)))
    # training is reproducible for one thread count (the rows ran with --threads 1): other counts sum in
    # another order and give a slightly different LoRA
    differ = []
    for k in protocol.KINDS:
        now, then = np.mean(measured[k]["correct"]), np.mean(record["cells"]["0"][k]["correct"])
        print(f"{k}: accuracy {now:.1%} now, {then:.1%} in the kept row")
        differ += [f"{k}: {now:.1%} against {then:.1%}"] if abs(now - then) > 0.02 else []
    if differ:
        raise SystemExit(f"--ship: {source} does not reproduce the kept r0-mix row ({'; '.join(differ)}); train it "
                         f"with the row's --threads, or rerun the row (delete its kept record), before shipping")
    shutil.copy(source, TINY_R0_LORA + ".tmp")
    os.replace(TINY_R0_LORA + ".tmp", TINY_R0_LORA)
    print(f"shipped {source} as {TINY_R0_LORA}")


def trained_seconds(args, row: str, seed: int) -> float:
    record = kept.path("mini_table1", row)
    if not os.path.exists(record):
        raise SystemExit(f"the lcm row is trained for as long as {row} was; run `--row {row}` first")
    return json.load(open(record))["value"]["train_seconds"][str(seed)]


def lcm_data(args) -> tuple[torch.Tensor, list[str]]:
    """The world's own renders of the training captions (--lcm-images of them, seeded): LCM's image data."""
    captions = world.training_captions()
    picks = np.random.default_rng(0).choice(len(captions), args.lcm_images)
    prompts = [captions[i] for i in picks]
    images = np.stack([world.render(world.parse_caption(p), seed=10_000 + i) for i, p in enumerate(prompts)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous(), prompts


def lcm_iterations(args, budget: float) -> int:
    """LCM iterations that fit in `budget` seconds, from the time of a short probe run on this machine."""
    probe = os.path.join(args.out, "lcm", "probe.json")
    if not os.path.exists(probe):
        images, prompts = lcm_data(args)
        folder = os.path.join(args.out, "lcm", "probe")
        started = time.time()
        train_lcm(load_pipeline(TINY), images, prompts, LCMConfig(iterations=10, batch_size=args.batch_size,
                                                                   lora_rank=args.rank), folder)
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        with open(probe, "w") as f:
            json.dump({"seconds_per_iteration": (time.time() - started) / 10}, f)
    return max(1, int(budget / json.load(open(probe))["seconds_per_iteration"]))


# ----------------------------------------------------------------------------------------------- report

METRICS = FIELDS + REWARDS + ("diversity",)
HEADERS = {"correct": "accuracy", "objects_correct": "objects right", "valid": "validity", "clip": "tiny CLIP",
           "hpsv2": "tiny HPS", "image_reward": "tiny ImageReward", "aesthetic": "tiny aesthetic",
           "diversity": "diversity"}


def summarize_row(row: dict, groups: dict, base: dict) -> dict:
    out = {"nfe": row["nfe"], "nfe_text": row.get("nfe_text"), "train_seconds": row.get("train_seconds"),
           "seeds": {}}
    for seed, c in row["cells"].items():
        out["seeds"][seed] = {k: {m: protocol.summarize(c[k][m], groups[k]) for m in METRICS} for k in protocol.KINDS}
        out["seeds"][seed]["paired"] = {
            b: {k: protocol.paired(c[k]["correct"], base[b]["cells"][s][k]["correct"], groups[k])
                for k in protocol.KINDS}
            for b in PAIRED_WITH if b in base and base[b] is not row
            for s in [0 if len(base[b]["cells"]) == 1 else seed]}
    if len(out["seeds"]) > 1:
        out["across_seeds"] = {k: {m: protocol.across_seeds([s[k][m]["mean"] for s in out["seeds"].values()])
                                   for m in METRICS} for k in protocol.KINDS}
    return out


def fmt(summary: dict, metric: str) -> str:
    if metric in FIELDS:
        return protocol.fmt(summary)
    digits = 3 if metric == "diversity" else 2
    return f"{summary['mean']:.{digits}f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Test half x {s['seeds']} seeds; 95% intervals from a bootstrap over captions; trained rows: training "
             f"seed 0's cell (mean over {s['train_seeds']} seeds and their min–max below). Full-mix settings "
             f"chosen on the validation half: lr {report['chosen']['lr']:g}, implicit CFG weight "
             f"{report['chosen']['cfg_reward_weight']:g}, {report['chosen']['iterations']} iterations."]
    for kind, title in (("pair", "Two objects with a relation"), ("positioned", "One object with a position")):
        lines += ["", f"**{title}**", "", "| row | NFE | train s | " + " | ".join(HEADERS[m] for m in METRICS)
                  + " | accuracy over training seeds |", "|---|---|---|" + "---|" * (len(METRICS) + 1)]
        for name, row in report["rows"].items():
            first = row["seeds"][min(row["seeds"])][kind]
            secs = row["train_seconds"]
            secs = "" if not secs else f"{np.mean(list(secs.values())):.0f}"
            spread = row.get("across_seeds", {}).get(kind, {}).get("correct")
            spread = (f"{spread['mean']:.1%} ({spread['min']:.1%}–{spread['max']:.1%})" if spread else "")
            lines.append(f"| {name} | {row['nfe_text'] or row['nfe']} | {secs} | "
                         + " | ".join(fmt(first[m], m) for m in METRICS) + f" | {spread} |")
    lines += ["", "Paired differences of two-object accuracy (points, per training seed):", "",
              "| row | seed | " + " | ".join(f"vs {b}" for b in PAIRED_WITH) + " |",
              "|---|---|" + "---|" * len(PAIRED_WITH)]
    for name, row in report["rows"].items():
        for seed, r in row["seeds"].items():
            if r["paired"]:
                lines.append(f"| {name} | {seed} | " + " | ".join(
                    protocol.fmt(r["paired"][b]["pair"]) if b in r["paired"] else "" for b in PAIRED_WITH) + " |")
    return "\n".join(lines)


def main(argv=None):
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", choices=list(ROWS) + ["select"], help="run one row (default: all, then report)")
    parser.add_argument("--report", action="store_true", help="run the missing rows and write the results")
    parser.add_argument("--seeds", type=int, default=protocol.SEEDS, help="noise seeds per test caption")
    parser.add_argument("--val-seeds", type=int, default=4, help="noise seeds per validation caption")
    parser.add_argument("--train-seeds", type=int, default=2, help="training seeds of every trained row")
    parser.add_argument("--lr", type=floats, default=[3e-4, 1e-3], help="full-mix learning rates to choose from")
    parser.add_argument("--cfg-reward-weight", type=floats, default=[0.5, 1.0],
                        help="implicit CFG reward weights to choose from")
    parser.add_argument("--iterations", type=lambda t: [int(v) for v in t.split(",")], default=[100, 200],
                        help="checkpoints to choose from")
    parser.add_argument("--reg-weight", type=float, default=0.1, help="the pull to the base (its ablation: 0)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--refine-iterations", type=int, default=20, help="test-time R0 iterations")
    parser.add_argument("--lcm-images", type=int, default=4096, help="rendered training images for LCM")
    parser.add_argument("--ship", action="store_true", help="ship r0-mix's LoRA of training seed 0 (see above)")
    parser.add_argument("--kept-only", action="store_true",
                        help="with --report: report the rows that are kept, run none")
    parser.add_argument("--rows", default=",".join(ROWS), help="the rows of the report")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/benchmarks/mini_table1")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rewards = {name: load_reward(name, TINY) for name in REWARDS}
    pipe = load_pipeline(TINY)
    if args.ship:
        ship(args, rewards, pipe)
        return
    if args.row == "select":
        select(args, rewards, pipe)
        return
    names = [args.row] if args.row else args.rows.split(",")
    if args.kept_only:
        names = [n for n in names if kept.load("mini_table1", n, row_key(args, n, rewards, pipe)) is not None]
        print(f"kept rows: {', '.join(names)}")
    done = {name: run_row(args, name, rewards, pipe) for name in sorted(names, key=lambda n: n == "lcm")}
    rows = {name: done[name] for name in names}  # lcm ran last: its budget is r0-mix's training time
    if args.row and not args.report:
        return
    groups = {k: protocol.cell(k, "test", args.seeds)[1] for k in protocol.KINDS}
    base = {b: rows[b] for b in PAIRED_WITH if b in rows}
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "results")} | {"seed": SEED},
              "chosen": select(args, rewards, pipe),
              "rows": {name: summarize_row(row, groups, base) for name, row in rows.items()}}
    summaries = report["rows"]
    report["nfe_curve"] = [nfe_plot.series(label, kind, [(summaries[n]["nfe"], nfe_plot.envelope(
        s[kind]["correct"] for s in summaries[n]["seeds"].values())) for n in curve if n in summaries])
        for label, curve in CURVES.items() if any(n in summaries for n in curve) for kind in protocol.KINDS]
    text = markdown(report)
    paths = protocol.write_results("mini_table1", report, text, out=args.results)
    print("\n" + text + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
