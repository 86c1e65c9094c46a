"""Reference images of a subject: read from disk or from a ComfyUI IMAGE batch, made upright, RGB on white, and
fitted to the square (or h x w) crops a diffusion model is fine-tuned on. Tensors are float [.., 3, H, W] in 0..1."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
HIGH_BIT_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit greyscale PNG/TIFF, values 0..65535


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file as float [3, H, W] in 0..1, whatever its size, mode or EXIF orientation."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, inside the try, not later
            image = ImageOps.exif_transpose(image)  # phones store portraits sideways plus a rotation tag
    except Image.DecompressionBombError as e:
        raise ValueError(f"image file {path} is too large to open safely ({e}); reference photos need no more "
                         f"than a few megapixels: resize it") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image file {path} is unreadable or corrupt ({type(e).__name__}: {e}); expected a "
                         f"complete {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} image") from e
    try:
        return to_rgb_tensor(image)
    except ValueError as e:
        raise ValueError(f"image file {path}: {e}") from e


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode as float [3, H, W] in 0..1; transparency is composited onto white."""
    if image.mode == "F":   # 32-bit float greyscale (TIFF): values are meant as 0..1
        grey = np.array(image, dtype=np.float32)
        if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 1:
            raise ValueError(f"a 32-bit float image holds values from {grey.min():g} to {grey.max():g}; expected "
                             f"0..1: save it as an 8- or 16-bit image")
        return torch.from_numpy(grey).expand(3, -1, -1).clone()
    if image.mode in HIGH_BIT_GREY:
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535).clamp(0, 1)
        return grey.expand(3, -1, -1).clone()
    if _has_alpha(image):
        # Transparent pixels hold arbitrary (often black) colour; product shots are cut out onto white, so white
        # is what a person sees and what the subject should be learnt against, rather than a black halo.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _target(size: int | Sequence[int]) -> tuple[int, int]:
    target = (size, size) if isinstance(size, int) else tuple(size)
    if len(target) != 2 or not all(isinstance(s, int) and s > 0 for s in target):
        raise ValueError(f"size={size!r}; expected a positive int or (height, width)")
    return target


def fit(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize the shortest side to cover `size` (int, or (height, width)) with antialiased bicubic resampling,
    then centre-crop: the crops fine-tuning sees, keeping the subject (usually centred) and its aspect."""
    if not torch.is_tensor(images) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images has shape {shape}; expected float [3, H, W] or [N, 3, H, W] in 0..1")
    single = images.ndim == 3
    batch = (images[None] if single else images).float()
    (h, w), (height, width) = _target(size), batch.shape[-2:]
    scale = max(h / height, w / width)
    new_h, new_w = max(h, round(height * scale)), max(w, round(width * scale))
    if (new_h, new_w) != (height, width):
        batch = F.interpolate(batch, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        batch = batch.clamp(0, 1)  # bicubic overshoots at sharp edges
    top, left = (new_h - h) // 2, (new_w - w) // 2
    batch = batch[..., top:top + h, left:left + w]
    return batch[0] if single else batch


def image_files(folder: str | os.PathLike) -> list[str]:
    """The image files directly in `folder`, sorted by name (subfolders and other files are ignored)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} not found")
    files = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    skipped = [n for n in files if not n.lower().endswith(IMAGE_SUFFIXES)]
    if skipped:
        logger.warning("image folder %s: skipping %d file(s) that are not %s images: %s", folder, len(skipped),
                       "/".join(s[1:] for s in IMAGE_SUFFIXES), ", ".join(skipped[:5]) + (" ..." * (len(skipped) > 5)))
    return [os.path.join(folder, n) for n in files if n.lower().endswith(IMAGE_SUFFIXES)]


def load_references(paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
                    size: int | Sequence[int]) -> torch.Tensor:
    """Reference images [N, 3, h, w] fitted to `size`, from a folder (its images, sorted by name) or a list of
    files."""
    if isinstance(paths_or_folder, (str, os.PathLike)):
        source = os.fspath(paths_or_folder)
        paths = image_files(source) if os.path.isdir(source) else [source]
    else:
        source, paths = "the list of files", [os.fspath(p) for p in paths_or_folder]
    if not paths:
        raise ValueError(f"no reference images in {source}; expected at least one "
                         f"{'/'.join('*' + s for s in IMAGE_SUFFIXES)} file")
    target = _target(size)
    return torch.stack([fit(load_image(p), target) for p in paths])


def image_batch(images: torch.Tensor, size: Optional[int | Sequence[int]] = None) -> torch.Tensor:
    """A ComfyUI IMAGE batch [B, H, W, C] in 0..1 (C = 1 grey, 3 RGB, 4 RGBA) as [B, 3, h, w], alpha
    composited onto white as load_image does; fitted to `size` unless it is None."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"IMAGE has shape {shape}; expected a ComfyUI IMAGE batch [B, H, W, C] with C = 1, 3 or 4")
    batch = images.float().movedim(-1, 1)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    elif batch.shape[1] == 4:
        alpha = batch[:, 3:].clamp(0, 1)
        batch = batch[:, :3] * alpha + (1 - alpha)
    batch = batch.clamp(0, 1).contiguous()
    return batch if size is None else fit(batch, size)
