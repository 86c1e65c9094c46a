"""Mini DreamBench in the tiny world: `python benchmarks/rpo_mini_dreambench.py`.

For each built-in subject (r0_core/tiny/subjects.py: two-tone shapes the base model never saw, 5 references
each) it fine-tunes the base model with DreamBooth (the diffusion loss on the references, last step) and with RPO
(+ the preference loss, best λ_val-Harmonic checkpoint), at equal steps, learning rate and LoRA rank, on the
subject's 8 training prompts. Then, on the 25 evaluation prompts (recontextualisation, relation, attribute) with
4 images each, it reports for base, DreamBooth and RPO:
  - subject fidelity: tiny-CLIP-I (mean cosine to the references) and the oracle's subject check;
  - prompt fidelity: the oracle's check of the rest of the prompt, and tiny-CLIP-T with the token removed;
  - the harmonic mean of the two, for the oracle and for tiny CLIP, and the rate of images right on both.
Model selection cost: at every RPO validation point it also runs the validation with a 50-step sampler, times
both, and measures the evaluation score of the checkpoint each one would pick.
Training is resumable (rerun the same command); results go to out/benchmarks/rpo_mini_dreambench/<subject>.json
(subjects can run as parallel processes with --subjects; --tables prints the tables of what is there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from r0_core import lora
from r0_core.generate import generate
from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import LambdaHarmonic, load_reward
from r0_core.tiny import protocol, subjects
from r0_core.tiny.evaluate import grid
from rpo_core.dreambench import strip_token
from rpo_core.train import RPOConfig, train_rpo, validate


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def evaluate(pipe, subject, scorer, references, per_prompt: int, seed: int = 10_000):
    """Metrics of `per_prompt` images for each evaluation prompt, and the images."""
    prompts = [p for p in subjects.evaluation_prompts(subject) for _ in range(per_prompt)]
    with torch.no_grad():
        images, _ = generate(pipe, prompts, steps=4, guidance=2.0, seeds=[seed + i for i in range(len(prompts))])
        clip_i = (scorer.image_embeds(images) @ scorer.image_embeds(references).T).mean(1)
        clip_t = scorer.cosine(images, [strip_token(p, subject.token) for p in prompts]).clamp(min=0)
    pixels = images.permute(0, 2, 3, 1).numpy()
    verdicts = [subjects.judge(im, p, subject) for im, p in zip(pixels, prompts)]
    m = {"subject_ok": float(np.mean([v.subject_ok for v in verdicts])),
         "prompt_ok": float(np.mean([v.prompt_ok for v in verdicts])),
         "both_ok": float(np.mean([v.subject_ok and v.prompt_ok for v in verdicts])),
         "valid": float(np.mean([v.valid for v in verdicts])),
         "clip_i": float(clip_i.mean()), "clip_t": float(clip_t.mean()),
         # per image, for intervals over prompts (r0_core.tiny.protocol)
         "per_image": {"subject_ok": [bool(v.subject_ok) for v in verdicts],
                       "prompt_ok": [bool(v.prompt_ok) for v in verdicts],
                       "both_ok": [bool(v.subject_ok and v.prompt_ok) for v in verdicts]}}
    m["harmonic_oracle"] = harmonic(m["subject_ok"], m["prompt_ok"])
    m["harmonic_clip"] = harmonic((m["clip_i"] + 1) / 2, (m["clip_t"] + 1) / 2)   # cosines mapped to 0..1
    return m, pixels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--beta", type=float, default=RPOConfig.beta)
    parser.add_argument("--tau", type=float, default=RPOConfig.tau)
    parser.add_argument("--validate-every", type=int, default=30)
    parser.add_argument("--compare-every", type=int, default=60,
                        help="also validate with 50 steps (and evaluate the checkpoint) every this many iterations")
    parser.add_argument("--per-prompt", type=int, default=4, help="evaluation images per prompt")
    parser.add_argument("--subjects", nargs="*", default=[s.name for s in subjects.SUBJECTS])
    parser.add_argument("--out", default="out/benchmarks/rpo_mini_dreambench")
    parser.add_argument("--methods", nargs="+", default=["dreambooth", "rpo"], choices=["dreambooth", "rpo"])
    parser.add_argument("--tag", default="", help="store these runs as <method>_<tag> beside the others")
    parser.add_argument("--lambda-train", type=float, default=RPOConfig.lambda_train)
    parser.add_argument("--tables", action="store_true", help="only print the tables of finished subjects")
    parser.add_argument("--results", default="benchmarks/results",
                        help="where rpo_mini_dreambench.json/.md go (the README quotes them)")
    args = parser.parse_args(argv)
    if args.tables:
        return print_tables(args.out, args.results)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    scorer = load_reward("clip", TINY)
    for subject in [s for s in subjects.SUBJECTS if s.name in args.subjects]:
        references = torch.from_numpy(subjects.references(subject)).permute(0, 3, 1, 2).float()
        path = os.path.join(args.out, f"{subject.name}.json")
        rows, pictures = (json.load(open(path)) if os.path.exists(path) else {}), []
        pipe = load_pipeline(TINY)
        rows["base"], images = evaluate(pipe, subject, scorer, references, args.per_prompt)
        pictures.append(images)
        print(subject.name, "base", json.dumps(rows["base"]), flush=True)

        for method in args.methods:
            key = f"{method}_{args.tag}" if args.tag else method
            pipe = load_pipeline(TINY)
            config = RPOConfig(token=subject.token, class_name=subject.shape,
                               prompts=subjects.training_prompts(subject), iterations=args.iterations, lr=args.lr,
                               lora_rank=args.rank, beta=args.beta, tau=args.tau, preference=method == "rpo",
                               lambda_train=args.lambda_train,
                               select_best=method == "rpo", validate_every=args.validate_every)
            checkpoints = []
            val_50 = LambdaHarmonic(scorer, config.lambda_val, references)

            def at_validation(info, pipe=pipe, config=config, checkpoints=checkpoints, val_50=val_50):
                """At each RPO validation point: time the 4-step validation against a 50-step one, and measure
                this checkpoint on the evaluation prompts (to judge each selection afterwards)."""
                if method != "rpo" or (info["i"] + 1) % args.compare_every or info["validation"] is None \
                        or info["validation"]["iteration"] != info["i"] + 1:
                    return
                with torch.no_grad():
                    timed = {}
                    for steps in (4, 50):
                        started = time.perf_counter()
                        score = validate(pipe, dataclasses.replace(config, sampler_steps=steps), val_50,
                                         config.seed * 100_003 + 50_000)["score"]
                        timed[steps] = (score, time.perf_counter() - started)
                    metrics, _ = evaluate(pipe, subject, scorer, references, 1, seed=20_000)
                checkpoints.append({"iteration": info["i"] + 1, "val_4": timed[4][0], "seconds_4": timed[4][1],
                                    "val_50": timed[50][0], "seconds_50": timed[50][1], "eval": metrics})

            started = time.time()
            result = train_rpo(pipe, scorer, references, config, os.path.join(args.out, subject.name, key),
                               callback=at_validation)
            rows[key], images = evaluate(pipe, subject, scorer, references, args.per_prompt)
            rows[key]["train_seconds"] = time.time() - started
            rows[key]["best_iteration"] = result.best_iteration if config.select_best else args.iterations
            rows[key]["settings"] = {k: v for k, v in vars(args).items() if k not in ("subjects", "out", "tables")}
            pictures.append(images)
            if checkpoints:
                rows["selection" + (f"_{args.tag}" if args.tag else "")] = checkpoints
            print(subject.name, key, json.dumps(rows[key]), flush=True)
            lora.use_loras(pipe, [])
        from PIL import Image
        # one image per evaluation prompt: base, DreamBooth, RPO rows
        Image.fromarray(grid(np.concatenate([p[::args.per_prompt] for p in pictures]), 25, 4)).save(
            os.path.join(args.out, f"{subject.name}{'_' + args.tag if args.tag else ''}.png"))
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    print_tables(args.out, args.results)


def print_tables(out: str, results: str = "") -> None:
    """The tables over every subject measured so far in `out` (subjects may run as parallel processes)."""
    report = {s.name: json.load(open(os.path.join(out, f"{s.name}.json"))) for s in subjects.SUBJECTS
              if os.path.exists(os.path.join(out, f"{s.name}.json"))}
    names = list(report)
    print(f"subjects: {', '.join(names)}")
    keys = ("clip_i", "subject_ok", "clip_t", "prompt_ok", "harmonic_clip", "harmonic_oracle", "both_ok", "valid")
    print("\n| method | tiny-CLIP-I | oracle subject | tiny-CLIP-T | oracle prompt | harmonic (CLIP) | "
          "harmonic (oracle) | both right | validity |")
    print("|---|---|---|---|---|---|---|---|---|")
    methods = [k for k in report[names[0]] if not k.startswith(("selection", "settings"))] if names else []
    lines, summary = [], {}
    for method in methods:
        rows = [report[n][method] for n in names if method in report.get(n, {})]
        if len(rows) == len(names):
            lines.append(f"| {method} | " + " | ".join(f"{np.mean([r[k] for r in rows]):.3f}" for k in keys) + " |")
            summary[method] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
            if all("per_image" in r for r in rows):   # oracle rates with 95% intervals over (subject, prompt)
                groups = np.concatenate([np.repeat(np.arange(25) + 100 * i, len(r["per_image"]["both_ok"]) // 25)
                                         for i, r in enumerate(rows)])
                for k in ("subject_ok", "both_ok"):
                    summary[method][k + "_ci"] = protocol.summarize(
                        np.concatenate([r["per_image"][k] for r in rows]), groups)
    print("\n".join(lines))
    # selection cost and quality: which checkpoint each validation would keep, and how it scores
    ratios, picks = [], []
    for n in names:
        cps = report.get(n, {}).get("selection")
        if not cps:
            continue
        ratios.append(sum(c["seconds_50"] for c in cps) / sum(c["seconds_4"] for c in cps))
        by4, by50 = max(cps, key=lambda c: c["val_4"]), max(cps, key=lambda c: c["val_50"])
        picks.append((n, by4["iteration"], by4["eval"]["harmonic_oracle"], by50["iteration"],
                      by50["eval"]["harmonic_oracle"]))
    if ratios:
        print(f"\nvalidation cost, 50-step ÷ 4-step (same run, same images): {np.mean(ratios):.1f}× "
              f"(per subject {', '.join(f'{r:.1f}' for r in ratios)})")
        print("| subject | 4-step pick | its harmonic (oracle, 1 img/prompt) | 50-step pick | its harmonic |")
        print("|---|---|---|---|---|")
        for n, i4, h4, i50, h50 in picks:
            print(f"| {n} | {i4} | {h4:.3f} | {i50} | {h50:.3f} |")
    if results and summary:
        cis = "\n".join(f"| {m} | {protocol.fmt(v['subject_ok_ci'])} | {protocol.fmt(v['both_ok_ci'])} |"
                         for m, v in summary.items() if "both_ok_ci" in v)
        markdown = (f"Subjects: {', '.join(names)}; means over subjects.\n\n| method | tiny-CLIP-I | oracle subject | "
                    "tiny-CLIP-T | oracle prompt | harmonic (CLIP) | harmonic (oracle) | both right | validity |\n"
                    "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines)
                    + "\n\nOracle rates with 95% intervals (bootstrap over subject x prompt):\n\n"
                      "| method | subject right | subject and prompt right |\n|---|---|---|\n" + cis)
        protocol.write_results("rpo_mini_dreambench", {"subjects": names, "methods": summary}, markdown, results)


if __name__ == "__main__":
    main()
