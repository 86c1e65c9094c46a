"""Convert a diffusers Stable-Diffusion-1.x, SDXL or SD3 pipeline to the original single-file layout.

The original (LDM / CompVis) layout is the one of ``v1-5-pruned-emaonly.safetensors``:
one flat state dict with three prefixes,

* ``model.diffusion_model.*``  - the UNet (input_blocks / middle_block / output_blocks),
* ``first_stage_model.*``      - the VAE (encoder.down / decoder.up / mid.block_1 ...),
* ``cond_stage_model.transformer.text_model.*`` - the CLIP text encoder.

SDXL's (``sd_xl_base_1.0.safetensors``) keeps the UNet and VAE prefixes (the UNet's added embedding of pooled text
and size ids as ``label_emb.0``) and has

* ``conditioner.embedders.0.transformer.text_model.*`` - CLIP ViT-L, in transformers' own key names,
* ``conditioner.embedders.1.model.*`` - OpenCLIP ViT-bigG in OpenCLIP's names (``transformer.resblocks.N`` with
  fused ``attn.in_proj_*``, ``ln_final``, ``text_projection`` stored transposed).

SD3's (``sd3_medium_incl_clips*.safetensors``) keeps the VAE prefix and has

* ``model.diffusion_model.*``  - the MMDiT (x_embedder, t_embedder, y_embedder, context_embedder, pos_embed,
  joint_blocks.N.{x_block,context_block}.{attn.qkv, attn.proj, adaLN_modulation.1, mlp.fc1/fc2}, final_layer),
* ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` - the text encoders, in transformers' own key names.

We write these layouts because they are what ComfyUI's CheckpointLoader and diffusers'
``from_single_file`` read, so one file works in both.

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
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

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
    if getattr(unet, "add_embedding", None) is not None:   # SDXL: pooled text + size ids
        p["add_embedding.linear_1."] = ("label_emb.0.0.", None)
        p["add_embedding.linear_2."] = ("label_emb.0.2.", None)
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


def open_clip_text_to_original(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP's text-tower keys: the exact inverse of diffusers'
    ``convert_open_clip_checkpoint`` (q, k, v fused into in_proj; the projection transposed)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    sd.pop("embeddings.position_ids", None)   # a buffer, rebuilt by the reader
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(text_encoder.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{ours}self_attn.{x}_proj.{kind}") for x in "qkv"])
            for old, new in names.items():
                out[f"{theirs}{new}.{kind}"] = sd.pop(f"{ours}{old}.{kind}")
    if sd:
        raise ValueError(f"no OpenCLIP mapping for text_encoder_2 key {sorted(sd)[0]!r}")
    return out


def pipeline_to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Whole SD1.x pipeline (unet, vae, text_encoder), or an SDXL or SD3 one, -> one original-layout state dict."""
    if _is_sd3(pipe):
        return sd3_pipeline_to_original_state_dict(pipe)
    if getattr(pipe, "text_encoder_2", None) is not None:   # SDXL
        return _prefixed((
            (UNET_PREFIX, unet_to_original(pipe.unet)),
            (VAE_PREFIX, vae_to_original(pipe.vae)),
            (SDXL_CLIP_PREFIX, text_encoder_to_original(pipe.text_encoder)),
            (SDXL_OPEN_CLIP_PREFIX, open_clip_text_to_original(pipe.text_encoder_2)),
        ))
    return _prefixed((
        (UNET_PREFIX, unet_to_original(pipe.unet)),
        (VAE_PREFIX, vae_to_original(pipe.vae)),
        (CLIP_PREFIX, text_encoder_to_original(pipe.text_encoder)),
    ))


def _prefixed(parts) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, sd in parts:
        for k, v in sd.items():
            # safetensors refuses non-contiguous views and autograd-tracked tensors.
            out[prefix + k] = v.detach().contiguous()
    return out


# ----------------------------------------------------------------------------------------------- SD3

SD3_TEXT_PREFIX = "text_encoders."
# pipeline attribute -> the original file's name for that text encoder
SD3_TEXT_ENCODERS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}


def _is_sd3(pipe) -> bool:
    from diffusers import StableDiffusion3Pipeline

    return isinstance(pipe, StableDiffusion3Pipeline)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): the original AdaLayerNormContinuous splits its projection as
    shift, scale and diffusers' as scale, shift; diffusers' reader swaps them, so the writer swaps back."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_original(transformer) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel -> ``model.diffusion_model.*`` keys (without the prefix): the exact inverse of
    diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``."""
    sd = transformer.state_dict()
    plain: dict[str, str] = {}         # diffusers key -> original key
    fused: dict[str, list[str]] = {}   # original key -> diffusers keys concatenated along dim 0 (q, k, v)
    swapped: set[str] = set()          # original keys stored (shift, scale) where diffusers holds (scale, shift)

    def rename(src: str, dst: str, only: tuple[str, ...] = ()):
        for name in transformer.get_submodule(src).state_dict():
            if not only or name in only:
                plain[f"{src}.{name}"] = f"{dst}.{name}"

    def fuse(srcs: list[str], dst: str):
        for name in transformer.get_submodule(srcs[0]).state_dict():
            fused[f"{dst}.{name}"] = [f"{src}.{name}" for src in srcs]

    plain["pos_embed.pos_embed"] = "pos_embed"
    rename("pos_embed.proj", "x_embedder.proj")
    for diffusers_name, original in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        rename(f"time_text_embed.{diffusers_name}.linear_1", f"{original}.mlp.0")
        rename(f"time_text_embed.{diffusers_name}.linear_2", f"{original}.mlp.2")
    rename("context_embedder", "context_embedder")
    last = len(transformer.transformer_blocks) - 1
    for i, block in enumerate(transformer.transformer_blocks):
        b, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        if block.context_pre_only != (i == last):
            # the readers take the last block, and only it, as the one without context output
            raise ValueError(f"{b}: context_pre_only={block.context_pre_only}, but the original layout has it on the "
                             f"last block only")
        fuse([f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], f"{x}.attn.qkv")
        fuse([f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], f"{c}.attn.qkv")
        rename(f"{b}.attn.to_out.0", f"{x}.attn.proj")
        if block.attn.to_add_out is not None:
            rename(f"{b}.attn.to_add_out", f"{c}.attn.proj")
        # qk norms (SD3.5): the readers take their scale alone, so a bias (a LayerNorm qk norm) stays unmapped
        for norm, original in (("norm_q", f"{x}.attn.ln_q"), ("norm_k", f"{x}.attn.ln_k"),
                               ("norm_added_q", f"{c}.attn.ln_q"), ("norm_added_k", f"{c}.attn.ln_k")):
            if getattr(block.attn, norm, None) is not None:
                rename(f"{b}.attn.{norm}", original, only=("weight",))
        if getattr(block, "attn2", None) is not None:   # SD3.5 medium's dual-attention blocks
            fuse([f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"], f"{x}.attn2.qkv")
            rename(f"{b}.attn2.to_out.0", f"{x}.attn2.proj")
            for norm in ("norm_q", "norm_k"):
                if getattr(block.attn2, norm, None) is not None:
                    rename(f"{b}.attn2.{norm}", f"{x}.attn2.ln_{norm[-1]}", only=("weight",))
        rename(f"{b}.norm1.linear", f"{x}.adaLN_modulation.1")
        rename(f"{b}.norm1_context.linear", f"{c}.adaLN_modulation.1")
        if block.context_pre_only:   # an AdaLayerNormContinuous, like the final layer's
            swapped.update(f"{c}.adaLN_modulation.1.{name}" for name in ("weight", "bias"))
        rename(f"{b}.ff.net.0.proj", f"{x}.mlp.fc1")
        rename(f"{b}.ff.net.2", f"{x}.mlp.fc2")
        if block.ff_context is not None:
            rename(f"{b}.ff_context.net.0.proj", f"{c}.mlp.fc1")
            rename(f"{b}.ff_context.net.2", f"{c}.mlp.fc2")
    rename("norm_out.linear", "final_layer.adaLN_modulation.1")
    swapped.update(f"final_layer.adaLN_modulation.1.{name}" for name in ("weight", "bias"))
    rename("proj_out", "final_layer.linear")

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for dst, srcs in fused.items():
        out[dst] = torch.cat([sd[src] for src in srcs], dim=0)
        used.update(srcs)
    for src, dst in plain.items():
        if src in sd:
            out[dst] = _swap_halves(sd[src]) if dst in swapped else sd[src]
            used.add(src)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"no original-layout mapping for diffusers key {unknown[0]!r}"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return out


def sd3_text_encoder_to_original(text_encoder, name: str) -> dict[str, torch.Tensor]:
    """One SD3 text encoder -> ``text_encoders.<name>.transformer``-relative keys (transformers' own names).

    name: "clip_l", "clip_g" or "t5xxl". The readers give CLIP-L an identity projection (SD3 takes its pooled
    output unprojected), so a CLIP-L whose projection is anything else cannot be written.
    """
    sd = dict(text_encoder.state_dict())
    if name == "t5xxl":
        # T5's input embedding is tied to `shared` (the key diffusers detects T5 by, and the one ComfyUI reads);
        # diffusers' reader does not tie them again, so the file holds both, the copy in its own storage
        # (safetensors refuses tensors that share memory)
        tied = sd.get("encoder.embed_tokens.weight")
        if tied is not None:
            if not torch.equal(tied, sd["shared.weight"]):
                raise ValueError("t5xxl: encoder.embed_tokens.weight differs from shared.weight; the original "
                                 "layout has one embedding for both")
            sd["encoder.embed_tokens.weight"] = tied.clone()
        known = ("shared.", "encoder.")
    elif name in ("clip_l", "clip_g"):
        # transformers >= 5 flattened CLIPTextModel: put back the `text_model.` level the file has
        sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
        known = ("text_model.", "text_projection.weight")
        projection = sd.get("text_projection.weight")
        if name == "clip_l" and projection is not None and not (
                projection.shape[0] == projection.shape[1]
                and torch.equal(projection, torch.eye(len(projection), dtype=projection.dtype,
                                                      device=projection.device))):
            raise ValueError("clip_l: text_projection is not the identity, but SD3's single-file readers (diffusers "
                             "and ComfyUI) give CLIP-L an identity projection; the file cannot hold this one")
    else:
        raise ValueError(f"name={name!r}; expected 'clip_l', 'clip_g' or 't5xxl'")
    unknown = sorted(k for k in sd if not k.startswith(known))
    if unknown:
        raise ValueError(f"no original-layout mapping for {name} key {unknown[0]!r}")
    return sd


def sd3_pipeline_to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """StableDiffusion3Pipeline (transformer, vae, both CLIPs, T5 when it has one) -> one original-layout state
    dict, the layout of ``sd3_medium_incl_clips[_t5xxl].safetensors``."""
    parts = [(UNET_PREFIX, sd3_transformer_to_original(pipe.transformer)), (VAE_PREFIX, vae_to_original(pipe.vae))]
    for attribute, name in SD3_TEXT_ENCODERS.items():
        encoder = getattr(pipe, attribute, None)
        if encoder is None:
            if attribute != "text_encoder_3":
                raise ValueError(f"the SD3 pipeline has no {attribute} ({name}); the single file needs both CLIPs")
            continue
        parts.append((f"{SD3_TEXT_PREFIX}{name}.transformer.", sd3_text_encoder_to_original(encoder, name)))
    return _prefixed(parts)


def save_original_checkpoint(pipe, path: str | os.PathLike) -> str:
    """Write ``pipe`` (SD1.x, SDXL or SD3) as an original-layout .safetensors file; returns the path.

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
