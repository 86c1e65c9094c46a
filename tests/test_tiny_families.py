"""The tiny SDXL and SD3 models' build (r0_core.tiny.families): a few real steps on world images give a folder the
public loader reads, in fp16, holding the world's own frozen parts, and a stopped build resumes to the same
weights as an unbroken one."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from r0_core import family
from r0_core.generate import generate
from r0_core.loading import TINY_PIPELINE_DIR, load_pipeline
from r0_core.tiny import families

SMALL = ["--num-images", "64", "--batch", "4", "--eval-seeds", "0", "--checkpoint-every", "1"]


def _build(tmp_path, fam, steps, work="work"):
    families.main(["--family", fam, "--steps", str(steps), "--out", str(tmp_path / "out"),
                   "--work", str(tmp_path / work), *SMALL])
    return str(tmp_path / "out" / f"tiny-{fam}")


@pytest.mark.parametrize("fam", families.FAMILIES)
def test_build_saves_a_loadable_fp16_pipeline_of_the_world(tmp_path, fam):
    folder = _build(tmp_path, fam, 2)
    with open(os.path.join(folder, "build_info.json")) as f:
        assert json.load(f)["build_config"]["family"] == fam
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    assert family.is_flow(pipe) == (fam == "sd3") and family.is_sdxl(pipe) == (fam == "sdxl")
    images, _ = generate(pipe, ["a red circle", "a blue square on the left"], steps=4, guidance=2.0, seeds=[0, 1])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    backbone = "unet" if fam == "sdxl" else "transformer"
    stored = load_file(os.path.join(folder, backbone, "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    # the frozen text tower is the world's, rounded to fp16
    world = load_file(os.path.join(TINY_PIPELINE_DIR, "text_encoder", "model.safetensors"))
    mine = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    key = "encoder.layers.0.self_attn.q_proj.weight"   # SD3's tower with a projection nests it in text_model
    assert torch.equal(mine[key if fam == "sdxl" else f"text_model.{key}"], world[key].half())


def test_a_stopped_build_resumes_to_the_unbroken_weights(tmp_path):
    unbroken = _build(tmp_path / "a", "sdxl", 3)
    _build(tmp_path / "b", "sdxl", 2)            # stopped after 2 of 3 steps (its checkpoint says so)
    resumed = _build(tmp_path / "b", "sdxl", 3)
    a = load_file(os.path.join(unbroken, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(resumed, "unet", "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
