"""SD3 (rectified flow) on the shipped tiny SD3 model of the world (tiny-sd3): it draws the world; few-step
generation equals diffusers' own pipeline at η = 0; R0 (with the implicit CFG reward), test-time R0 and
RPO (flow-matching loss) train on it through the same code as the UNet families; R0's LoRA file loads in diffusers'
SD3 pipeline and through load_lora; and the model written as one single file loads back to the same images."""
import copy
import math
import os

import pytest
import torch

from r0_core.generate import generate
from r0_core.loading import TINY, TINY_FAMILIES, load_pipeline
from tests.family_parity import PROMPTS, check_eta_0_is_diffusers, one_object_accuracy


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-sd3", device="cpu", dtype=torch.float32)


def test_the_tiny_sd3_model_draws_the_world(pipe):
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert one_object_accuracy(pipe) >= 0.6


def test_the_tiny_sd3_model_as_one_single_file_loads_to_the_same_images(pipe, tmp_path):
    from r0_core.convert import save_original_checkpoint

    path = save_original_checkpoint(pipe, tmp_path / "tiny-sd3.safetensors")
    loaded = load_pipeline(str(path), device="cpu", dtype=torch.float32, config_dir=TINY_FAMILIES["tiny-sd3"])
    ours, _ = generate(loaded, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])
    assert (ours - generate(pipe, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])[0]).abs().max() < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_eta_0_is_diffusers_sd3(pipe, guidance):
    theirs, z = check_eta_0_is_diffusers(pipe, guidance, latent_side=16, pixels=32)
    assert (theirs - z).abs().mean() > 0.1
    images, latents = generate(pipe, PROMPTS, steps=2, guidance=guidance, seeds=[3, 4])
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() <= images.max() <= 1


def test_an_sd3_folder_loads_and_generates_the_same(pipe, tmp_path):
    from r0_core.loading import load_pipeline

    pipe.save_pretrained(tmp_path / "sd3")
    loaded = load_pipeline(str(tmp_path / "sd3"), device="cpu", dtype=torch.float32)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline"
    ours, _ = generate(loaded, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])
    assert (ours - generate(pipe, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])[0]).abs().max() < 1e-5


def test_r0_trains_on_sd3_and_its_lora_loads_in_diffusers_and_ours(pipe, tmp_path):
    from r0_core import lora
    from r0_core.rewards import load_reward
    from r0_core.train import R0Config, train_r0

    # R0+ with the implicit CFG reward: the flow re-noising in both the generator's steps and the reward
    config = R0Config(prompts=PROMPTS, iterations=1, batch_size=2, steps=2, lora_rank=4, lr=1e-2,
                      cfg_reward_weight=1.0, mode="r0+")
    trained = copy.deepcopy(pipe)
    before, _ = generate(trained, PROMPTS, steps=2, seeds=[5, 6])
    result = train_r0(trained, load_reward("clip", TINY), config, str(tmp_path / "r0"))
    assert math.isfinite(result.history[0]["loss"]) and len(result.history[0]["rewards"]) == 2
    after, _ = generate(trained, PROMPTS, steps=2, seeds=[5, 6])
    assert (after - before).abs().max() > 1e-3

    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(result.lora_path, adapter_name="r0")
    assert (generate(theirs, PROMPTS, steps=2, seeds=[5, 6])[0] - after).abs().max() < 1e-4
    ours = copy.deepcopy(pipe)
    lora.load_lora(ours, result.lora_path)
    assert (generate(ours, PROMPTS, steps=2, seeds=[5, 6])[0] - after).abs().max() < 1e-4


def test_test_time_r0_and_rpo_train_on_sd3(pipe, tmp_path):
    from r0_core.rewards import load_reward
    from r0_core.test_time import refine_noise
    from rpo_core.train import RPOConfig, train_rpo

    aesthetic = load_reward("aesthetic", TINY)
    refined = refine_noise(pipe, aesthetic, PROMPTS[1], iterations=2, steps=2, seed=7)
    assert (refined.initial_images - generate(pipe, PROMPTS[1:], steps=2, seeds=[7])[0]).abs().max() < 1e-5
    assert refined.rewards[1:].max() > refined.rewards[0]
    # the implicit CFG reward (re-noised in the flow interpolation) pushes as well: other iterates
    guided = refine_noise(pipe, aesthetic, PROMPTS[1], iterations=2, steps=2, seed=7, cfg_reward_weight=1.0)
    assert torch.equal(guided.rewards[0], refined.rewards[0])
    assert (guided.rewards[1:] - refined.rewards[1:]).abs().max() > 1e-3

    from r0_core.tiny import subjects

    references = torch.from_numpy(subjects.references(subjects.SUBJECTS[0], n=2)).permute(0, 3, 1, 2).float()
    config = RPOConfig(token="vum", class_name="circle", prompts=["a vum circle on the left"], iterations=1,
                       batch_size=2, lora_rank=4, negatives_per_prompt=2, validate_every=1, validation_images=1,
                       validation_prompts=["a vum circle below a red square"], sampler_steps=2)
    result = train_rpo(copy.deepcopy(pipe), load_reward("clip", TINY), references, config, str(tmp_path / "rpo"))
    assert math.isfinite(result.history[0]["l_pref"]) and result.history[0]["l_sim"] > 0
    assert result.lora_path and os.path.exists(result.lora_path)
