"""Finished benchmark work kept in the repository, under benchmarks/results/<bench>_runs/.

A long benchmark runs for hours in the background; the machine it runs on, and its out/ folder with the LoRAs,
images and caches, may not outlive the session. So each finished row or run also writes what its report needs
(per-image outcomes, training seconds, chosen settings) to a small JSON file here, to be committed as it lands,
and a rerun reads it back instead of recomputing. A record carries the settings it was made with (`key`): one
made with other settings, other weights or another judge is not reused.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from r0_core.files import atomic_write

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def path(bench: str, name: str) -> str:
    return os.path.join(ROOT, f"{bench}_runs", f"{name}.json")


def load(bench: str, name: str, key: dict) -> Optional[dict]:
    """The record `name` of `bench` if it was made with `key`, else None."""
    p = path(bench, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        record = json.load(f)
    if record.get("key") != _plain(key):
        print(f"{p} was made with other settings ({record.get('key')}); recomputing", flush=True)
        return None
    return record["value"]


def save(bench: str, name: str, key: dict, value) -> str:
    """Write the record atomically (numpy arrays become lists, floats keep 6 significant digits)."""
    p = path(bench, name)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    text = json.dumps({"key": _plain(key), "value": _plain(value)}, separators=(",", ":"))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(p, write)
    return p


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.6g}")
    if isinstance(value, np.integer):
        return int(value)
    return value
