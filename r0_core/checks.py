"""Input checks shared by the samplers, trainers, scorers and nodes: each raises ValueError naming the input, the
value it got and what it expects, before any work starts."""
from __future__ import annotations

import math
from typing import Optional

import torch

MAX_SEED = 2 ** 63 - 1   # torch.Generator.manual_seed takes a signed 64-bit integer; ComfyUI's seed widget stops here
LORA_TARGETS = ("attention", "all")


def number(name: str, value, low: Optional[float] = None, high: Optional[float] = None, *,
           low_open: bool = False) -> float:
    """A finite real number within [low, high] (low excluded when low_open)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
                  f"<= {high:g}" if high is not None else ""]
        raise ValueError(f"{name}={value!r}; expected a finite number {' and '.join(b for b in bounds if b)}".rstrip())
    return float(value)


def whole(name: str, value, low: int = 1, high: Optional[int] = None) -> int:
    """A whole number (int, or a float with no fraction such as 32.0) within [low, high]."""
    integral = isinstance(value, int) or isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if isinstance(value, bool) or not integral or value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name}={value!r}; expected a whole number >= {low}{upper}")
    return int(value)


def seed(value, name: str = "seed") -> int:
    return whole(name, value, 0, MAX_SEED)


def image_side(name: str, value: Optional[int], multiple: int, default: int) -> int:
    """height or width in pixels: None is the model's own size; otherwise a positive multiple of the VAE's
    downscale factor."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % multiple:
        raise ValueError(f"{name}={value!r}; expected a positive whole multiple of {multiple}, or None for the "
                         f"model's own size ({default})")
    return value


def lora_targets(value: str, name: str = "lora_targets") -> str:
    if value not in LORA_TARGETS:
        raise ValueError(f"{name}={value!r}; expected one of {LORA_TARGETS} (see r0_core.lora)")
    return value


def unit_range(name: str, images: torch.Tensor, tolerance: float = 1e-2) -> None:
    """Float images in 0..1 (a little overshoot allowed): catches 0..255 and -1..1 images before they are scored
    or trained on as if they were 0..1."""
    if not torch.is_tensor(images) or not images.is_floating_point():
        kind = images.dtype if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} are {kind}; expected float images in 0..1 (for uint8 images divide by 255)")
    if images.numel() == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(images.shape)}); pass at least one image")
    low, high = images.detach().aminmax()
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError(f"{name} contain NaN or inf; check what produced them")
    if low < -tolerance or high > 1 + tolerance:
        hint = ("they look like 0..255 values: divide by 255" if high > 2 else
                "they look like -1..1 values: use (x + 1) / 2" if low < -0.5 else "clamp them to 0..1")
        raise ValueError(f"{name} range from {low.item():.3g} to {high.item():.3g}; expected 0..1 ({hint})")


def prompts_fit(tokenizer, prompts, name: str = "prompts") -> None:
    """Every prompt within the text encoder's token limit: a trainer must not learn from a silently cut prompt."""
    limit = tokenizer.model_max_length
    for prompt in prompts:
        count = len(tokenizer(prompt).input_ids)   # with the start and end tokens, as the encoder sees them
        if count > limit:
            raise ValueError(f"{name}: {prompt!r} is {count} tokens long, past the text encoder's limit of {limit} "
                             f"(start and end included); shorten it, since the encoder would drop the end")
