"""SDXL (two text encoders, pooled embeddings, time ids) on the shipped tiny SDXL model of the world (tiny-sdxl):
it draws the world at 4 steps; the R0 sampler at η = 0 equals diffusers' own StableDiffusionXLPipeline with DDIM on
the same timesteps; R0, R0+, test-time R0 and RPO train on it, and R0's LoRA file loads in diffusers' SDXL
pipeline."""
import copy
import dataclasses
import math
import os

import pytest
import torch

from r0_core.generate import generate
from r0_core.loading import TINY, TINY_FAMILIES, TINY_PIPELINE_DIR, ModelLoadError, load_pipeline
from tests.family_parity import PROMPTS, check_eta_0_is_diffusers, one_object_accuracy


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-sdxl", device="cpu", dtype=torch.float32)


def test_the_tiny_sdxl_model_draws_the_world(pipe):
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert one_object_accuracy(pipe) >= 0.6


def test_the_tiny_sdxl_model_as_one_single_file_loads_to_the_same_images(pipe, tmp_path):
    """SDXL's original layout (OpenCLIP keys for the second encoder, label_emb for the added embedding), read back
    with the shipped folder's configs since the tiny model is not SDXL base's size."""
    from safetensors import safe_open

    from r0_core.convert import save_original_checkpoint

    path = save_original_checkpoint(pipe, tmp_path / "tiny-sdxl.safetensors")
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"} <= keys
    loaded = load_pipeline(str(path), device="cpu", dtype=torch.float32, config_dir=TINY_FAMILIES["tiny-sdxl"])
    ours, _ = generate(loaded, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])
    assert (ours - generate(pipe, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])[0]).abs().max() < 1e-4
    with pytest.raises(ModelLoadError, match="describes a StableDiffusionPipeline, but checkpoint .* is SDXL"):
        load_pipeline(str(path), config_dir=TINY_PIPELINE_DIR)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_eta_0_is_diffusers_sdxl_with_ddim(pipe, guidance):
    theirs, _ = check_eta_0_is_diffusers(pipe, guidance, latent_side=16, pixels=48)   # time ids of another size
    assert theirs.std() > 0.1


def test_generate_runs_on_sdxl_at_any_size(pipe):
    images, latents = generate(pipe, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])
    assert images.shape == (2, 3, 32, 32) and latents.shape == (2, 4, 16, 16) and 0 <= images.min() <= images.max() <= 1
    again, _ = generate(pipe, PROMPTS[:1], steps=2, guidance=2.0, seeds=[3])
    assert torch.allclose(again[0], images[0], atol=1e-5)   # seeded per image, whatever the batch
    bigger, _ = generate(pipe, PROMPTS[:1], steps=2, guidance=2.0, seeds=[3], height=48, width=32)
    assert bigger.shape == (1, 3, 48, 32)


@pytest.fixture(scope="module")
def reward():
    from r0_core.rewards import load_reward

    return load_reward("clip", TINY)


def test_r0_trains_on_sdxl_and_its_lora_loads_in_diffusers_and_ours(pipe, reward, tmp_path):
    """R0 with the implicit CFG reward (both halves of SDXL's conditioning) and R0+, then the saved LoRA: read
    by diffusers' own StableDiffusionXLPipeline.load_lora_weights and by load_lora, the trained images again."""
    from r0_core import lora
    from r0_core.train import R0Config, train_r0

    config = R0Config(prompts=PROMPTS, iterations=1, batch_size=2, steps=2, lora_rank=4, lr=1e-2,
                      cfg_reward_weight=1.0, checkpoint_every=1)
    trained = copy.deepcopy(pipe)
    before, _ = generate(trained, PROMPTS, steps=2, seeds=[5, 6])
    result = train_r0(trained, reward, config, str(tmp_path / "r0"))
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
    assert len(result.history[0]["rewards"]) == 2          # the CLIP reward and the implicit CFG gap
    after, _ = generate(trained, PROMPTS, steps=2, seeds=[5, 6])
    assert (after - before).abs().max() > 1e-3             # the LoRA moved the images

    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(result.lora_path, adapter_name="r0")
    assert len(lora.active_loras(theirs)) == 1
    again, _ = generate(theirs, PROMPTS, steps=2, seeds=[5, 6])
    assert (again - after).abs().max() < 1e-4, (again - after).abs().max()
    ours = copy.deepcopy(pipe)
    lora.load_lora(ours, result.lora_path)
    assert (generate(ours, PROMPTS, steps=2, seeds=[5, 6])[0] - after).abs().max() < 1e-4

    plus = train_r0(copy.deepcopy(pipe), reward, dataclasses.replace(config, mode="r0+"),
                    str(tmp_path / "r0plus"))
    assert math.isfinite(plus.history[0]["loss"])


def test_test_time_r0_refines_sdxl_noise(pipe):
    from r0_core.rewards import load_reward
    from r0_core.test_time import refine_noise

    prompt = PROMPTS[1]
    result = refine_noise(pipe, load_reward("aesthetic", TINY), prompt, iterations=2, steps=2, seed=7,
                          cfg_reward_weight=1.0)
    plain, _ = generate(pipe, [prompt], steps=2, seeds=[7])
    assert (result.initial_images - plain).abs().max() < 1e-5     # iterate 0 is the plain sample
    # the gradient reached the start noise through SDXL's conditioning: later iterates score differently
    assert result.rewards.shape == (3, 1) and (result.rewards[1:] - result.rewards[0]).abs().max() > 1e-4


def test_rpo_trains_on_sdxl(pipe, reward, tmp_path):
    """RPO's diffusion and preference losses with SDXL's added conditioning, on references at the model's size."""
    from rpo_core.train import RPOConfig, train_rpo

    from r0_core.tiny import subjects

    references = torch.from_numpy(subjects.references(subjects.SUBJECTS[0], n=2)).permute(0, 3, 1, 2).float()
    config = RPOConfig(token="vum", class_name="circle", prompts=["a vum circle on the left"], iterations=2,
                       batch_size=2, lora_rank=4, negatives_per_prompt=2, validate_every=1, validation_images=1,
                       validation_prompts=["a vum circle below a red square"], sampler_steps=2)
    result = train_rpo(copy.deepcopy(pipe), reward, references, config, str(tmp_path / "rpo"))
    assert len(result.history) == 2 and all(math.isfinite(h["l_pref"]) and h["l_sim"] > 0 for h in result.history)
    assert result.lora_path and os.path.exists(result.lora_path)


def test_lcm_distillation_of_sdxl_is_refused_by_name(pipe, tmp_path):
    from r0_core.lcm import LCMConfig, train_lcm

    with pytest.raises(NotImplementedError, match="LCM distillation of SDXL pipelines is not supported yet"):
        train_lcm(pipe, torch.rand(2, 3, 32, 32), PROMPTS, LCMConfig(iterations=1), str(tmp_path))
    assert not any(tmp_path.iterdir())
