"""The tiny world as native ComfyUI MODEL, CLIP and VAE, so KSampler, CLIPTextEncode, VAEDecode/VAEEncode and
LoraLoader run on it. CheckpointLoader cannot detect a model this small, so the loader builds ComfyUI's own
classes (UNetModel in a BaseModel, SDClipModel in a CLIP, AutoencoderKL in a VAE) at the tiny sizes read from the
diffusers configs, and fills them with our weights converted to the original layout (r0_core.convert).

ComfyUI is imported inside the functions: the module imports (and its pure parts are tested) without it.
Node ids and the order of their inputs are a public API: append, never reorder."""
from __future__ import annotations

import functools
import json
import os

import torch

from r0_core.loading import TINY, TINY_PIPELINE_DIR, load_pipeline

from .r0_nodes import DTYPES

NATIVE_MODELS = {TINY: TINY_PIPELINE_DIR}   # the SD-1.x-architecture worlds this loader knows


def read_configs(folder: str) -> dict:
    """The diffusers configs of a pipeline folder, by part."""
    files = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    out = {}
    for part, name in files.items():
        with open(os.path.join(folder, name)) as f:
            out[part] = json.load(f)
    return out


# ----------------------------------------------------------------------------------------------- pure configs

def unet_config(c: dict) -> dict:
    """ComfyUI UNetModel arguments for a diffusers SD-1.x-style UNet2DConditionModel config; refuses what
    ComfyUI's UNetModel cannot express (it fixes 32 norm groups, sinusoidal time embedding with flipped sin/cos)."""
    plain = {"addition_embed_type": None, "class_embed_type": None, "encoder_hid_dim_type": None,
             "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32,
             "resnet_time_scale_shift": "default", "mid_block_type": "UNetMidBlock2DCrossAttn",
             "transformer_layers_per_block": 1, "upcast_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3}
    bad = {k: c.get(k, v) for k, v in plain.items() if c.get(k, v) != v}
    widths = list(c["block_out_channels"])
    base = widths[0]
    # diffusers' SD-1.x configs store the head count under attention_head_dim (num_attention_heads stays null)
    heads = c.get("num_attention_heads") or c["attention_head_dim"]
    if any(w % base for w in widths) or not isinstance(heads, int) or not isinstance(c["layers_per_block"], int):
        bad["block_out_channels/attention_head_dim/layers_per_block"] = (widths, heads, c["layers_per_block"])
    if bad:
        raise ValueError(f"this UNet config has {bad}; the native loader builds ComfyUI's SD-1.x UNetModel, which "
                         f"needs {', '.join(f'{k}={plain[k]!r}' for k in bad if k in plain) or 'integer settings'}")
    n = c["layers_per_block"]
    down = [int(t.startswith("CrossAttn")) for t in c["down_block_types"]]
    # ComfyUI lists the up path by level too, shallowest first (diffusers: deepest first)
    up = [int(t.startswith("CrossAttn")) for t in reversed(c["up_block_types"])]
    return {"image_size": c["sample_size"], "in_channels": c["in_channels"], "out_channels": c["out_channels"],
            "model_channels": base, "num_res_blocks": [n] * len(widths),
            "channel_mult": [w // base for w in widths],
            # one entry per resnet of each level going down, and per resnet (one more a level) coming up
            "transformer_depth": [d for d in down for _ in range(n)],
            "transformer_depth_output": [d for d in up for _ in range(n + 1)],
            "transformer_depth_middle": 1, "context_dim": c["cross_attention_dim"],
            "use_linear_in_transformer": bool(c.get("use_linear_projection")), "adm_in_channels": None,
            "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
            "use_temporal_attention": False, "use_temporal_resblock": False}


def unet_heads(c: dict) -> dict:
    """The head settings, kept apart as ComfyUI's BASE keeps them (unet_extra_config)."""
    return {"num_heads": c.get("num_attention_heads") or c["attention_head_dim"], "num_head_channels": -1}


def model_type_name(scheduler: dict) -> str:
    """ComfyUI's ModelType name for the scheduler's prediction type."""
    names = {"epsilon": "EPS", "v_prediction": "V_PREDICTION"}
    kind = scheduler.get("prediction_type", "epsilon")
    if kind not in names:
        raise ValueError(f"prediction_type={kind!r}; the native loader supports {', '.join(names)}")
    return names[kind]


def vae_params(c: dict) -> dict:
    """ComfyUI AutoencoderKL arguments (the SD-1.x `first_stage_config` params) for a diffusers AutoencoderKL
    config; the norm group count is not among them (ComfyUI fixes 32), see `vae_norm_groups`."""
    widths = list(c["block_out_channels"])
    if any(w % widths[0] for w in widths) or not c.get("use_quant_conv", True) \
            or not c.get("use_post_quant_conv", True) or c.get("shift_factor"):
        raise ValueError(f"VAE config {widths}, quant convs {c.get('use_quant_conv')}/{c.get('use_post_quant_conv')},"
                         f" shift {c.get('shift_factor')}: the native loader needs SD-1.x's AutoencoderKL layout")
    return {"embed_dim": c["latent_channels"],
            "ddconfig": {"double_z": True, "z_channels": c["latent_channels"], "resolution": c["sample_size"],
                         "in_channels": c["in_channels"], "out_ch": c["out_channels"], "ch": widths[0],
                         "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": c["layers_per_block"],
                         "attn_resolutions": [], "dropout": 0.0}}


def vae_norm_groups(c: dict) -> int:
    return c.get("norm_num_groups", 32)


def vae_ratio(c: dict) -> int:
    """Pixels per latent cell: one halving per level after the first."""
    return 2 ** (len(c["block_out_channels"]) - 1)


def silent_mid_attention(c: dict) -> dict[str, torch.Tensor]:
    """Weights for the mid-block attentions that ComfyUI's VAE always builds but a VAE with
    mid_block_add_attention=False lacks: with a zero output projection the block is x + 0, the identity."""
    if c.get("mid_block_add_attention", True):
        return {}
    ch = c["block_out_channels"][-1]
    out = {}
    for part in ("encoder", "decoder"):
        out[f"{part}.mid.attn_1.norm.weight"] = torch.ones(ch)
        out[f"{part}.mid.attn_1.norm.bias"] = torch.zeros(ch)
        for conv in ("q", "k", "v", "proj_out"):
            out[f"{part}.mid.attn_1.{conv}.weight"] = torch.zeros(ch, ch, 1, 1)
            out[f"{part}.mid.attn_1.{conv}.bias"] = torch.zeros(ch)
    return out


def clip_special_tokens(c: dict) -> dict:
    return {"start": c["bos_token_id"], "end": c["eos_token_id"], "pad": c["pad_token_id"]}


# ----------------------------------------------------------------------------------------------- ComfyUI objects

@functools.lru_cache(maxsize=None)
def _model_config_class(folder: str):
    """A ComfyUI model config (supported_models_base.BASE) for the world in `folder`: its UNet, latent scale and
    prediction type. Built on first use because it subclasses ComfyUI's classes."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    configs = read_configs(folder)

    class Latent(comfy.latent_formats.LatentFormat):
        scale_factor = configs["vae"]["scaling_factor"]
        latent_channels = configs["vae"]["latent_channels"]

    class TinyWorld(comfy.supported_models_base.BASE):
        unet_config = unet_config(configs["unet"])
        unet_extra_config = unet_heads(configs["unet"])
        latent_format = Latent
        memory_usage_factor = 1.0

        def model_type(self, state_dict, prefix=""):
            return getattr(comfy.model_base.ModelType, model_type_name(configs["scheduler"]))
    return TinyWorld


def _devices(device: str):
    """(load, offload) devices of each part: ComfyUI's own choices for auto, else the named device."""
    import comfy.model_management as mm

    if device == "auto":
        return {"unet": (mm.get_torch_device(), mm.unet_offload_device()),
                "clip": (mm.text_encoder_device(), mm.text_encoder_offload_device()),
                "vae": (mm.vae_device(), mm.vae_offload_device())}
    d = torch.device(device)
    return {part: (d, d) for part in ("unet", "clip", "vae")}


def native_model(pipe, folder: str, dtype, load_device, offload_device):
    """MODEL: ComfyUI's BaseModel over our UNet weights, sampling on our scheduler's own σ table."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from r0_core.convert import unet_to_original
    from r0_core.schedule import sigmas_from_alphas_cumprod

    world = _model_config_class(folder)
    config = world(world.unet_config)
    weights = unet_to_original(pipe.unet)
    supported = config.supported_inference_dtypes
    dtype = dtype or mm.unet_dtype(model_params=sum(w.numel() for w in weights.values()), supported_dtypes=supported)
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))
    model = config.get_model({}, device=offload_device)
    model.diffusion_model.load_state_dict(weights, strict=True)
    # the table from the scheduler itself: ComfyUI builds squaredcos_cap_v2 from numpy, which its
    # ModelSamplingDiscrete cannot take (0.3.64), and this is the table the weights were trained on
    model.model_sampling.set_sigmas(sigmas_from_alphas_cumprod(pipe.scheduler.alphas_cumprod.double()))
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def tiny_clip_classes(text_config: dict, tokenizer_dir: str, key: str = "clip_l", **text_model_options):
    """ComfyUI's SDTokenizer and SDClipModel classes at a tiny encoder's sizes (its token count, width and token
    table) with its special tokens; key: the encoder's name in ComfyUI (clip_l, clip_g); text_model_options:
    SDClipModel's (layer, layer_idx, layer_norm_hidden_state, return_projected_pooled) as the family's own CLIP
    classes set them."""
    import comfy.sd1_clip as sd1

    special = clip_special_tokens(text_config)
    length, width, vocab = (text_config["max_position_embeddings"], text_config["hidden_size"],
                            text_config["vocab_size"])

    class Tokenizer(sd1.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(tokenizer_dir, max_length=length, embedding_directory=embedding_directory,
                             embedding_size=width, embedding_key=key, tokenizer_data=tokenizer_data)

    class TextModel(sd1.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, max_length=length, textmodel_json_config=dict(text_config), dtype=dtype,
                             special_tokens=special, model_options={**model_options, "model_name": key},
                             **text_model_options)
            # ComfyUI sizes the token table for CLIP-L's 49408 tokens, whatever the config says
            self.transformer.set_input_embeddings(self.operations.Embedding(vocab, width, dtype=dtype, device=device))

    return Tokenizer, TextModel


def text_weights(text_encoder) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights under the keys ComfyUI's SDClipModel loads; one without a
    projection gets the identity (its pooled output is then unprojected)."""
    from r0_core.convert import text_encoder_to_original

    weights = {k if k.startswith("text_projection.") else f"text_model.{k}": v
               for k, v in text_encoder_to_original(text_encoder).items()}
    weights.setdefault("text_projection.weight", torch.eye(text_encoder.config.hidden_size))
    return weights


def _clip_target(text_config: dict, tokenizer_dir: str):
    """ComfyUI's SD-1.x tokenizer and CLIP-L text model classes at the tiny encoder's sizes."""
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base

    Tokenizer, TextModel = tiny_clip_classes(text_config, tokenizer_dir, return_projected_pooled=False)

    class Tokenizers(sd1.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory, tokenizer_data, tokenizer=Tokenizer)

    class TextModels(sd1.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TextModel, **kwargs)

    return comfy.supported_models_base.ClipTarget(Tokenizers, TextModels)


def native_clip(pipe, folder: str, dtype, load_device, offload_device):
    """CLIP: ComfyUI's SDClipModel over our text encoder, tokenizing with our tokenizer, "last" hidden state
    (after the final layer norm) as our pipeline's encode_prompt returns it."""
    import comfy.sd

    text_config = pipe.text_encoder.config.to_dict()
    options = {"load_device": load_device, "offload_device": offload_device, "initial_device": offload_device}
    if dtype is not None:
        options["dtype"] = dtype
    clip = comfy.sd.CLIP(_clip_target(text_config, os.path.join(folder, "tokenizer")), model_options=options)
    # ours has no projection (CLIPTextModel); pooled output is unused by SD-1.x models, keep it unprojected
    weights = text_weights(pipe.text_encoder)
    missing, unexpected = clip.load_sd(weights)
    if missing or unexpected:
        raise ValueError(f"text encoder weights do not fit ComfyUI's CLIP: missing {missing}, unexpected "
                         f"{unexpected}")
    return clip


def native_vae(pipe, dtype, device):
    """VAE: ComfyUI's AutoencoderKL at the tiny sizes, with our norm group count and compression ratio."""
    import comfy.sd

    from r0_core.convert import vae_to_original

    c = pipe.vae.config
    vae = comfy.sd.VAE(sd={**vae_to_original(pipe.vae), **silent_mid_attention(c)},
                       config={"params": vae_params(c)}, device=device, dtype=dtype)
    groups = vae_norm_groups(c)
    for m in vae.first_stage_model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.num_groups = groups   # ComfyUI's Normalize fixes 32; group_norm reads the attribute at each call
    vae.downscale_ratio = vae.upscale_ratio = vae_ratio(c)
    return vae


def load_native(model: str, dtype: str = "auto", device: str = "auto"):
    """(MODEL, CLIP, VAE) of a built-in world, as ComfyUI's native nodes take them."""
    if model not in NATIVE_MODELS:
        raise ValueError(f"model={model!r}; the native loader knows {', '.join(NATIVE_MODELS)}")
    folder = NATIVE_MODELS[model]
    torch_dtype = DTYPES[dtype]
    with torch.inference_mode(False):   # fp32 source weights on the CPU; ComfyUI casts and moves them
        pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    devices = _devices(device)
    # the VAE keeps fp32 under fp16 (the tiny VAE's force_upcast), as our pipeline does
    vae_dtype = torch.float32 if torch_dtype == torch.float16 else torch_dtype
    patcher = native_model(pipe, folder, torch_dtype, *devices["unet"])
    patcher.model.r0_world = model   # survives the MODEL's clones: trainers pick the world's default prompts
    return (patcher, native_clip(pipe, folder, torch_dtype, *devices["clip"]),
            native_vae(pipe, vae_dtype, devices["vae"][0]))


class R0TinyNativeLoader:
    DESCRIPTION = ("Loads the built-in tiny world as native MODEL, CLIP and VAE for ComfyUI's own nodes (KSampler, "
                   "CLIPTextEncode, VAEDecode, LoraLoader). Its VAE halves the size once: an EmptyLatentImage of "
                   "128x128 gives the tiny world's 32x32 images.")
    CATEGORY = "R0"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (list(NATIVE_MODELS), {"tooltip": "tiny: the built-in tiny world (SD 1.x architecture)"}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: ComfyUI's choice for the device"}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto",
                                                 "tooltip": "auto: ComfyUI's model management decides"}),
        }}

    def load(self, model, dtype, device):
        return load_native(model, dtype, device)


NODE_CLASS_MAPPINGS = {"R0TinyNativeLoader": R0TinyNativeLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"R0TinyNativeLoader": "R0 Tiny World (native MODEL/CLIP/VAE)"}
