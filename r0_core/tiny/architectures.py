"""Tiny random pipelines of the other families (SDXL, SD3), with the world's tokenizer: the same block structure as
the real models at small widths, for tests and speed benchmarks (their weights are random, so their images mean
nothing). Configs are data; `random_pipeline(family)` builds one."""
from __future__ import annotations

import os

import torch

from ..loading import TINY_PIPELINE_DIR

TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=8 * 6 + 32,
                 cross_attention_dim=64)
# both CLIPs' hidden states side by side (64) are the joint attention input; their pooled outputs, too
SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                       pooled_projection_dim=64, pos_embed_max_size=16)
SD3_VAE = dict(VAE, scaling_factor=1.5, shift_factor=0.1)   # SD3's VAE is shifted as well as scaled


def random_pipeline(family: str, seed: int = 0):
    """A tiny "sdxl" or "sd3" pipeline with random weights (SD3 without its T5 encoder), float32 on the CPU."""
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in ("sdxl", "sd3"):
        raise ValueError(f"family={family!r}; expected 'sdxl' or 'sd3'")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(TINY_PIPELINE_DIR, "tokenizer"))
    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **TEXT)
    if family == "sdxl":
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        pipe = StableDiffusionXLPipeline(vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(text),
                                         text_encoder_2=CLIPTextModelWithProjection(text), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET),
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**SD3_TRANSFORMER),
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=AutoencoderKL(**SD3_VAE), text_encoder=CLIPTextModelWithProjection(text),
                                        tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(text),
                                        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)
