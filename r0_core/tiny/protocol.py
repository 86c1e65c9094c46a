"""The one measurement protocol of the tiny world, used by every benchmark.

Split (fixed, written once): the held-out captions of each kind (`world.prompt_split`) are sorted by the SHA-256
of their text and dealt alternately to a **validation** half (1st, 3rd, 5th, ...) and a **test** half (2nd, 4th,
...). Settings, checkpoints and early stops are chosen on validation captions only; only test captions are
reported. The rule depends on the caption texts alone, so the halves are stable whatever else changes.

Cells: every caption of a half x `SEEDS` noise seeds (image i of a cell starts from seed `seed + i`, so two
settings measured on the same cell see the same prompts and the same noise). An accuracy carries a 95% interval
from a bootstrap over captions (captions resampled with replacement, each with all its images), and a comparison
of two settings is the paired difference of their per-caption means, bootstrapped the same way.

Results: `write_results` puts `benchmarks/results/<name>.json` and `.md` side by side, both naming the command and
the commit that produced them; the README quotes those files.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np

from . import world

SEEDS = 8              # noise seeds per caption in a reported cell
BOOTSTRAP = 2000       # bootstrap resamples for every interval
HALVES = ("validation", "test")
KINDS = ("positioned", "pair")   # the kinds with held-out captions: one object with a position, two objects


def split(kind: str) -> dict[str, list[str]]:
    """The validation and test halves of a kind's held-out captions."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} has no held-out captions; expected one of {KINDS}")
    held = sorted((world.caption(s) for s in world.prompt_split(kind)[1]),
                  key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    return {"validation": held[0::2], "test": held[1::2]}


def captions(kind: str, half: str) -> list[str]:
    if half not in HALVES:
        raise ValueError(f"half {half!r} is not one of {HALVES}: choose settings on 'validation', report 'test'")
    return split(kind)[half]


def cell(kind: str, half: str, seeds: int = SEEDS) -> tuple[list[str], np.ndarray]:
    """The prompts of a cell (each caption of the half `seeds` times, caption-major) and each image's caption
    index, the group the bootstrap resamples."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds} must be at least 1 (reported cells use {SEEDS} or more)")
    texts = captions(kind, half)
    return [t for t in texts for _ in range(seeds)], np.repeat(np.arange(len(texts)), seeds)


def _caption_means(values, groups) -> np.ndarray:
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    if values.shape != groups.shape or values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values {values.shape} and groups {groups.shape} must be equal-length, non-empty 1-d")
    ids, inverse = np.unique(groups, return_inverse=True)
    return np.bincount(inverse, weights=values) / np.bincount(inverse)


def _bootstrap(means: np.ndarray, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = means[rng.integers(0, len(means), (BOOTSTRAP, len(means)))].mean(1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def resample_captions(statistic, groups, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of any `statistic(index)` of a cell's images (a correlation, say), resampling
    captions with all their images as `summarize` does for a mean; draws where the statistic is NaN are dropped."""
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))]))
                      for _ in range(BOOTSTRAP)], dtype=np.float64)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def summarize(values, groups, seed: int = 0) -> dict:
    """Mean of per-image values (1/0 verdicts, or scores) with a 95% bootstrap interval over captions. Every
    caption has the same number of images in a cell, so the mean of caption means is the image mean."""
    means = _caption_means(values, groups)
    low, high = _bootstrap(means, seed)
    return {"mean": float(means.mean()), "low": low, "high": high, "images": len(np.asarray(values)),
            "captions": len(means)}


def paired(a, b, groups, seed: int = 0) -> dict:
    """Difference a - b of two settings measured on the same images' prompts and seeds, with its 95% interval
    from a bootstrap over captions (the pairing removes the captions' own difficulty from the interval)."""
    diff = _caption_means(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), groups)
    low, high = _bootstrap(diff, seed)
    return {"diff": float(diff.mean()), "low": low, "high": high, "captions": len(diff)}


def across_seeds(means: Sequence[float]) -> dict:
    """Mean and spread (sample standard deviation, min, max) of one figure over training seeds."""
    m = np.asarray(means, dtype=np.float64)
    if len(m) < 2:
        raise ValueError(f"got {len(m)} training seed(s); a trained row that carries a claim needs at least 2")
    return {"mean": float(m.mean()), "std": float(m.std(ddof=1)), "min": float(m.min()), "max": float(m.max()),
            "seeds": len(m)}


def fmt(summary: dict, percent: bool = True) -> str:
    """'21.3% [17.0, 25.9]' for a summary, '+2.1 [-0.4, 4.6]' (points) for a paired difference."""
    scale = 100 if percent else 1
    if "diff" in summary:
        return f"{summary['diff'] * scale:+.1f} [{summary['low'] * scale:+.1f}, {summary['high'] * scale:+.1f}]"
    unit = "%" if percent else ""
    return f"{summary['mean'] * scale:.1f}{unit} [{summary['low'] * scale:.1f}, {summary['high'] * scale:.1f}]"


def provenance(argv: Optional[Sequence[str]] = None) -> dict:
    """The command and the commit behind a result (the commit is marked '+changes' if the tree was dirty)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = os.path.relpath(os.path.abspath(argv[0]), root)
    return {"command": "python " + " ".join(argv), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_results(name: str, results: dict, markdown: str, out: str = "benchmarks/results",
                  argv: Optional[Sequence[str]] = None) -> tuple[str, str]:
    """Write <out>/<name>.json (results plus provenance) and <out>/<name>.md (the markdown under a header with
    the command and commit), each atomically. Returns both paths."""
    os.makedirs(out, exist_ok=True)
    meta = provenance(argv)
    paths = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")
    texts = (json.dumps({"provenance": meta, **results}, indent=1),
             f"# {name}\n\nCommand: `{meta['command']}`  \nCommit: `{meta['commit']}`, {meta['date']}\n\n"
             f"{markdown.strip()}\n")
    for path, text in zip(paths, texts):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return paths
