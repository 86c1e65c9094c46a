"""The NFE picture: oracle accuracy against UNet evaluations per image, one panel per kind of held-out caption:
`python benchmarks/nfe_plot.py` (reads and writes benchmarks/results; --results for another folder).

Every `<results>/*.json` with a top-level key "nfe_curve" contributes its series. The schema:

    "nfe_curve": [                        # a list of series
      {"label": "base, R0 sampler η=0, CFG 2",   # the legend entry; the same label is the same colour in each panel
       "kind": "pair",                     # a protocol kind: "positioned" or "pair"
       "points": [                         # one per setting, any order (drawn sorted by nfe)
         {"nfe": 8,                        # UNet evaluations per image (CFG counts 2 a step)
          "mean": 0.21,                    # oracle accuracy (`correct`) on the test half, a fraction
          "low": 0.17, "high": 0.25}]}]    # its 95% interval; a trained row: the mean over training seeds and
                                           # the envelope of their intervals (`envelope`)

To add a row from another benchmark, append `series(label, kind, [(nfe, summary), ...])` (a summary being
`protocol.summarize(...)` or any dict with mean/low/high) to its results' "nfe_curve" before
`protocol.write_results`, then rerun this script. Drawn with a log NFE axis and the intervals as bars; the series
of a panel are drawn a few per cent apart along NFE so that bars at the same NFE stay visible.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

KINDS = ("positioned", "pair")   # r0_core.tiny.protocol.KINDS, in panel order
TITLES = {"positioned": "one object + position", "pair": "two objects + relation"}


def series(label: str, kind: str, points) -> dict:
    """A series of the schema from (nfe, summary) pairs, each summary with mean, low and high."""
    return {"label": label, "kind": kind,
            "points": [{"nfe": int(n), "mean": s["mean"], "low": s["low"], "high": s["high"]} for n, s in points]}


def envelope(summaries) -> dict:
    """One point for a trained row from its seeds' summaries: the mean over seeds, and the envelope of their
    intervals (so the bar holds both the sampling noise and the spread over training seeds)."""
    summaries = list(summaries)
    return {"mean": sum(s["mean"] for s in summaries) / len(summaries), "low": min(s["low"] for s in summaries),
            "high": max(s["high"] for s in summaries)}


def check(entry: dict, source: str) -> dict:
    """One series, checked against the schema; the error names the file and what is wrong."""
    if not isinstance(entry, dict) or not {"label", "kind", "points"} <= set(entry):
        raise ValueError(f"{source}: nfe_curve entry {entry!r} needs 'label', 'kind' and 'points' (see the schema "
                         f"in benchmarks/nfe_plot.py)")
    if entry["kind"] not in KINDS:
        raise ValueError(f"{source}: series {entry['label']!r} has kind {entry['kind']!r}; expected one of {KINDS}")
    for p in entry["points"]:
        complete = {"nfe", "mean", "low", "high"} <= set(p)
        if not complete or p["nfe"] < 1 or not p["low"] - 1e-9 <= p["mean"] <= p["high"] + 1e-9:  # float slack
            raise ValueError(f"{source}: series {entry['label']!r} has point {p!r}; expected nfe >= 1 and "
                             f"low <= mean <= high")
    return entry


def load_curves(folder: str) -> list[dict]:
    """Every series of every results file in `folder`, files in name order."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        out += [check(entry, path) for entry in (data.get("nfe_curve", []) if isinstance(data, dict) else [])]
    return out


def plot(curves: list[dict], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = list(dict.fromkeys(c["label"] for c in curves))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    markers = {label: "osD^vPX"[i % 7] for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(KINDS), figsize=(11, 4.2), sharey=True)
    for axis, kind in zip(axes, KINDS):
        panel = [c for c in curves if c["kind"] == kind]
        for j, c in enumerate(panel):
            points = sorted(c["points"], key=lambda p: p["nfe"])
            shift = 1.04 ** (j - (len(panel) - 1) / 2)  # series drawn slightly apart: bars at one NFE stay visible
            x, y = [p["nfe"] * shift for p in points], [100 * p["mean"] for p in points]
            bars = [[100 * (p["mean"] - p["low"]) for p in points], [100 * (p["high"] - p["mean"]) for p in points]]
            axis.errorbar(x, y, yerr=bars, label=c["label"], color=colours[c["label"]], marker=markers[c["label"]], markersize=4,
                          capsize=3, linewidth=1.2)
        axis.set_xscale("log")
        ticks = sorted({p["nfe"] for c in curves if c["kind"] == kind for p in c["points"]})
        shown = ticks[:1]
        for t in ticks[1:]:
            shown += [t] if t / shown[-1] > 1.25 else []  # closer labels would overlap
        axis.set_xticks(shown, [str(t) for t in shown])
        axis.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)  # every point inside, labelled or not
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_title(TITLES[kind])
        axis.set_xlabel("NFE (UNet evaluations per image)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("oracle accuracy, test captions (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    for axis in axes[1:]:  # one legend for all panels, with every label once
        for h, label in zip(*axis.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(len(labels), 1)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results", help="folder of the results json files")
    parser.add_argument("--out", help="the PNG (default <results>/nfe.png)")
    args = parser.parse_args(argv)
    curves = load_curves(args.results)
    if not curves:
        raise SystemExit(f"no results file in {args.results} has an 'nfe_curve'; run benchmarks/tiny_quality.py "
                         f"first (or pass --results)")
    path = plot(curves, args.out or os.path.join(args.results, "nfe.png"))
    print(f"wrote {path} ({len(curves)} series)")


if __name__ == "__main__":
    main()
