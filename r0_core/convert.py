"""Convert a diffusers Stable-Diffusion-1.x pipeline to the original single-file layout.

The original (LDM / CompVis) layout is the one of ``v1-5-pruned-emaonly.safetensors``:
one flat state dict with three prefixes,

* ``model.diffusion_model.*``  - the UNet (input_blocks / middle_block / output_blocks),
* ``first_stage_model.*``      - the VAE (encoder.down / decoder.up / mid.block_1 ...),
* ``cond_stage_model.transformer.text_model.*`` - the CLIP text encoder.

We write this layout because it is what ComfyUI's CheckpointLoader and diffusers'
``StableDiffusionPipeline.from_single_file`` read, so one file works in both.

The mapping is built from the modules' actual structure (number of blocks, resnets
per block, which blocks carry attention), not from a hard-coded SD1.5 table, so small
or unusual configs convert too.  Any key we do not know how to map raises instead of
being silently dropped.
"""

from __future__ import annotations

import os

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# Resnet sub-module names: diffusers -> LDM.  The UNet ResBlock keeps its layers in
# nn.Sequential containers (norm, act, conv), hence the numeric indices.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_tail(tail: str, table: dict[str, str]) -> str:
    """Rename the leading sub-module of ``tail`` (e.g. 'norm1.weight') using ``table``."""
    for old, new in table.items():
        if tail.startswith(old + "."):
            return new + tail[len(old):]
    return tail


def _apply(sd: dict, prefixes: dict[str, tuple[str, dict | None]]) -> dict:
    """Map every key of ``sd`` through the longest matching diffusers prefix."""
    ordered = sorted(prefixes, key=len, reverse=True)  # most specific prefix wins
    out = {}
    for key, value in sd.items():
        src = next((p for p in ordered if key.startswith(p)), None)
        if src is None:
            raise ValueError(f"no original-layout mapping for diffusers key {key!r}")
        dst, table = prefixes[src]
        tail = key[len(src):]
        out[dst + (_rename_tail(tail, table) if table else tail)] = value
    return out


def _has_attn(block) -> bool:
    return bool(getattr(block, "attentions", None))


def _number_entries(p: dict, name: str, block, original: str, n: int) -> int:
    """Map a block's (resnet[, attention]) pairs to consecutive `original.n` entries; returns the next n."""
    for i in range(len(block.resnets)):
        p[f"{name}.resnets.{i}."] = (f"{original}.{n}.0.", _UNET_RESNET)
        if _has_attn(block):
            p[f"{name}.attentions.{i}."] = (f"{original}.{n}.1.", None)
        n += 1
    return n


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel -> ``model.diffusion_model.*`` keys."""
    p: dict[str, tuple[str, dict | None]] = {
        "time_embedding.linear_1.": ("time_embed.0.", None),
        "time_embedding.linear_2.": ("time_embed.2.", None),
        "conv_in.": ("input_blocks.0.0.", None),
        "conv_norm_out.": ("out.0.", None),
        "conv_out.": ("out.2.", None),
    }
    # input_blocks: one entry per (resnet[, attention]) pair, then one per downsampler.
    n = 1
    for b, block in enumerate(unet.down_blocks):
        n = _number_entries(p, f"down_blocks.{b}", block, "input_blocks", n)
        if block.downsamplers:
            p[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{n}.0.op.", None)
            n += 1
    # middle_block is a flat sequence in forward order: resnet, attention, resnet.
    mid = unet.mid_block
    if mid is not None:
        step = 2 if _has_attn(mid) else 1
        for i in range(len(mid.resnets)):
            p[f"mid_block.resnets.{i}."] = (f"middle_block.{step * i}.", _UNET_RESNET)
        for i in range(len(mid.attentions) if _has_attn(mid) else 0):
            p[f"mid_block.attentions.{i}."] = (f"middle_block.{2 * i + 1}.", None)
    # output_blocks: the upsampler lives inside the block's last entry, after the attention.
    n = 0
    for b, block in enumerate(unet.up_blocks):
        n = _number_entries(p, f"up_blocks.{b}", block, "output_blocks", n)
        if block.upsamplers:
            slot = 2 if _has_attn(block) else 1
            p[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{n - 1}.{slot}.conv.", None)
    return _apply(unet.state_dict(), p)


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL -> ``first_stage_model.*`` keys (without the prefix)."""
    p: dict[str, tuple[str, dict | None]] = {}
    for name in ("quant_conv", "post_quant_conv"):
        p[name + "."] = (name + ".", None)
    for part in ("encoder", "decoder"):
        for name, orig in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            p[f"{part}.{name}."] = (f"{part}.{orig}.", None)
        mid = getattr(vae, part).mid_block
        for i in range(len(mid.resnets)):
            p[f"{part}.mid_block.resnets.{i}."] = (f"{part}.mid.block_{i + 1}.", None)
        p[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTN)
    for b, block in enumerate(vae.encoder.down_blocks):
        p[f"encoder.down_blocks.{b}.resnets."] = (f"encoder.down.{b}.block.", None)
        p[f"encoder.down_blocks.{b}.downsamplers.0."] = (f"encoder.down.{b}.downsample.", None)
    # The original decoder indexes up blocks from the lowest resolution upward, i.e. reversed.
    n_up = len(vae.decoder.up_blocks)
    for b in range(n_up):
        p[f"decoder.up_blocks.{b}.resnets."] = (f"decoder.up.{n_up - 1 - b}.block.", None)
        p[f"decoder.up_blocks.{b}.upsamplers.0."] = (f"decoder.up.{n_up - 1 - b}.upsample.", None)
    out = _apply(vae.state_dict(), p)
    # The VAE ResnetBlock kept diffusers' names except the shortcut conv.
    out = {k.replace(".conv_shortcut.", ".nin_shortcut."): v for k, v in out.items()}
    # The original mid attention uses 1x1 convs where diffusers uses Linear layers.
    for k, v in out.items():
        if ".mid.attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            out[k] = v.reshape(*v.shape, 1, 1)
    return out


def text_encoder_to_original(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> ``text_model.*``-relative keys.

    transformers >= 5 flattened CLIPTextModel, so its state_dict may lack the
    ``text_model.`` level that older versions (and the original file) have.
    """
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def pipeline_to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Whole SD1.x pipeline (unet, vae, text_encoder) -> one original-layout state dict."""
    out: dict[str, torch.Tensor] = {}
    parts = (
        (UNET_PREFIX, unet_to_original(pipe.unet)),
        (VAE_PREFIX, vae_to_original(pipe.vae)),
        (CLIP_PREFIX, text_encoder_to_original(pipe.text_encoder)),
    )
    for prefix, sd in parts:
        for k, v in sd.items():
            # safetensors refuses non-contiguous views and autograd-tracked tensors.
            out[prefix + k] = v.detach().contiguous()
    return out


def save_original_checkpoint(pipe, path: str | os.PathLike) -> str:
    """Write ``pipe`` as an original-layout .safetensors file; returns the path.

    Written to ``path + '.tmp'`` and then renamed, so a crash never leaves a
    truncated checkpoint under the final name.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = {k: v.cpu() for k, v in pipeline_to_original_state_dict(pipe).items()}
    tmp = path + ".tmp"
    try:
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
