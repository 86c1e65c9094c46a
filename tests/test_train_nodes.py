"""The R0 training nodes, run without ComfyUI: train, cancel (partial LoRA kept, named), apply a LoRA file,
refine at test time."""
import os

import pytest
import torch
from safetensors.torch import load_file

from nodes import bridge
from nodes.r0_nodes import R0FewStepGenerate, get_pipeline
from nodes.reward_nodes import BESIDE, RewardLoader
from nodes.train_nodes import R0ApplyLoRA, R0TestTimeRefine, R0Train
from r0_core.sampler import Cancelled

PROMPTS = "a red circle above a blue square\na green triangle left of a yellow circle"


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("R0_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("R0_OUTPUT_DIR", str(tmp_path / "out"))
    return tmp_path


def train(save_name, steps=2, lr=1e-3, family="clip", **recipe):
    reward = RewardLoader().load(family, "tiny", BESIDE, "cpu", "fp32")[0]
    with torch.inference_mode():  # as ComfyUI runs nodes
        return R0Train().train(get_pipeline("tiny"), reward, PROMPTS, steps, lr, 4, 0.01, 0.0, 1.0, "r0+", 0,
                               save_name, 2, 4, 1.0, 32, 32, **recipe)


def generate(pipeline):
    return R0FewStepGenerate().generate(pipeline, "a red circle above a blue square", 4, 0.0, 1.0, 3, 2, 32, 32,
                                        False)[0]


def test_train_then_apply_the_saved_lora(folders):
    pipeline, path, curve = train("node_run")
    assert path == str(folders / "models" / "loras" / "node_run.safetensors") and os.path.isfile(path)
    assert curve.ndim == 4 and curve.shape[-1] == 3 and curve.std() > 0
    trained = generate(pipeline)
    base = generate(get_pipeline("tiny"))  # the same cached pipeline, without the LoRA
    assert not torch.allclose(trained, base)
    (applied,) = R0ApplyLoRA().apply(get_pipeline("tiny"), "node_run.safetensors", 1.0)
    assert torch.allclose(generate(applied), trained, atol=1e-5)
    assert R0Train.IS_CHANGED() != R0Train.IS_CHANGED()  # never served from ComfyUI's cache


def test_train_with_the_implicit_cfg_reward_and_ema(folders):
    _, plain, _ = train("plain")
    _, recipe, _ = train("recipe", cfg_reward_weight=1.0, eta_per_image=True, ema_decay=0.5)
    a, b = load_file(plain), load_file(recipe)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_cancel_keeps_a_partial_lora_and_says_where(folders, monkeypatch, caplog):
    def cancel_at_2(total):
        def callback(info):
            if info["i"] == 1:
                raise Cancelled
        return callback
    monkeypatch.setattr(bridge, "cancellable_progress", cancel_at_2)
    with pytest.raises(Cancelled), caplog.at_level("INFO"):
        train("stopped", steps=5)
    partial = folders / "models" / "loras" / "stopped_partial.safetensors"
    assert partial.is_file() and str(partial) in caplog.text


def test_test_time_refine_node_returns_refined_and_initial_images(folders):
    reward = RewardLoader().load("clip", "tiny", BESIDE, "cpu", "fp32")[0]
    with torch.inference_mode():
        refined, initial = R0TestTimeRefine().refine(get_pipeline("tiny"), reward, "a red circle above a blue square",
                                                     3, 5.0, 0, 4, 1.0, 2, 32, 32)
    assert refined.shape == initial.shape == (2, 32, 32, 3)
    with torch.no_grad():
        scores = reward(torch.cat([refined, initial]).permute(0, 3, 1, 2), "a red circle above a blue square")
    assert (scores[:2] >= scores[2:] - 1e-4).all()  # the best iterate is kept, never worse than the start


def test_a_lora_the_run_did_not_make_is_never_overwritten(folders, caplog):
    loras = folders / "models" / "loras"
    loras.mkdir(parents=True)
    mine = loras / "portrait.safetensors"
    mine.write_bytes(b"the user's own LoRA")
    with caplog.at_level("INFO"):
        _, path, _ = train("portrait")
    assert path == str(loras / "portrait_2.safetensors") and mine.read_bytes() == b"the user's own LoRA"
    assert "saved as portrait_2.safetensors" in caplog.text
    caplog.clear()
    # the same run queued again is found and reused, not moved to a third name
    assert train("portrait")[1] == path
    # another reward, or other settings, under the same name: a new run beside it, the first one kept
    other_reward = train("portrait", family="hpsv2")[1]
    other_lr = train("portrait", lr=2e-3)[1]
    assert {other_reward, other_lr} == {str(loras / "portrait_3.safetensors"), str(loras / "portrait_4.safetensors")}
    # unless the user says to overwrite
    with caplog.at_level("INFO"):
        _, replaced, _ = train("portrait", overwrite=True)
    assert replaced == str(mine) and mine.read_bytes() != b"the user's own LoRA"
    assert "overwrite" in caplog.text


@pytest.mark.parametrize("name", ["a/b", "a?b", "", " ", "x" * 101, "a\x00b", "../up"])
def test_save_names_are_refused_not_mapped(folders, name):
    with pytest.raises(ValueError, match="save_name"):
        train(name)
