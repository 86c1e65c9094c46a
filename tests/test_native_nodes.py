"""The native MODEL/CLIP/VAE loader without ComfyUI: the module imports, and the ComfyUI settings it derives
from the tiny world's diffusers configs describe the tiny model's actual structure. (Inside ComfyUI,
scripts/comfy_native_tiny.py checks the built objects against our pipeline.)"""
import re
import sys

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes import native_nodes as native
from r0_core.convert import unet_to_original, vae_to_original
from r0_core.loading import TINY_PIPELINE_DIR, load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def configs():
    return native.read_configs(TINY_PIPELINE_DIR)


def test_node_is_registered_with_tooltips_and_imports_no_comfy():
    cls = NODE_CLASS_MAPPINGS["R0TinyNativeLoader"]
    assert cls is native.R0TinyNativeLoader and "native" in NODE_DISPLAY_NAME_MAPPINGS["R0TinyNativeLoader"]
    assert cls.RETURN_TYPES == ("MODEL", "CLIP", "VAE") and cls.CATEGORY == "R0"
    inputs = cls.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "dtype", "device"] and inputs["model"][0] == ["tiny"]
    assert all("tooltip" in spec[1] for spec in inputs.values())
    assert not [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]
    with pytest.raises(ValueError, match="knows tiny"):
        native.load_native("tiny-sdxl")


def test_unet_config_matches_the_tiny_unet(pipe, configs):
    config, heads = native.unet_config(configs["unet"]), native.unet_heads(configs["unet"])
    unet = pipe.unet
    assert [config["model_channels"] * m for m in config["channel_mult"]] == list(unet.config.block_out_channels)
    assert config["context_dim"] == unet.config.cross_attention_dim
    assert heads["num_heads"] == unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads
    keys = unet_to_original(unet)
    # where the converted weights hold a transformer is where ComfyUI's UNetModel must build one: input block n of
    # level l, resnet i is 1 + (resnets + 1) l + i; output blocks run deepest first, popping the list's end
    found_in = {int(n) for n in re.findall(r"^input_blocks\.(\d+)\.1\.proj_in\.weight$", "\n".join(keys), re.M)}
    n_res = config["num_res_blocks"]
    want_in = {1 + (n_res[level] + 1) * level + i for level in range(len(n_res)) for i in range(n_res[level])
               if config["transformer_depth"][sum(n_res[:level]) + i]}
    found_out = {int(n) for n in re.findall(r"^output_blocks\.(\d+)\.1\.proj_in\.weight$", "\n".join(keys), re.M)}
    depth_out = config["transformer_depth_output"]
    want_out = {j for j in range(len(depth_out)) if depth_out[len(depth_out) - 1 - j]}
    assert found_in == want_in == {3, 5} and found_out == want_out == {0, 1, 2, 3}
    assert len(depth_out) == 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("output_blocks."))


def test_unet_config_refuses_what_comfy_cannot_build(configs):
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        native.unet_config({**configs["unet"], "norm_num_groups": 16})
    with pytest.raises(ValueError, match="addition_embed_type"):
        native.unet_config({**configs["unet"], "addition_embed_type": "text_time"})
    assert native.model_type_name(configs["scheduler"]) == "V_PREDICTION"
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        native.model_type_name({"prediction_type": "sample"})


def test_vae_settings_match_the_tiny_vae(pipe, configs):
    c = configs["vae"]
    params = native.vae_params(c)["ddconfig"]
    assert [params["ch"] * m for m in params["ch_mult"]] == list(pipe.vae.config.block_out_channels)
    assert native.vae_norm_groups(c) == pipe.vae.encoder.conv_norm_out.num_groups == 16
    with torch.no_grad():
        latent = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert 32 // latent.shape[-1] == native.vae_ratio(c)
    # ComfyUI's VAE always has mid attentions; ours has none, so the loader fills them in as identities
    keys = vae_to_original(pipe.vae)
    silent = native.silent_mid_attention(c)
    assert not [k for k in keys if ".mid.attn_1." in k] and not set(silent) & set(keys)
    width = pipe.vae.encoder.mid_block.resnets[0].out_channels
    for part in ("encoder", "decoder"):
        assert silent[f"{part}.mid.attn_1.proj_out.weight"].shape == (width, width, 1, 1)
        assert not silent[f"{part}.mid.attn_1.proj_out.weight"].any()
        assert not silent[f"{part}.mid.attn_1.proj_out.bias"].any()
    assert native.silent_mid_attention({**c, "mid_block_add_attention": True}) == {}


def test_clip_special_tokens_are_what_the_tokenizer_adds(pipe, configs):
    special = native.clip_special_tokens(configs["text_encoder"])
    tok = pipe.tokenizer
    # ComfyUI's SDTokenizer reads start/end from tokenizing "" and pads with the end token
    assert tok("")["input_ids"] == [special["start"], special["end"]]
    assert tok.pad_token_id == special["pad"] == special["end"]
    assert tok.model_max_length == configs["text_encoder"]["max_position_embeddings"]
