"""The LCM-LoRA distillation baseline on the built-in tiny model: a few iterations of latent consistency
distillation bring its 1-step images towards the guided many-step teacher's, and a cancelled run resumes to
exactly the uninterrupted result."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from r0_core import lora
from r0_core.generate import generate
from r0_core.lcm import LCMConfig, boundary, train_lcm
from r0_core.loading import load_pipeline
from r0_core.sampler import Cancelled
from r0_core.tiny import world

PROMPTS = ["a red circle above a blue square", "a green triangle left of a yellow circle"] * 4


def fresh_pipe():
    return load_pipeline("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def data():
    captions = world.training_captions()
    picks = np.random.default_rng(0).choice(len(captions), 256)
    prompts = [captions[i] for i in picks]
    images = np.stack([world.render(world.parse_caption(p), seed=i) for i, p in enumerate(prompts)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous(), prompts


def distance_to_teacher(pipe, teacher):
    with torch.no_grad():
        one_step, _ = generate(pipe, PROMPTS, steps=1, seeds=range(len(PROMPTS)))
    return float((one_step - teacher).abs().mean())


def test_consistency_distillation_brings_one_step_towards_the_guided_teacher(data, tmp_path):
    pipe = fresh_pipe()
    with torch.no_grad():  # the PF-ODE the student learns to jump along: many DDIM steps with the teacher's CFG
        teacher, _ = generate(pipe, PROMPTS, steps=50, guidance=3.0, seeds=range(len(PROMPTS)))
    before = distance_to_teacher(pipe, teacher)
    result = train_lcm(pipe, *data, LCMConfig(iterations=30, batch_size=8, guidance_range=(3.0, 3.0)),
                       str(tmp_path))
    after = distance_to_teacher(pipe, teacher)
    assert after < 0.85 * before, (before, after)
    assert lora.active_loras(pipe) == [("lcm", 1.0)] and load_file(result.lora_path)


def test_cancel_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    config = LCMConfig(iterations=4, batch_size=2, checkpoint_every=2, seed=1)
    whole = train_lcm(fresh_pipe(), *data, config, str(tmp_path / "whole"))

    def cancel_at_2(info):
        if info["i"] == 1:
            raise Cancelled
    assert train_lcm(fresh_pipe(), *data, config, str(tmp_path / "split"), callback=cancel_at_2).cancelled
    second = train_lcm(fresh_pipe(), *data, config, str(tmp_path / "split"))
    a, b = load_file(whole.lora_path), load_file(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_boundary_condition_and_bad_settings():
    c_skip, c_out = boundary(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0            # f(x, 0) = x: the consistency function's anchor
    assert c_skip[1] < 1e-5 and c_out[1] > 0.99999     # from the first solver level on, the model's x̂0
    for bad, match in (({"guidance_range": (0.5, 2.0)}, "guidance_range"), ({"lr": 0.0}, "lr"),
                       ({"ddim_timesteps": 1}, "ddim_timesteps")):
        with pytest.raises(ValueError, match=match):
            LCMConfig(**bad)
    with pytest.raises(ValueError, match="one prompt per image"):
        train_lcm(fresh_pipe(), torch.zeros(2, 3, 32, 32), ["a"], LCMConfig(), "unused")
