"""RPO nodes run as ComfyUI runs them (inference mode), without ComfyUI: reference loading and training."""
import numpy as np
import pytest
import torch
from PIL import Image

from nodes import bridge
from nodes.r0_nodes import R0LoadPipeline
from nodes.reward_nodes import RewardLoader
from nodes.rpo_nodes import RPOLoadReferences, RPOTrain
from r0_core.sampler import Cancelled
from r0_core.tiny import subjects


def test_references_load_from_the_input_folder_and_the_built_in_subjects(tmp_path, monkeypatch):
    monkeypatch.setenv("R0_INPUT_DIR", str(tmp_path))
    folder = tmp_path / "my_dog"
    folder.mkdir()
    Image.new("RGBA", (60, 40), (255, 0, 0, 0)).save(folder / "a.png")      # transparent: becomes white
    Image.new("L", (30, 50), 128).save(folder / "b.jpg")
    assert "my_dog" in RPOLoadReferences.INPUT_TYPES()["required"]["source"][0]
    with torch.inference_mode():
        (refs,) = RPOLoadReferences().load("my_dog", 32)
    assert refs.shape == (2, 32, 32, 3)
    assert refs[0].min() > 0.99 and abs(float(refs[1].mean()) - 128 / 255) < 0.02
    with pytest.raises(ValueError, match="outside the input folder"):
        RPOLoadReferences().load("../elsewhere", 32)
    (tiny,) = RPOLoadReferences().load("tiny/ring_circle", 32)
    expected = torch.from_numpy(subjects.references(subjects.SUBJECTS[0]))
    torch.testing.assert_close(tiny, expected, atol=1e-5, rtol=0)


def test_rpo_train_node_trains_in_inference_mode_and_cancel_keeps_the_best_so_far(tmp_path, monkeypatch):
    monkeypatch.setenv("R0_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("R0_OUTPUT_DIR", str(tmp_path / "out"))
    subject = subjects.SUBJECTS[1]
    prompts = "\n".join(subjects.training_prompts(subject)[:2])
    with torch.inference_mode():   # as ComfyUI runs every node
        pipeline = R0LoadPipeline().load("tiny", "auto", "auto")[0]
        encoder = RewardLoader().load("clip", "tiny", "(beside the model)", "auto", "auto")[0]
        (refs,) = RPOLoadReferences().load("tiny/split_square", 32)
        args = dict(pipeline=pipeline, references=refs, encoder=encoder, token=subject.token,
                    class_name=subject.shape, prompts=prompts, steps=4, lambda_val=0.5, beta=100.0, tau=0.1,
                    lr=1e-3, lora_rank=4, validate_every=2, seed=0, save_name="node_check", preference=True,
                    sampler_steps=4, guidance=2.0)
        tuned, path, curve = RPOTrain().train(**args)
    assert path.endswith("node_check.safetensors") and (tmp_path / "models" / "loras" / "node_check.safetensors").exists()
    assert ("node_check", 1.0) in tuned["loras"] and curve.shape[0] == 1 and curve.shape[-1] == 3

    calls = []

    def cancel_after_one(total):
        def callback(info):
            calls.append(info["i"])
            if info["i"] == 2:
                raise Cancelled
        return callback

    monkeypatch.setattr(bridge, "cancellable_progress", cancel_after_one)
    with torch.inference_mode(), pytest.raises(Cancelled):
        RPOTrain().train(**{**args, "save_name": "node_cancel"})
    assert (tmp_path / "models" / "loras" / "node_cancel_partial.safetensors").exists()
    assert calls == [0, 1, 2]
    assert np.isfinite(curve.numpy()).all()
