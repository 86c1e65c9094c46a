"""Sample a pipeline on tiny-world prompts and score the images with the oracle."""
from __future__ import annotations

import random

import numpy as np
import torch
from tqdm import tqdm

from ..generate import generate
from . import oracle, world


def eval_prompts(kind: str, n: int, seed: int = 0, held_out: bool = True) -> list[str]:
    """n captions of one kind ('positioned' or 'pair' for held-out sets), cycling through the whole set in a
    seeded order so every held-out caption is used before any repeats."""
    scenes = world.prompt_split(kind)[1 if held_out else 0]
    if not scenes:
        raise ValueError(f"kind {kind!r} has no {'held-out' if held_out else 'training'} captions")
    order = list(scenes)
    random.Random(seed).shuffle(order)
    return [world.caption(order[i % len(order)]) for i in range(n)]


def sample_images(pipe, prompts: list[str], *, steps: int, guidance: float, seed: int = 0, batch_size: int = 64,
                  progress: bool = True) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] from a diffusers SD pipeline; image i starts from noise seeded
    seed + i, so its noise does not depend on the batch it falls in."""
    pipe.set_progress_bar_config(disable=True)
    batches = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(batches) * steps, desc=f"{steps}-step sampling", unit="step", disable=not progress)

    def on_step_end(pipeline, step, timestep, kwargs):
        bar.update(1)
        return kwargs

    out = []
    for start in batches:
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, output_type="np",
                      callback_on_step_end=on_step_end)
        out.append(result.images)
    bar.close()
    return np.concatenate(out)


def r0_images(pipe, prompts: list[str], *, steps: int, guidance: float, eta: float = 0.0, seed: int = 0,
              batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Like `sample_images`, with the R0 few-step sampler instead of the pipeline's scheduler."""
    bar = tqdm(total=-(-len(prompts) // batch_size) * steps, desc=f"{steps}-step R0 sampler", unit="step",
               disable=not progress)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            images, _ = generate(pipe, chunk, steps=steps, eta=eta, guidance=guidance,
                                 seeds=[seed + start + i for i in range(len(chunk))],
                                 callback=lambda info: bar.update(1))
            out.append(images.permute(0, 2, 3, 1).float().numpy())
    bar.close()
    return np.concatenate(out)


def grid(images: np.ndarray, columns: int, scale: int = 4) -> np.ndarray:
    """A uint8 grid of images [N, H, W, 3], enlarged `scale` times without smoothing, 2 px apart."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    pad = 2
    canvas = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        big = np.repeat(np.repeat(np.clip(im * 255 + 0.5, 0, 255).astype(np.uint8), scale, 0), scale, 1)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = big
    return canvas


def evaluate(pipe, kind: str, n: int, *, steps: int, guidance: float, seed: int = 0, progress: bool = True):
    """Oracle accuracy of n samples on held-out captions of one kind; returns (metrics, images, prompts)."""
    prompts = eval_prompts(kind, n, seed)
    images = sample_images(pipe, prompts, steps=steps, guidance=guidance, seed=seed, progress=progress)
    return oracle.accuracy(images, prompts), images, prompts
