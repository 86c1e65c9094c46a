"""Atomic saves: a file is either the old one or the complete new one, never half written."""
from __future__ import annotations

import os
from typing import Callable

import torch


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call write(tmp) on a temporary path in the same folder, then move it over `path` in one step."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj, path: str) -> str:
    """torch.save, atomically; read back with torch.load(path, weights_only=True)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
