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


def test_aesthetic_equals_improved_aesthetic_predictor(tmp_path):
    """improved-aesthetic-predictor's simple_inference.py: OpenAI's `clip.load` model and PIL preprocess,
    `encode_image`, its numpy `normalized` and its `MLP`, on non-square and square uint8 images. The CLIP is
    handed to the scorer as a transformers folder, through the same key mapping HPS uses."""
    from transformers import CLIPConfig, CLIPModel

    from r0_core.rewards.base import OPENAI_MEAN, OPENAI_STD, preprocess
    from r0_core.rewards.clip_score import clip_tokenizer, features
    from r0_core.rewards.hps import infer_config, open_clip_overrides, to_transformers

    tensors, _ = read(os.path.join(FIXTURES, "aesthetic_golden.safetensors"))
    state = {k[len("clip."):]: v for k, v in tensors.items() if k.startswith("clip.")}
    state["token_embedding.weight"] = torch.zeros(64, 64)   # the image path never reads it
    tokenizer_dir = os.path.join(FIXTURES, "hps_golden")
    overrides = open_clip_overrides({"quick_gelu": True, "vision_cfg": {"width": 64}, "text_cfg": {"heads": 1}})
    model = CLIPModel(CLIPConfig(**infer_config(state, clip_tokenizer(tokenizer_dir), overrides)))
    mapped, unknown = to_transformers(state)
    assert not unknown
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    model.save_pretrained(tmp_path / "clip")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "clip" / name).write_text(open(os.path.join(tokenizer_dir, name)).read())
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    save_file(head, tmp_path / "head.safetensors")

    scorer = load_reward("aesthetic", str(tmp_path / "head.safetensors"), str(tmp_path / "clip"))
    count = sum(k.startswith("image.") for k in tensors)
    images = [tensors[f"image.{i}"].permute(2, 0, 1)[None].float() / 255 for i in range(count)]
    golden = tensors["scores"]
    with torch.no_grad():
        scores = torch.cat([scorer(image) for image in images])
        # the model, the normalisation and the head alone, on the pixels clip's own preprocess made
        embeds = torch.cat([features(scorer.clip.model.get_image_features(pixel_values=tensors[f"pixels.{i}"]))
                            for i in range(count)])
        from_their_pixels = scorer.head(torch.nn.functional.normalize(embeds, dim=-1)).squeeze(-1)
        ours = [preprocess(image, 32, OPENAI_MEAN, OPENAI_STD, 32) for image in images]
    assert torch.allclose(from_their_pixels, golden, atol=1e-5, rtol=0), (from_their_pixels, golden)
    # Preprocessing: clip resizes the PIL image, so each of Pillow's two passes is rounded to uint8 and clipped
    # to 0..255; the scorer resizes floats in one pass (it has to stay differentiable). At the model's size that
    # changes nothing; on smooth images it is the rounding (under 1/255 before normalising); on noise, bicubic
    # overshoot that Pillow clips between its passes reaches 16/255.
    smooth, noise = range(6, count), range(1, 6)
    assert tuple(images[0].shape[-2:]) == (32, 32) and torch.equal(ours[0], tensors["pixels.0"])
    assert abs(float(scores[0] - golden[0])) < 1e-5
    for i in smooth:
        assert (ours[i] - tensors[f"pixels.{i}"]).abs().max() * min(OPENAI_STD) < 1.05 / 255
    # the end-to-end scores, against a spread of 1.2 between these images (the random head is steep)
    assert golden.max() - golden.min() > 1.0
    assert (scores - golden)[list(smooth)].abs().max() < 1e-2, (scores, golden)
    assert (scores - golden)[list(noise)].abs().max() < 3e-2, (scores, golden)
