"""Scores against golden outputs of the original packages' own code (model, tokenizer and preprocessing) on fixed
random weights, made by the scripts in tests/fixtures/ in an environment that has those packages; CI only reads
the fixtures."""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r0_core.rewards import load_reward

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_hps_equals_hpsv2(tmp_path):
    """hpsv2's bundled open_clip, its tokenizer (HTML entities, curly quotes, spacing, a prompt past 77 tokens)
    and its validation transform (letterbox) on non-square and square uint8 images, as `hpsv2.score` runs them."""
    folder = os.path.join(FIXTURES, "hps_golden")
    tensors, meta = read(os.path.join(folder, "golden.safetensors"))
    prompts = json.loads(meta["prompts"])
    rows = tensors.pop("token_embedding.rows")
    used = tensors.pop("token_embedding.weight")
    embedding = torch.zeros(49408, used.shape[1], dtype=used.dtype)
    embedding[rows] = used   # the rows no prompt uses are never read
    state = {k: v for k, v in tensors.items() if not k.startswith(("image.", "ids", "scores"))}
    save_file({**state, "token_embedding.weight": embedding}, tmp_path / "HPS_golden.safetensors")
    (tmp_path / "open_clip_config.json").write_text(open(os.path.join(folder, "open_clip_config.json")).read())

    scorer = load_reward("hpsv2", str(tmp_path / "HPS_golden.safetensors"), folder)
    ids = scorer.tokenize([scorer.clean(p) for p in prompts], 77)["input_ids"]
    golden_ids = tensors["ids"]
    for ours, theirs, prompt in zip(ids, golden_ids, prompts):
        length = int((theirs != 0).sum())   # open_clip pads with 0, transformers with eos: compare up to eos
        assert ours[:length].tolist() == theirs[:length].tolist(), prompt
    with torch.no_grad():
        scores = torch.cat([scorer(tensors[f"image.{i}"].permute(2, 0, 1)[None].float() / 255, [p])
                            for i, p in enumerate(prompts)])
    assert torch.allclose(scores, tensors["scores"], atol=1e-6), (scores, tensors["scores"])


def test_image_reward_equals_image_reward_package():
    """The ImageReward package's BLIP ViT, BERT with cross-attention, MLP, BERT tokenizer (case, accents,
    punctuation, unknown words, a prompt past 35 tokens) and PIL transform, as `ImageReward.score` runs them, on
    non-square and square uint8 images."""
    folder = os.path.join(FIXTURES, "image_reward_golden")
    tensors, meta = read(os.path.join(folder, "golden.safetensors"))
    prompts = json.loads(meta["prompts"])
    scorer = load_reward("image_reward", os.path.join(folder, "ImageReward.safetensors"))
    assert scorer.tokenize(prompts, 35)["input_ids"].tolist() == tensors["ids"].tolist()
    with torch.no_grad():
        scores = torch.cat([scorer(tensors[f"image.{i}"].permute(2, 0, 1)[None].float() / 255, [p])
                            for i, p in enumerate(prompts)])
    # ImageReward resizes the PIL image and rounds it back to uint8 before ToTensor; the scorer resizes floats
    # (it has to stay differentiable). So only images at the model's size match exactly; resized ones differ by
    # the rounding, measured at up to 5e-5 here against a spread of 0.016 between these scores.
    square = [i for i in range(len(prompts)) if tuple(tensors[f"image.{i}"].shape[:2]) == (32, 32)]
    assert square and torch.allclose(scores[square], tensors["scores"][square], atol=1e-6)
    assert torch.allclose(scores, tensors["scores"], atol=1e-4), (scores, tensors["scores"])
