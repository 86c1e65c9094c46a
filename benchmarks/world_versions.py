"""Is the rebuilt world's base model at least as good as the one before it, on the same captions?
`python benchmarks/world_versions.py --before <folder of the earlier tiny-sd pipeline>`

The earlier pipeline is any saved tiny-sd folder, e.g. the first world's weights from git:
    mkdir -p out/world_v1 && git archive d19c5bf^ r0_core/tiny/weights/tiny-sd | tar -x -C out/world_v1
Both pipelines sample the test half of the held-out captions (r0_core.tiny.protocol) x --seeds seeds from the
same noise (the R0 sampler at η = 0, --steps steps, CFG --guidance, tiny_quality.py's cells and cache); reported:
each one's accuracy with its 95% interval and the paired difference after − before. `--after` compares two build
folders instead of the shipped one (`--half validation` to choose between build settings). Caveat written into the
results: a caption the earlier world trained on favours it (the first world held out every 7th caption of each
kind, the rebuilt one every 7th pair, as before, and every 3rd positioned caption).
"""
from __future__ import annotations

import argparse
import os

import torch

from r0_core.loading import TINY, TINY_PIPELINE_DIR, load_pipeline
from r0_core.tiny import protocol
from tiny_quality import FIELDS, Setting, measure, summaries, weights_fingerprint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="folder of the earlier tiny-sd pipeline")
    parser.add_argument("--after", default=TINY, help="the pipeline to compare with it (default: the shipped one)")
    parser.add_argument("--half", default="test", choices=protocol.HALVES,
                        help="validation to choose between build settings, test to report")
    parser.add_argument("--name", default="world_versions", help="results file name")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, default=protocol.SEEDS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="out/benchmarks/tiny_quality")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = Setting("r0", args.steps, args.guidance)
    cells = {}
    after = TINY_PIPELINE_DIR if args.after == TINY else args.after
    for name, model, folder in (("after", args.after, after), ("before", args.before, args.before)):
        pipe = load_pipeline(model)
        cache = os.path.join(args.cache, weights_fingerprint(folder))
        make = lambda prompts, seed: setting.sample(pipe, prompts, seed, 128)  # noqa: E731
        cells[name] = {k: measure(make, k, args.half, args.seeds, cache, setting.key) for k in protocol.KINDS}
    groups = {k: protocol.cell(k, args.half, args.seeds)[1] for k in protocol.KINDS}
    report = {"settings": {"steps": args.steps, "guidance": args.guidance, "seeds": args.seeds, "half": args.half,
                           "before": args.before, "after": args.after},
              "cells": {n: {k: summaries(c[k], groups[k]) for k in protocol.KINDS} for n, c in cells.items()},
              "paired": {k: {f: protocol.paired(cells["after"][k][f], cells["before"][k][f], groups[k])
                             for f in FIELDS} for k in protocol.KINDS}}
    lines = [f"Base models, {setting.label}, {args.half} half x {args.seeds} seeds, the same noise; 95% bootstrap intervals "
             f"over captions. The pair captions were held out by both worlds; most positioned test captions were "
             f"training captions of the earlier world (it held out every 7th, the rebuilt one every 3rd), which "
             f"favours the earlier one there.", "",
             f"`--before {args.before}` against `--after {args.after}`.", "",
             "| kind | figure | before | after | after − before (points) |", "|---|---|---|---|---|"]
    for k in protocol.KINDS:
        for f in FIELDS:
            lines.append(f"| {k} | {f} | {protocol.fmt(report['cells']['before'][k][f])} | "
                         f"{protocol.fmt(report['cells']['after'][k][f])} | {protocol.fmt(report['paired'][k][f])} |")
    text = "\n".join(lines)
    paths = protocol.write_results(args.name, report, text, out=args.results)
    print(text + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
