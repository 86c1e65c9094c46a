"""Offline loading of SD-family pipelines: the tiny world's folder, original-layout single files, and clear
errors for missing, corrupt or unknown models."""
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from r0_core import convert
from r0_core.loading import (TINY, TINY_PIPELINE_DIR, ModelLoadError, checkpoint_shapes, detect_architecture,
                             load_pipeline, pick_device_dtype, read_checkpoint)


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline(TINY)


def _image(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, guidance_scale=2.0, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def test_builtin_tiny_is_a_stable_diffusion_pipeline_on_cpu_fp32(tiny):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(tiny, StableDiffusionPipeline)
    assert isinstance(tiny.text_encoder, CLIPTextModel) and isinstance(tiny.tokenizer, CLIPTokenizer)
    assert tiny.unet.device.type == "cpu" and tiny.unet.dtype == torch.float32
    assert tiny.vae.config.latent_channels == tiny.unet.config.in_channels == 4
    # every word of the world is one token: the vocabulary was built for it
    assert len(tiny.tokenizer.tokenize("a purple triangle left of a yellow square")) == 8
    image = _image(tiny)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert torch.equal(image, _image(tiny)), "same seed must give the same image"


def test_device_and_dtype_choice():
    assert pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("cpu", torch.bfloat16) == (torch.device("cpu"), torch.bfloat16)
    if not torch.cuda.is_available():
        assert pick_device_dtype()[0].type in ("cpu", "mps")


def test_original_single_file_layout_loads_through_the_same_function(tiny, tmp_path):
    path = convert.save_original_checkpoint(tiny, tmp_path / "tiny.safetensors")
    keys = checkpoint_shapes(str(path)).keys()
    assert keys == read_checkpoint(str(path)).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    reloaded = load_pipeline(str(path))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny, name).state_dict(), getattr(reloaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(_image(tiny, seed=3), _image(reloaded, seed=3))


def test_architecture_is_detected_from_keys():
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    sd15 = {**unet, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    sd2 = {**unet, "cond_stage_model.model.token_embedding.weight": (49408, 1024)}
    sdxl = {**unet, "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
            "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}
    assert [detect_architecture(d) for d in (sd15, sd2, sdxl)] == ["sd15", "sd2", "sdxl"]
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        detect_architecture({"encoder.layer.0.weight": (3, 3)}, "bert.safetensors")


@pytest.mark.parametrize("keys, found", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
      "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}, "an inpainting"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
      "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "an SDXL refiner"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "an SD3"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "a Flux"),
])
def test_unsupported_families_are_named_with_the_supported_ones(keys, found):
    with pytest.raises(ModelLoadError) as e:
        detect_architecture(keys, "model.safetensors")
    message = str(e.value)
    assert found in message and "model.safetensors" in message and "SDXL base" in message and "1.x/2.x" in message


@pytest.mark.parametrize("class_name, found", [("StableDiffusionXLImg2ImgPipeline", "SDXL refiner"),
                                               ("StableDiffusionInpaintPipeline", "inpainting"),
                                               ("FluxPipeline", "Flux"), ("KandinskyPipeline", "Kandinsky")])
def test_unsupported_pipeline_folders_are_named(tmp_path, class_name, found):
    (tmp_path / "model_index.json").write_text('{"_class_name": "%s"}' % class_name)
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(str(tmp_path))
    assert found in str(e.value) and "SDXL base" in str(e.value) and "StableDiffusionXLPipeline" in str(e.value)


def test_missing_paths_name_what_was_expected(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere.safetensors not found"):
        load_pipeline(str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    broken = tmp_path / "tiny-no-unet"
    shutil.copytree(TINY_PIPELINE_DIR, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match=r"tiny-no-unet/unet is missing.*'unet'"):
        load_pipeline(str(broken))


def test_corrupt_files_are_reported_by_name(tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(os.path.join(TINY_PIPELINE_DIR, "unet", "diffusion_pytorch_model.safetensors"),
                         "rb").read()[:5000])
    with pytest.raises(ModelLoadError, match="cut.safetensors is unreadable or corrupt"):
        load_pipeline(str(cut))
    folder = tmp_path / "tiny-cut"
    shutil.copytree(TINY_PIPELINE_DIR, folder)
    shutil.copy(cut, folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="tiny-cut"):
        load_pipeline(str(folder))
    index = folder / "model_index.json"
    index.write_text("{ not json")
    with pytest.raises(ModelLoadError, match="model_index.json is not valid JSON"):
        load_pipeline(str(folder))


def test_unknown_architectures_are_refused(tmp_path):
    path = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="classifier.safetensors has an unknown architecture"):
        load_pipeline(str(path))
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        load_pipeline(str(folder))


def test_pickles_are_read_weights_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": ModelLoadError("code")}, str(path))
    with pytest.raises(ModelLoadError, match="evil.ckpt: the safe loader .* refused it.*GLOBAL r0_core.loading.Model"):
        read_checkpoint(str(path))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, str(plain))
    assert torch.equal(read_checkpoint(str(plain))["w"], torch.ones(2))


def test_real_sd_single_files_need_a_real_tokenizer(tmp_path):
    # an SD1.5-shaped text embedding is enough to pick the sd15 config; the tokenizer is checked next
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 768)},
              str(path))
    with pytest.raises(ModelLoadError, match="tokenizer_dir"):
        load_pipeline(str(path))
    with pytest.raises(ModelLoadError, match="49408"):
        load_pipeline(str(path), tokenizer_dir=os.path.join(TINY_PIPELINE_DIR, "tokenizer"))


def test_prediction_type_override(tiny):
    pipe = load_pipeline(TINY, prediction_type="epsilon")
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert tiny.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        load_pipeline(TINY, prediction_type="x0")
