"""Which β? `python benchmarks/rpo_beta.py` trains RPO on validation data only, for each β of --betas, and reports
how large βΔ grows (mean |βΔ| over each step's pairs), what L_pref and L_sim do, and the best λ_val-Harmonic
validation reward on the subjects' validation prompts. The preference term regularises while |βΔ| stays well
under 1 (the logistic loss is then near ln 2 and its gradient near its largest); once |βΔ| passes 1 the loss
saturates and the term either stops acting or, on a falling L_sim's way, dominates. The test prompts are never
sampled here, so β can be chosen from these figures.

The rule (written while the sweep ran, after three of its eight runs, ring_circle at β 0.5, 1 and 2, had been
read): among the β whose 90th percentile of mean |βΔ| stays under REGULARISING on every subject, the one with
the highest best validation score averaged over the subjects.

Subjects: --subjects of r0_core/tiny/subjects.py (default: the first two); training seed 0; the mini DreamBench's
steps, learning rate and rank. Runs are resumable folders under --out. Writes benchmarks/results/rpo_beta.json/.md.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import load_reward
from r0_core.tiny import protocol, subjects
from rpo_core.train import RPOConfig, train_rpo

ALL = subjects.SUBJECTS + subjects.MORE_SUBJECTS
REGULARISING = 1.0   # |βΔ| below this: the logistic loss is still near its ln 2 and its gradient near its largest


def choose(rows: list[dict]) -> dict:
    """β by the rule above; {"beta": None, ...} when no β stays in the regularising range."""
    betas = sorted({r["beta"] for r in rows})
    kept = [b for b in betas if all(r["beta_delta_p90"] < REGULARISING for r in rows if r["beta"] == b)]
    score = {b: float(np.mean([r["best_validation"] for r in rows if r["beta"] == b])) for b in betas}
    return {"beta": max(kept, key=score.get) if kept else None, "regularising": kept, "mean_best_validation": score}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--subjects", nargs="+", default=[s.name for s in ALL[:2]])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=RPOConfig.lora_rank)
    parser.add_argument("--validate-every", type=int, default=30)
    parser.add_argument("--out", default="out/benchmarks/rpo_beta")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scorer = load_reward("clip", TINY)
    rows = []
    for subject in [s for s in ALL if s.name in args.subjects]:
        references = torch.from_numpy(subjects.references(subject)).permute(0, 3, 1, 2).float()
        for beta in args.betas:
            config = RPOConfig(token=subject.token, class_name=subject.shape,
                               prompts=subjects.training_prompts(subject),
                               validation_prompts=subjects.validation_prompts(subject), iterations=args.iterations,
                               lr=args.lr, lora_rank=args.rank, beta=beta, validate_every=args.validate_every)
            result = train_rpo(load_pipeline(TINY), scorer, references, config,
                               os.path.join(args.out, f"{subject.name}-beta{beta:g}"))
            h = result.history
            bd = np.array([x["beta_delta"] for x in h])
            rows.append({"subject": subject.name, "beta": beta, "beta_delta_median": float(np.median(bd)),
                         "beta_delta_p90": float(np.percentile(bd, 90)), "beta_delta_last50": float(bd[-50:].mean()),
                         "l_pref_first50": float(np.mean([x["l_pref"] for x in h[:50]])),
                         "l_pref_last50": float(np.mean([x["l_pref"] for x in h[-50:]])),
                         "l_sim_first50": float(np.mean([x["l_sim"] for x in h[:50]])),
                         "l_sim_last50": float(np.mean([x["l_sim"] for x in h[-50:]])),
                         "best_validation": result.best_score, "best_iteration": result.best_iteration,
                         "validations": [(v["iteration"], v["score"]) for v in result.validations]})
            print(rows[-1], flush=True)
    lines = [f"RPO at lr {args.lr:g}, LoRA rank {args.rank}, {args.iterations} steps, training seed 0, for each β; "
             f"validation prompts only (λ_val 0.5, every {args.validate_every} steps). |βΔ|: the mean over a step's "
             f"pairs; median and 90th percentile over steps, and the mean of the last 50 steps.", "",
             "| subject | β | mean abs βΔ: median | p90 | last 50 | L_pref first/last 50 | L_sim first/last 50 | "
             "best validation (step) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['beta']:g} | {r['beta_delta_median']:.3f} | {r['beta_delta_p90']:.3f} | "
                     f"{r['beta_delta_last50']:.3f} | {r['l_pref_first50']:.3f} / {r['l_pref_last50']:.3f} | "
                     f"{r['l_sim_first50']:.3f} / {r['l_sim_last50']:.3f} | {r['best_validation']:.4f} "
                     f"({r['best_iteration']}) |")
    chosen = choose(rows)
    lines += ["", f"Regularising (p90 of mean |βΔ| < {REGULARISING:g} on every subject): "
                  f"{', '.join(f'{b:g}' for b in chosen['regularising']) or 'none'}. Mean best validation score: "
                  + ", ".join(f"β {b:g}: {v:.4f}" for b, v in chosen["mean_best_validation"].items())
                  + f". Chosen by the rule: **β = {chosen['beta']:g}**." if chosen["beta"] is not None else
              "No β stays in the regularising range: lower the learning rate or widen the sweep."]
    text = "\n".join(lines)
    paths = protocol.write_results("rpo_beta", {"settings": vars(args), "rows": rows, "chosen": chosen}, text,
                                   out=args.results)
    print(text + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
