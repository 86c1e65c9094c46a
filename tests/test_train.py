"""The R0 trainer on the built-in tiny model and the tiny CLIP reward: it raises the reward, leaves the base
weights alone in LoRA mode, resumes to exactly the uninterrupted result, and runs from the command line."""
import os

import pytest
import torch
from safetensors.torch import load_file

from r0_core.generate import generate
from r0_core.loading import load_pipeline
from r0_core.rewards import load_reward
from r0_core.sampler import Cancelled
from r0_core.train import R0Config, main, train_r0

PROMPTS = ["a red circle above a blue square", "a green triangle left of a yellow circle"]


def fresh_pipe():
    return load_pipeline("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reward():
    return load_reward("clip", "tiny", device="cpu", dtype=torch.float32)


def mean_reward(pipe, reward, steps=4):
    prompts = PROMPTS * 4
    with torch.no_grad():
        images, _ = generate(pipe, prompts, steps=steps, seeds=range(100, 100 + len(prompts)))
        return float(reward(images, prompts).mean())


@pytest.mark.parametrize("mode", ["r0", "r0+"])
def test_training_raises_the_reward_and_keeps_base_weights(mode, reward, tmp_path):
    pipe = fresh_pipe()
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before = mean_reward(pipe, reward)
    config = R0Config(prompts=PROMPTS, iterations=12, batch_size=4, lr=3e-3, mode=mode, seed=1)
    result = train_r0(pipe, reward, config, str(tmp_path))
    after = mean_reward(pipe, reward)
    assert after > before + 0.5, (before, after)
    assert len(result.history) == 12 and result.history[-1]["reg"] > 0
    for key, value in pipe.unet.state_dict().items():  # LoRA: the pretrained weights do not move
        if "lora" not in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key
    assert os.path.isfile(result.lora_path) and load_file(result.lora_path)
    with open(result.curve_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cancel_then_resume_equals_an_uninterrupted_run(reward, tmp_path):
    config = R0Config(prompts=PROMPTS, iterations=5, batch_size=2, lr=3e-3, checkpoint_every=2, seed=3)
    whole = train_r0(fresh_pipe(), reward, config, str(tmp_path / "whole"))

    def cancel_at_3(info):
        if info["i"] == 2:
            raise Cancelled

    first = train_r0(fresh_pipe(), reward, config, str(tmp_path / "split"), callback=cancel_at_3)
    assert first.cancelled and first.lora_path.endswith("_partial.safetensors") and len(first.history) == 3
    second = train_r0(fresh_pipe(), reward, config, str(tmp_path / "split"))
    assert not second.cancelled and len(second.history) == 5
    a, b = load_file(whole.lora_path), load_file(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        train_r0(fresh_pipe(), reward, R0Config(prompts=PROMPTS, iterations=5, lr=1.0), str(tmp_path / "split"))


def test_trains_inside_inference_mode(reward, tmp_path):
    pipe = fresh_pipe()  # loaded outside inference mode, as the loader node does
    with torch.inference_mode():  # as ComfyUI runs every node
        result = train_r0(pipe, reward, R0Config(prompts=PROMPTS, iterations=2, batch_size=2), str(tmp_path))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="inference mode"):
            train_r0(fresh_pipe(), reward, R0Config(prompts=PROMPTS, iterations=2), str(tmp_path / "b"))
    assert len(result.history) == 2


def test_command_line_entry_point(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# tiny world\n" + "\n".join(PROMPTS) + "\n\n")
    main(["--model", "tiny", "--reward", "clip:tiny", "--prompts", str(prompts), "--out", str(tmp_path / "run"),
          "--iterations", "2", "--batch-size", "2", "--mode", "r0+"])
    assert '"lora"' in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "run" / "r0_lora.safetensors")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="mode"):
        R0Config(prompts=PROMPTS, mode="dpo")
    with pytest.raises(ValueError, match="eta_range"):
        R0Config(prompts=PROMPTS, eta_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="prompts"):
        R0Config(prompts=["", " "])


def test_full_fine_tune_moves_the_weights_and_saves_the_unet(reward, tmp_path):
    pipe = fresh_pipe()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = train_r0(pipe, reward, R0Config(prompts=PROMPTS, iterations=2, batch_size=2, lora_rank=0, lr=1e-4),
                      str(tmp_path))
    assert result.lora_path is None and result.history[-1]["reg"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert os.path.isfile(tmp_path / "unet" / "config.json")


def test_resume_refuses_another_reward_and_a_broken_state_and_keeps_foreign_files(reward, tmp_path):
    from r0_core.train import OtherRun

    config = R0Config(prompts=PROMPTS, iterations=2, batch_size=2, checkpoint_every=1)
    train_r0(fresh_pipe(), reward, config, str(tmp_path / "run"))
    hps = load_reward("hpsv2", "tiny", device="cpu", dtype=torch.float32)
    with pytest.raises(OtherRun, match="other rewards"):
        train_r0(fresh_pipe(), hps, config, str(tmp_path / "run"))
    state = tmp_path / "run" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])          # cut short, as a kill during a save on a full disk
    with pytest.raises(OtherRun, match="cannot be read.*delete it to start over"):
        train_r0(fresh_pipe(), reward, config, str(tmp_path / "run"))
    foreign = tmp_path / "theirs.safetensors"
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        train_r0(fresh_pipe(), reward, config, str(tmp_path / "new"), lora_path=str(foreign))
    assert foreign.read_bytes() == b"not ours"
    train_r0(fresh_pipe(), reward, config, str(tmp_path / "new"), lora_path=str(foreign), overwrite=True)
    assert load_file(foreign)
