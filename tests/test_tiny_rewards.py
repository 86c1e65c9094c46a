"""The tiny reward stack (r0_core.tiny.reward_stack): HPS's open_clip round trip, a small build on the tiny
pipeline read back by the three loaders, that its training learns the oracle's preferences, and the shipped
stack loaded by name (those tests fail until tiny-hps/, tiny-image-reward/ and tiny-aesthetic/ ship)."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from r0_core.loading import TINY, TINY_AESTHETIC, TINY_CLIP_DIR, TINY_HPS, TINY_IMAGE_REWARD, load_pipeline
from r0_core.rewards import ClipScore, load_reward, score_in_batches
from r0_core.rewards.hps import to_open_clip, to_transformers
from r0_core.tiny import protocol, world
from r0_core.tiny import reward_stack as rs

PROMPTS = ["a red circle on the left", "a blue square left of a green triangle"]


@pytest.fixture(scope="module")
def tiny_clip():
    return CLIPModel.from_pretrained(TINY_CLIP_DIR, local_files_only=True).eval()


def ground_truth(seed: int, n: int):
    images, captions = world.sample_batch(seed=seed, n=n)
    return rs.to_pixels(images), captions


def test_open_clip_round_trip_scores_as_the_clip(tiny_clip, tmp_path):
    state, unknown = to_open_clip(tiny_clip.state_dict())
    back, unknown_back = to_transformers(state)
    assert not unknown and not unknown_back and "visual.transformer.resblocks.0.attn.in_proj_weight" in state
    assert back.keys() == tiny_clip.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in tiny_clip.state_dict().items())

    # through the OpenAI-normalisation rebase, the saved file and open_clip_config.json, the unchanged HPS loader
    tokenizer = CLIPTokenizer.from_pretrained(TINY_CLIP_DIR, local_files_only=True)
    rs.save_hps(str(tmp_path), rs.hps_start(tiny_clip, tokenizer), half=False)
    hps = load_reward("hpsv2", str(tmp_path / rs.HPS_FILE), device="cpu", dtype=torch.float32)
    x, captions = ground_truth(seed=5, n=8)
    with torch.no_grad():
        expected = ClipScore.from_pretrained(TINY_CLIP_DIR).cosine(x, captions)
        torch.testing.assert_close(hps(x, captions), expected, atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_clip):
    """A very small stack built on the tiny pipeline: 12 training captions x 4 images, a few dozen steps each."""
    root = tmp_path_factory.mktemp("reward_stack")
    cfg = rs.RewardStackConfig(captions=12, images_per_caption=4, steps=(1, 8), sample_batch=48, near_miss_pairs=1,
                               validation_share=0.0, hps_steps=30, hps_batch=8, hps_lr=3e-4, blip_vision_layers=2,
                               blip_text_layers=2, itm_steps=5, itm_batch=8, ir_steps=30, ir_batch=8, ir_lr=3e-4,
                               aesthetic_steps=150, aesthetic_batch=16, checkpoint_every=1000)
    pipe = load_pipeline(TINY, device="cpu", dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(TINY_CLIP_DIR, local_files_only=True)
    images, captions = world.sample_batch(seed=0, n=64)
    work, out = str(root / "work"), str(root / "out")
    written = rs.build_reward_stack(cfg, work, pipe, tiny_clip, tokenizer, images, captions, out, TINY_CLIP_DIR)
    scorers = {family: load_reward(family, path, TINY_CLIP_DIR if family == "aesthetic" else None, device="cpu",
                                   dtype=torch.float32) for family, path in written.items()}
    return dict(cfg=cfg, work=work, out=out, pipe=pipe, written=written, scorers=scorers)


def test_built_stack_is_read_by_the_three_loaders(stack):
    assert sorted(os.listdir(stack["out"])) == ["tiny-aesthetic", "tiny-hps", "tiny-image-reward"]  # no temp left
    for family, scorer in stack["scorers"].items():
        info = json.loads(open(os.path.join(os.path.dirname(stack["written"][family]), "build_info.json")).read())
        assert info["data"]["captions"] == 12 and info["reward_stack_config"]["captions"] == 12
        assert all(p.dtype == torch.float32 for p in scorer.parameters())  # fp16 on disk, fp32 scorers
        x = torch.rand(2, 3, 32, 32, requires_grad=True)
        r = scorer(x, PROMPTS)
        assert r.shape == (2,) and torch.isfinite(r).all(), family
        r.sum().backward()
        assert x.grad.abs().sum() > 0, family
    tokenizer = stack["scorers"]["image_reward"].tokenizer
    assert all(len(tokenizer.tokenize(w)) == 1 for w in world.vocabulary())
    assert tokenizer.unk_token not in tokenizer.tokenize(" ".join(world.nonsense_words()))


def test_samples_are_of_training_captions_and_cached(stack):
    samples = rs.draw_samples(stack["cfg"], stack["work"], stack["pipe"])  # read back from the cache
    assert set(samples.prompts) <= set(world.training_captions()) and len(samples.prompts) == 48
    assert sorted(set(zip(samples.steps.tolist(), samples.guidance.tolist()))) == [(1, 1.0), (1, 2.0), (8, 1.0),
                                                                                    (8, 2.0)]
    assert samples.cpu_seconds > 0


def test_trained_stack_ranks_preferred_images_first(stack):
    samples = rs.draw_samples(stack["cfg"], stack["work"], stack["pipe"])
    pixels = rs.to_pixels(samples.images)
    pairs = rs.preference_pairs(samples, rs.near_miss_rejects(stack["cfg"], stack["work"], samples))
    assert len(pairs.prompts) >= 10
    for family in ("hpsv2", "image_reward"):
        accuracy = rs.pair_accuracy(stack["scorers"][family], pixels, pairs)["all"]
        assert accuracy >= 0.7, f"{family} ranks the preferred image first in {accuracy:.0%} of training pairs"
    validity = rs.validity_pairs(samples, set(samples.prompts))
    accuracy = rs.pair_accuracy(stack["scorers"]["aesthetic"], pixels, validity)["all"]
    assert accuracy >= 0.7, f"aesthetic ranks the valid image first in {accuracy:.0%} of training pairs"


def test_tiny_names_only_the_tiny_families():
    with pytest.raises(ValueError, match="tiny world has no 'pickscore' model"):
        load_reward("pickscore", TINY)


# ---- the shipped stack: these fail until r0_core/tiny/weights holds tiny-hps/, tiny-image-reward/, tiny-aesthetic/

def test_shipped_tiny_stack_loads_by_name():
    for family, path in (("hpsv2", TINY_HPS), ("image_reward", TINY_IMAGE_REWARD), ("aesthetic", TINY_AESTHETIC)):
        scorer = load_reward(family, TINY, device="cpu", dtype=torch.float32)
        assert load_reward(family, path, TINY_CLIP_DIR if family == "aesthetic" else None, device="cpu",
                           dtype=torch.float32) is scorer
        with torch.no_grad():
            assert torch.isfinite(scorer(torch.rand(2, 3, 32, 32), PROMPTS)).all()


def test_shipped_aesthetic_head_reads_the_shipped_clip():
    with open(os.path.join(os.path.dirname(TINY_AESTHETIC), "build_info.json")) as f:
        info = json.load(f)
    assert info["clip_sha256"] == rs.file_sha256(os.path.join(TINY_CLIP_DIR, "model.safetensors")), \
        "tiny-aesthetic was trained on another tiny-clip: rebuild the reward stack"


def test_shipped_tiny_rewards_prefer_the_true_caption_to_near_misses():
    """Ground-truth images of held-out (validation-half) captions against captions one edit away."""
    texts = protocol.captions("pair", "validation")[:12] + protocol.captions("positioned", "validation")[:6]
    images, truth, misses = [], [], []
    for i, text in enumerate(texts):
        scene = world.parse_caption(text)
        for miss in world.near_misses(scene):
            images.append(world.render(scene, seed=i))
            truth.append(text)
            misses.append(world.caption(miss))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    # HPS starts from a CLIP that reads relations; the BLIP of ImageReward learns them from scratch
    for family, least in (("hpsv2", 0.85), ("image_reward", 0.6)):
        scorer = load_reward(family, TINY, device="cpu", dtype=torch.float32)
        wins = (score_in_batches(scorer, x, truth) > score_in_batches(scorer, x, misses)).float().mean().item()
        assert wins >= least, f"shipped tiny {family}: true caption beats a near miss in only {wins:.0%}"
