"""The reward nodes, run without ComfyUI, on the tiny world's CLIP and the tiny world's own images."""
import numpy as np
import pytest
import torch

from nodes import bridge
from nodes.reward_nodes import (BESIDE, RewardCombine, RewardLambdaHarmonic, RewardLoader, RewardRankSelect,
                                RewardScore, model_choices, support_choices)
from r0_core.rewards import ClipScore, LambdaHarmonic, WeightedReward
from r0_core.tiny import world


def comfy_images(seed, n, mix=(1, 0, 0)):
    """Tiny-world images as a ComfyUI IMAGE [B, H, W, 3] and their true captions."""
    images, captions = world.sample_batch(seed=seed, n=n, mix=mix)
    return torch.from_numpy(images).float() / 255, captions


def score(*args):
    out = RewardScore().score(*args)
    assert out["ui"]["text"] == [out["result"][1]]  # the table is shown on the node
    return out["result"]


@pytest.fixture(scope="module")
def tiny_clip():
    return RewardLoader().load("clip", "tiny", BESIDE, "cpu", "fp32")[0]


def test_loader_gives_the_cached_tiny_clip(tiny_clip):
    assert isinstance(tiny_clip, ClipScore)
    assert RewardLoader().load("clip", "tiny", BESIDE, "cpu", "fp32")[0] is tiny_clip
    with pytest.raises(ValueError, match="tiny world has no 'pickscore'"):
        RewardLoader().load("pickscore", "tiny", BESIDE, "cpu", "fp32")


def test_loader_lists_and_resolves_only_inside_reward_models(tmp_path, monkeypatch):
    monkeypatch.setenv("R0_MODELS_DIR", str(tmp_path))
    folder = tmp_path / "reward_models"
    (folder / "ImageReward").mkdir(parents=True)
    (folder / "ImageReward" / "ImageReward.pt").write_bytes(b"")
    (folder / "clip-vit-large-patch14").mkdir()
    (folder / "clip-vit-large-patch14" / "config.json").write_text("{}")
    assert model_choices() == ["tiny", "ImageReward/ImageReward.pt", "clip-vit-large-patch14"]
    assert support_choices() == [BESIDE, "ImageReward", "clip-vit-large-patch14"]
    with pytest.raises(ValueError, match="outside models/reward_models"):
        RewardLoader().load("clip", "../../secrets", BESIDE, "cpu", "fp32")
    with pytest.raises(FileNotFoundError, match="models/reward_models"):
        RewardLoader().load("clip", "missing", BESIDE, "cpu", "fp32")
    # an empty file is not an ImageReward checkpoint: the loader says which file and what it expected
    with pytest.raises(Exception, match="ImageReward.pt"):
        RewardLoader().load("image_reward", "ImageReward/ImageReward.pt", BESIDE, "cpu", "fp32")


def test_score_gives_one_float_per_image_and_a_table(tiny_clip):
    images, captions = comfy_images(seed=11, n=7)
    scores, text = score(tiny_clip, images, "\n".join(captions), 16, False)
    assert len(scores) == 7 and all(isinstance(s, float) for s in scores)
    assert len(text.splitlines()) == 8 and captions[3] in text
    # the rank column ranks by score (1 = best), rows stay in image order
    ranks = [int(line.split()[0]) for line in text.splitlines()[1:]]
    assert sorted(ranks) == list(range(1, 8)) and ranks[int(np.argmax(scores))] == 1
    assert [int(line.split()[1]) for line in text.splitlines()[1:]] == list(range(7))
    # chunked scoring (3 at a time) gives the same scores as one batch
    chunked, _ = score(tiny_clip, images, "\n".join(captions), 3, False)
    assert np.allclose(scores, chunked, atol=1e-4)
    # the true caption beats a shuffled one for most images
    shuffled, _ = score(tiny_clip, images, "\n".join(captions[1:] + captions[:1]), 16, False)
    assert np.mean(np.array(scores) > np.array(shuffled)) >= 5 / 7


def test_bad_images_and_prompt_counts_are_named(tiny_clip):
    images, _ = comfy_images(seed=1, n=4)
    with pytest.raises(ValueError, match="3 lines for 4 images"):
        score(tiny_clip, images, "a\nb\nc", 16, False)
    with pytest.raises(ValueError, match="RGBA"):
        score(tiny_clip, torch.rand(2, 32, 32, 4), "a red circle", 16, False)
    with pytest.raises(ValueError, match="grayscale"):
        score(tiny_clip, torch.rand(2, 32, 32, 1), "a red circle", 16, False)
    with pytest.raises(ValueError, match="at least 8x8"):
        score(tiny_clip, torch.rand(2, 4, 32, 3), "a red circle", 16, False)
    odd, _ = score(tiny_clip, torch.rand(2, 37, 53, 3), "a red circle", 16, False)
    assert len(odd) == 2  # any other size is resized and centre-cropped inside


def test_rank_select_keeps_the_best_k_in_order(tiny_clip):
    images, captions = comfy_images(seed=5, n=16)
    prompt = captions[0]
    best, scores, indices, text = RewardRankSelect().select(tiny_clip, images, prompt, 3, -1000.0, 16, False)
    all_scores, _ = score(tiny_clip, images, prompt, 16, False)
    assert indices == list(np.argsort(all_scores)[::-1][:3]) and scores == sorted(scores, reverse=True)
    assert torch.equal(best, images[indices])
    assert captions[indices[0]] == prompt  # the image drawn for the prompt wins
    kept = RewardRankSelect().select(tiny_clip, images, prompt, 16, scores[1], 16, False)[2]
    assert kept == indices[:2]
    with pytest.raises(ValueError, match="no image reached threshold"):
        RewardRankSelect().select(tiny_clip, images, prompt, 3, 999.0, 16, False)
    with pytest.raises(ValueError, match=r"k=0; expected a whole number >= 1"):
        RewardRankSelect().select(tiny_clip, images, prompt, 0, -1000.0, 16, False)


def test_combine_is_the_weighted_sum(tiny_clip):
    images, captions = comfy_images(seed=2, n=4)
    (combined,) = RewardCombine().combine(tiny_clip, 0.5, 2.0, 1.0, 1.0, False, reward_2=tiny_clip)
    assert isinstance(combined, WeightedReward) and combined.weights == [0.5, 2.0] and not combined.normalize_gradients
    single, _ = score(tiny_clip, images, "\n".join(captions), 16, False)
    both, _ = score(combined, images, "\n".join(captions), 16, False)
    assert np.allclose(both, 2.5 * np.array(single), rtol=1e-5)


def test_lambda_harmonic_prefers_the_subject_at_lambda_one(tiny_clip):
    images, captions = comfy_images(seed=8, n=256)
    red_circles = [i for i, c in enumerate(captions) if c == "a red circle"]
    others = [i for i, c in enumerate(captions) if "red" not in c and "circle" not in c]
    refs, candidates = images[red_circles[:3]], images[red_circles[3:5] + others[:2]]
    (subject,) = RewardLambdaHarmonic().build(tiny_clip, refs, 1.0)
    assert isinstance(subject, LambdaHarmonic)
    scores, _ = score(subject, candidates, "a photo", 16, False)
    assert min(scores[:2]) > max(scores[2:]) and all(0 < s <= 1 for s in scores)
    with pytest.raises(ValueError, match="RGBA"):
        RewardLambdaHarmonic().build(tiny_clip, torch.rand(1, 32, 32, 4), 0.5)


def test_offload_then_score_again(tiny_clip):
    images, captions = comfy_images(seed=3, n=2)
    first, _ = score(tiny_clip, images, "a red circle", 16, True)
    assert next(tiny_clip.parameters()).device.type == "cpu"
    again, _ = score(tiny_clip, images, "a red circle", 16, False)
    assert first == again
    assert bridge.folder_roots("reward_models")
