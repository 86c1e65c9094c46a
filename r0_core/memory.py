"""How much memory a generation or training request needs, and a guard that refuses (or chunks) requests above
what the device has free, with the estimate in the message.

The estimate is deliberately simple and on the safe side. Per image, inference holds a few dozen copies of the
UNet's largest feature map (the first block's channels at latent resolution; with CFG the batch doubles), and the
VAE decoder a few copies of its own at full image resolution, which is what dominates at large sizes (a
4096 x 4096 decode holds 128-channel maps of 16 M pixels). Attention is taken as memory-efficient (PyTorch's
scaled_dot_product_attention), so it adds no quadratic term. Training keeps what backpropagation through the K
checkpointed steps and the decoder needs: TRAIN_FACTOR times the inference figure, calibrated so that SD 1.5 at
512 px in bf16 comes out at the ~4.6 GB per image that benchmarks/r0_cost.py measured (at 256 px, scaled).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import checks
from .family import backbone

UNET_COPIES = 40     # copies of the UNet's largest feature map alive per image during one call
VAE_COPIES = 6       # copies of the decoder's full-resolution feature map alive per image
TRAIN_FACTOR = 9     # training / inference per image (see the module docstring)
HEADROOM = 0.9       # share of the free memory a request may plan to use
LIMIT_ENV = "R0_MEMORY_LIMIT_GB"   # overrides the free memory the guard plans with


def feature_width(net) -> int:
    """Channels per latent pixel of the backbone's largest feature map: a UNet's first block, or a transformer's
    hidden width spread over its patch's pixels."""
    config = net.config
    if "block_out_channels" in config:
        return config.block_out_channels[0]
    return config.num_attention_heads * config.attention_head_dim // config.patch_size ** 2


def per_image_bytes(pipe, height: int, width: int, *, cfg: bool, training: bool = False) -> int:
    """Estimated activation bytes per image of a request at height x width."""
    net = backbone(pipe)
    size = torch.finfo(net.dtype).bits // 8
    scale = pipe.vae_scale_factor
    unet = (height // scale) * (width // scale) * feature_width(net) * UNET_COPIES
    vae = height * width * pipe.vae.config.block_out_channels[0] * VAE_COPIES   # the full-resolution level
    total = (unet * (2 if cfg else 1) + vae) * size
    return total * (TRAIN_FACTOR if training else 1)


def available_bytes(device: torch.device) -> int:
    """Free memory of the device (CUDA: the driver's figure; else the system's available RAM), or LIMIT_ENV."""
    if os.environ.get(LIMIT_ENV):
        return int(float(os.environ[LIMIT_ENV]) * 2 ** 30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GB"


def images_per_chunk(pipe, batch: int, height: Optional[int], width: Optional[int], *, cfg: bool,
                     training: bool = False, what: str = "generation", limit: Optional[int] = None) -> int:
    """How many of `batch` images at height x width (None: the model's own size) fit at once (training: all must,
    or it is refused). Raises MemoryError naming the request, the estimate and the fix when not even one fits."""
    net = backbone(pipe)
    native = net.config.sample_size * pipe.vae_scale_factor
    height = checks.image_side("height", height, pipe.vae_scale_factor, native)
    width = checks.image_side("width", width, pipe.vae_scale_factor, native)
    need = per_image_bytes(pipe, height, width, cfg=cfg, training=training)
    have = int((available_bytes(net.device) if limit is None else limit) * HEADROOM)
    fits = have // max(need, 1)
    if fits >= batch or (fits >= 1 and not training):
        return min(batch, max(fits, 1))
    total = need * (batch if training else 1)
    raise MemoryError(
        f"{what} of {batch if training else 1} image(s) at {width}x{height} needs about {_gb(total)} "
        f"({_gb(need)} per image, estimated by r0_core.memory) but {_gb(have)} is free on {net.device}; "
        f"use a smaller width/height{' or batch_size' if training else ''}, a GPU with more memory, or set "
        f"{LIMIT_ENV} if the estimate is wrong for your setup")
