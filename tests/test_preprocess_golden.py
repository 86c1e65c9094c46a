"""The scorers' preprocessing against golden outputs of the original packages' own code, made by
tests/fixtures/make_preprocess_golden.py in an environment with torchvision and hpsv2, on non-square and square
images: torchvision's Resize (the long side truncated, as torchvision computes it) + centre crop + normalisation
for CLIP, ImageReward and the aesthetic head, and hpsv2's letterbox for HPS."""
import os

import pytest
import torch
from safetensors import safe_open

from r0_core.rewards.base import OPENAI_MEAN, OPENAI_STD, preprocess
from r0_core.rewards.hps import letterbox

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "preprocess_golden.safetensors")
CASES = {"wide": (96, 128, 56), "tall": (128, 96, 56), "square": (80, 80, 56), "upscale": (40, 52, 56)}


@pytest.mark.parametrize("index, name", list(enumerate(CASES)))
def test_preprocess_equals_torchvision(index, name):
    h, w, n = CASES[name]
    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(index))
    with safe_open(FIXTURE, "pt") as f:
        golden, input_sum = f.get_tensor(name), f.get_tensor(name + ".input_sum")
    assert torch.allclose(images.sum(dtype=torch.float64).reshape(1), input_sum)   # the same random images
    ours = preprocess(images, n, OPENAI_MEAN, OPENAI_STD, crop=n)
    assert ours.shape == golden.shape
    assert torch.allclose(ours, golden, atol=1e-5), (ours - golden).abs().max()


@pytest.mark.parametrize("index, name", list(enumerate(CASES)))
def test_hps_letterbox_equals_hpsv2(index, name):
    h, w, n = CASES[name]
    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(index))
    with safe_open(FIXTURE, "pt") as f:
        golden = f.get_tensor(name + ".hps")
    ours = preprocess(letterbox(images, n), (n, n), OPENAI_MEAN, OPENAI_STD)   # as HPSv2.image_embeds does
    assert ours.shape == golden.shape
    assert torch.allclose(ours, golden, atol=1e-5), (ours - golden).abs().max()
