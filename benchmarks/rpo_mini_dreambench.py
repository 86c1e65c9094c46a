"""Mini DreamBench in the tiny world: does RPO beat DreamBooth? `python benchmarks/rpo_mini_dreambench.py`

Subjects: the three shipped ones and two more (r0_core/tiny/subjects.py, SUBJECTS + MORE_SUBJECTS: two-tone
shapes the base model never saw), 5 references each. Per subject, three disjoint prompt lists: 8 training
prompts, 13 validation prompts (checkpoints are chosen there and only there) and the 25 test prompts (DreamBench's
kinds: recontextualisation, relation, attribute; only reported).
Runs: subject x training seed (--seeds) x method: DreamBooth (the diffusion loss on the references) and RPO (plus
the preference loss, rpo_core.train's defaults), at the same steps, learning rate, LoRA rank and validation
schedule. Every run keeps the weights of each validation (keep_validated), so one run serves every selection.
A run is a folder under --out: a finished run is reused and a stopped one resumes (rerun the same command); a
finished run's outcomes are also kept in benchmarks/results/rpo_mini_dreambench_runs/ (benchmarks/kept.py: commit
them; a rerun with the same settings reads them instead of retraining);
--subjects and --seeds split the runs across processes; --tables reports what is there.
Selection, one rule for both methods: the checkpoint with the best λ_val-Harmonic reward (tiny CLIP) on the
validation prompts, for each λ_val of --lambdas; and the last step.
Test: every test prompt x --per-prompt images (4-step R0 sampler, CFG 2, the same noise for every run), judged by
the subject oracle: subject fidelity (the subject's shape and two-tone pattern), prompt fidelity (the rest of the
prompt), both in one image, validity; tiny CLIP-I (mean cosine to the references) and CLIP-T (cosine to the prompt
without the token). The harmonic mean of subject and prompt fidelity is the headline. The tiny world has no DINO.
Intervals: 95% bootstrap over (subject, prompt) groups, each with all its seeds' images; RPO − DreamBooth paired
on the same groups, seeds, prompts and noise.
Efficiency: at each validation checkpoint the oracle harmonic on the test prompts (1 image each); reported, the
first step at which RPO's curve reaches DreamBooth's last-step value of the same curve.
Writes benchmarks/results/rpo_mini_dreambench.json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

import kept

from r0_core import lora
from r0_core.files import atomic_write
from r0_core.generate import generate
from r0_core.loading import TINY, TINY_PIPELINE_DIR, load_pipeline
from r0_core.rewards import load_reward
from r0_core.tiny import protocol, subjects
from rpo_core.dreambench import strip_token
from rpo_core.train import RPOConfig, load_validated, select, train_rpo
from tiny_quality import weights_fingerprint

METHODS = ("dreambooth", "rpo")
FIGURES = ("subject_ok", "prompt_ok", "both_ok", "valid", "clip_i", "clip_t")
BENCH_SUBJECTS = subjects.SUBJECTS + subjects.MORE_SUBJECTS


def fmt(summary: dict, percent: bool = True) -> str:
    """protocol.fmt for rates; three decimals for cosines and harmonic means."""
    if percent:
        return protocol.fmt(summary)
    if "diff" in summary:
        return f"{summary['diff']:+.3f} [{summary['low']:+.3f}, {summary['high']:+.3f}]"
    return f"{summary['mean']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def read_json(path: str, default):
    return json.load(open(path)) if os.path.exists(path) else default


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda tmp: json.dump(obj, open(tmp, "w"), indent=1))


def evaluate(pipe, subject, scorer, references, per_prompt: int, seed: int = 10_000) -> dict:
    """Per-image verdicts and cosines on the test prompts, prompt-major; the same noise for every model."""
    prompts = [p for p in subjects.evaluation_prompts(subject) for _ in range(per_prompt)]
    with torch.no_grad():
        images, _ = generate(pipe, prompts, steps=4, guidance=2.0, seeds=[seed + i for i in range(len(prompts))])
        clip_i = (scorer.image_embeds(images) @ scorer.image_embeds(references).T).mean(1)
        clip_t = scorer.cosine(images, [strip_token(p, subject.token) for p in prompts])
    verdicts = [subjects.judge(im, p, subject) for im, p in zip(images.permute(0, 2, 3, 1).numpy(), prompts)]
    return {"subject_ok": [float(v.subject_ok) for v in verdicts], "prompt_ok": [float(v.prompt_ok) for v in verdicts],
            "both_ok": [float(v.subject_ok and v.prompt_ok) for v in verdicts],
            "valid": [float(v.valid) for v in verdicts], "clip_i": clip_i.tolist(), "clip_t": clip_t.tolist()}


def run(subject, method: str, seed: int, args, scorer) -> dict:
    """Train (or resume, or reuse) one run, then evaluate its selections and its curve; cached in its folder."""
    folder = os.path.join(args.out, subject.name, f"{method}-seed{seed}")
    if (done := kept.load("rpo_mini_dreambench", f"{subject.name}-{method}-seed{seed}", kept_key(args))) is not None:
        return done
    references = torch.from_numpy(subjects.references(subject)).permute(0, 3, 1, 2).float()
    config = RPOConfig(token=subject.token, class_name=subject.shape, prompts=subjects.training_prompts(subject),
                       validation_prompts=subjects.validation_prompts(subject), iterations=args.iterations,
                       lr=args.lr, lora_rank=args.rank, preference=method == "rpo", seed=seed,
                       validate_every=args.validate_every, keep_validated=True, select_best=False)
    pipe = load_pipeline(TINY)
    timing = read_json(os.path.join(folder, "timing.json"), {"seconds": 0.0})
    started = time.time()
    result = train_rpo(pipe, scorer, references, config, folder)
    if result.history and len(result.history) > timing.get("iterations", 0):   # this call trained
        timing = {"seconds": timing["seconds"] + time.time() - started, "iterations": len(result.history)}
        write_json(os.path.join(folder, "timing.json"), timing)
    if result.cancelled:
        raise SystemExit(f"{folder} was stopped; rerun to resume")
    validations = result.validations
    selected = {f"lambda_{lam:g}": select(validations, lam)["iteration"] for lam in args.lambdas}
    selected["last"] = config.iterations
    evaluations = read_json(os.path.join(folder, "evaluations.json"), {})
    for iteration in sorted(set(selected.values())):
        if str(iteration) not in evaluations:
            load_validated(pipe.unet, folder, iteration)
            evaluations[str(iteration)] = evaluate(pipe, subject, scorer, references, args.per_prompt)
            write_json(os.path.join(folder, "evaluations.json"), evaluations)
    curve = read_json(os.path.join(folder, "curve.json"), {})
    for v in validations:
        if str(v["iteration"]) not in curve:
            load_validated(pipe.unet, folder, v["iteration"])
            e = evaluate(pipe, subject, scorer, references, 1, seed=20_000)
            curve[str(v["iteration"])] = harmonic(np.mean(e["subject_ok"]), np.mean(e["prompt_ok"]))
            write_json(os.path.join(folder, "curve.json"), curve)
    lora.use_loras(pipe, [])
    done = {"selected": selected, "validations": [{k: v[k] for k in ("iteration", "score")} for v in validations],
            "train_seconds": timing["seconds"], "negatives": config.negatives_per_prompt * len(config.prompts),
            "evaluations": {k: evaluations[str(i)] for k, i in selected.items()}, "curve": curve}
    write_json(os.path.join(folder, "run.json"), done)
    print(f"kept {kept.save('rpo_mini_dreambench', f'{subject.name}-{method}-seed{seed}', kept_key(args), done)}",
          flush=True)
    return done


def kept_key(args) -> dict:
    """The settings a kept run was made with: the run's own, its evaluation's, and the world's weights."""
    return {k: getattr(args, k) for k in ("iterations", "lr", "rank", "validate_every", "lambdas", "per_prompt")} | {
        "weights": weights_fingerprint(TINY_PIPELINE_DIR),
        "defaults": {f.name: f.default for f in dataclasses.fields(RPOConfig) if f.default is not dataclasses.MISSING}}


# ----------------------------------------------------------------------------------------------- report

def pooled(rows: list[dict], key: str) -> tuple[dict, np.ndarray]:
    """Per-image arrays of every (subject, seed) row at selection `key`, and each image's (subject, prompt) group."""
    values = {f: np.concatenate([r["runs"][key][f] for r in rows]) for f in FIGURES}
    groups = np.concatenate([r["subject_index"] * 1000 + np.arange(len(r["runs"][key]["valid"])) // r["per_prompt"]
                             for r in rows])
    return values, groups


def harmonic_summary(values: dict, groups: np.ndarray) -> dict:
    stat = lambda i: harmonic(values["subject_ok"][i].mean(), values["prompt_ok"][i].mean())  # noqa: E731
    low, high = protocol.resample_captions(stat, groups)
    return {"mean": stat(np.arange(len(groups))), "low": low, "high": high}


def report(args, rows: dict) -> tuple[dict, str]:
    """rows[method]: one dict per (subject, seed) with runs[selection] = per-image arrays."""
    selections = [f"lambda_{lam:g}" for lam in args.lambdas] + ["last"]
    out = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "results", "tables")},
           "cells": {}, "paired": {}, "efficiency": {}}
    lines = [f"Mini DreamBench, tiny world: {len(args.subjects)} subjects x {len(args.seeds)} training seeds, "
             f"{args.iterations} steps, lr {args.lr:g}, LoRA rank {args.rank}, validation every "
             f"{args.validate_every} steps on the validation prompts; test prompts x {args.per_prompt} images. "
             f"95% bootstrap intervals over (subject, prompt).", "",
             "| method | selection | steps | subject (oracle) | CLIP-I | prompt (oracle) | CLIP-T | harmonic (oracle) "
             "| both right | validity | train s | negatives |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in ("base",) + METHODS:
        for key in (["base"] if method == "base" else selections):
            values, groups = pooled(rows[method], key)
            cell = {f: protocol.summarize(values[f], groups) for f in FIGURES}
            cell["harmonic"] = harmonic_summary(values, groups)
            if method != "base":
                per_seed = [harmonic(np.mean(r["runs"][key]["subject_ok"]), np.mean(r["runs"][key]["prompt_ok"]))
                            for r in rows[method]]
                cell["harmonic_over_runs"] = protocol.across_seeds(per_seed) if len(per_seed) > 1 else None
                cell["steps"] = float(np.mean([r["selected"][key] for r in rows[method]]))
                cell["train_seconds"] = float(np.mean([r["train_seconds"] for r in rows[method]]))
                cell["negatives"] = rows[method][0]["negatives"]
            out["cells"][f"{method}/{key}"] = cell
            extra = ("—", "—", "—") if method == "base" else (f"{cell['steps']:.0f}", f"{cell['train_seconds']:.0f}",
                                                              str(cell["negatives"]))
            lines.append(f"| {method} | {key.replace('lambda_', 'λ_val ')} | {extra[0]} | "
                         f"{fmt(cell['subject_ok'])} | {fmt(cell['clip_i'], False)} | "
                         f"{fmt(cell['prompt_ok'])} | {fmt(cell['clip_t'], False)} | "
                         f"{fmt(cell['harmonic'], False)} | {fmt(cell['both_ok'])} | "
                         f"{fmt(cell['valid'])} | {extra[1]} | {extra[2]} |")
    lines += ["", "RPO − DreamBooth at the same selection (paired: same subjects, seeds, prompts and noise; points, "
                  "harmonic in its own units):", "",
              "| selection | harmonic (oracle) | subject (oracle) | prompt (oracle) | both right | validity |",
              "|---|---|---|---|---|---|"]
    for key in selections:
        (r, groups), (d, _) = pooled(rows["rpo"], key), pooled(rows["dreambooth"], key)
        paired = {f: protocol.paired(r[f], d[f], groups) for f in FIGURES}
        both = lambda v, i: harmonic(v["subject_ok"][i].mean(), v["prompt_ok"][i].mean())  # noqa: E731
        low, high = protocol.resample_captions(lambda i: both(r, i) - both(d, i), groups)
        everything = np.arange(len(groups))
        paired["harmonic"] = {"diff": both(r, everything) - both(d, everything), "low": low, "high": high}
        out["paired"][key] = paired
        lines.append(f"| {key.replace('lambda_', 'λ_val ')} | {fmt(paired['harmonic'], False)} | "
                     f"{fmt(paired['subject_ok'])} | {fmt(paired['prompt_ok'])} | "
                     f"{fmt(paired['both_ok'])} | {fmt(paired['valid'])} |")
    reached = []
    for r, d in zip(rows["rpo"], rows["dreambooth"]):
        target = d["curve"][str(max(map(int, d["curve"])))]
        hits = [int(i) for i in sorted(r["curve"], key=int) if r["curve"][i] >= target]
        reached.append(hits[0] if hits else None)
    out["efficiency"] = {"rpo_step_reaching_dreambooth_final": reached}
    got = [x for x in reached if x is not None]
    lines += ["", f"Efficiency: RPO's test harmonic (1 image per prompt, at each validation checkpoint) reached "
                  f"DreamBooth's last-step value in {len(got)} of {len(reached)} runs"
                  + (f", at step {np.mean(got):.0f} on average (DreamBooth: {args.iterations})." if got else ".")]
    return out, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", nargs="+", default=[s.name for s in BENCH_SUBJECTS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3, help="both methods (DreamBooth learns each subject at it)")
    parser.add_argument("--rank", type=int, default=RPOConfig.lora_rank)
    parser.add_argument("--validate-every", type=int, default=30)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--per-prompt", type=int, default=4, help="test images per prompt")
    parser.add_argument("--out", default="out/benchmarks/rpo_mini_dreambench")
    parser.add_argument("--tables", action="store_true", help="only report the runs that are there")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scorer = load_reward("clip", TINY)
    chosen = [s for s in BENCH_SUBJECTS if s.name in args.subjects]
    rows = {m: [] for m in ("base",) + METHODS}
    for subject in chosen:
        references = torch.from_numpy(subjects.references(subject)).permute(0, 3, 1, 2).float()
        base = kept.load("rpo_mini_dreambench", f"{subject.name}-base", kept_key(args))
        if base is None and not args.tables:
            base = evaluate(load_pipeline(TINY), subject, scorer, references, args.per_prompt)
            kept.save("rpo_mini_dreambench", f"{subject.name}-base", kept_key(args), base)
        if base is not None:
            rows["base"].append({"runs": {"base": base}, "subject_index": BENCH_SUBJECTS.index(subject),
                                 "per_prompt": args.per_prompt})
        for seed in args.seeds:
            for method in METHODS:
                done = (kept.load("rpo_mini_dreambench", f"{subject.name}-{method}-seed{seed}", kept_key(args))
                        if args.tables else run(subject, method, seed, args, scorer))
                if done is not None:
                    rows[method].append({**done, "runs": done["evaluations"], "per_prompt": args.per_prompt,
                                         "subject_index": BENCH_SUBJECTS.index(subject)})
                print(subject.name, method, seed, "done" if done else "missing", flush=True)
    if any(len(rows[m]) != len(rows["dreambooth"]) for m in METHODS) or not rows["rpo"]:
        raise SystemExit("runs are missing: rerun without --tables (or with the same --subjects/--seeds)")
    results, text = report(args, rows)
    paths = protocol.write_results("rpo_mini_dreambench", results, text, out=args.results)
    print(text + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
