"""Reward scorers: exact against the reference formula on tiny random weights of the real architecture,
differentiable, and meaningful on the tiny world."""
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPModel

from r0_core.loading import TINY, TINY_CLIP_DIR
from r0_core.rewards import base
from r0_core.rewards.clip_score import ClipScore
from r0_core.rewards.families import load_reward, offload
from r0_core.rewards.composite import LambdaHarmonic, WeightedReward
from r0_core.rewards.aesthetic import AestheticScore
from r0_core.rewards.dino import DinoSimilarity
from r0_core.tiny import world
from tests.reward_weights import save_aesthetic, save_clip, save_dino


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    """A small random CLIPModel saved as a transformers folder, with OpenAI's normalisation constants."""
    folder = tmp_path_factory.mktemp("clip")
    save_clip(folder)
    return folder


def test_clip_score_equals_the_reference_formula(random_clip):
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle", "a blue square on the left", "a green triangle above a red circle"]
    scorer = ClipScore.from_pretrained(str(random_clip)).eval()
    ours = scorer(images, prompts)

    model = CLIPModel.from_pretrained(random_clip).eval()
    pixels = CLIPImageProcessor.from_pretrained(random_clip)(list(images.permute(0, 2, 3, 1).numpy()),
                                                             do_rescale=False, do_resize=False, do_center_crop=False,
                                                             return_tensors="pt").pixel_values
    ids = scorer.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    reference = (100 * out.logits_per_image.diagonal() / model.logit_scale.exp()).clamp(min=0)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6), (ours, reference)


def test_gradients_reach_the_images(random_clip):
    scorer = ClipScore.from_pretrained(str(random_clip)).eval()
    images = torch.rand(2, 3, 48, 40, requires_grad=True)  # resized and cropped inside, differentiably
    scorer(images, "a red circle").sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_bad_input_and_missing_files_are_named(random_clip, tmp_path):
    scorer = ClipScore.from_pretrained(str(random_clip))
    with pytest.raises(ValueError, match="expected float"):
        scorer(torch.rand(2, 32, 32, 3), "a red circle")
    with pytest.raises(ValueError, match="one per image"):
        scorer(torch.rand(2, 3, 32, 32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        scorer(torch.full((1, 3, 32, 32), float("nan")), "a red circle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks its weights"):
        ClipScore.from_pretrained(str(tmp_path))
    shutil.copy(random_clip / "model.safetensors", tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks vocab.json, merges.txt"):
        ClipScore.from_pretrained(str(tmp_path))


def test_models_are_cached_and_offloaded():
    a = load_reward("clip", TINY, device="cpu")
    assert load_reward("clip", TINY_CLIP_DIR, device="cpu") is a
    assert load_reward("clip", TINY, device="cpu", dtype=torch.float64) is not a
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    offload()
    assert next(a.parameters()).device.type == "cpu"


def test_the_reward_cache_keeps_the_most_recently_used(monkeypatch):
    monkeypatch.setenv("R0_MAX_REWARD_MODELS", "1")
    a = load_reward("clip", TINY, device="cpu")
    assert load_reward("clip", TINY, device="cpu") is a
    load_reward("aesthetic", TINY, device="cpu")                # the clip scorer is dropped
    assert load_reward("clip", TINY, device="cpu") is not a
    with pytest.raises(ValueError, match="tiny world has no 'pickscore'"):   # the tiny world has no PickScore
        load_reward("pickscore", TINY)
    with pytest.raises(ValueError, match="choose one of clip, hpsv2"):
        load_reward("hps", TINY)


def test_tiny_clip_prefers_the_true_caption():
    scorer = load_reward("clip", TINY, device="cpu")
    images, captions = world.sample_batch(seed=3, n=32, mix=(1, 0, 0))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    other = captions[1:] + captions[:1]
    with torch.no_grad():
        true, wrong = scorer(x, captions), scorer(x, other)
    same = np.array([a == b for a, b in zip(captions, other)])
    assert (true > wrong).numpy()[~same].mean() >= 0.9


class Affine(base.RewardModel):
    """A reward with a known image gradient: r(x) = scale · <a, x> per image."""

    def __init__(self, a, scale):
        super().__init__()
        self.a, self.scale = a, scale

    def forward(self, images, prompts, references=None):
        return self.scale * (images * self.a).flatten(1).sum(1)


def test_r0_mode_gives_each_reward_its_stated_share_of_the_gradient():
    torch.manual_seed(0)
    a, b = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    # scales 1000 and 0.001: without normalisation the first would drown the second
    reward = WeightedReward([Affine(a, 1000.0), Affine(b, 0.001)], weights=[1.0, 0.5])
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    loss, scores = reward.r0_surrogate(images, "x")
    loss.backward()
    expected = -(a / a.norm() + 0.5 * b / b.norm())
    assert torch.allclose(images.grad, expected.expand_as(images), atol=1e-6)
    assert scores.shape == (2, 2)
    assert torch.allclose(reward(images, "x"), 1000 * (images * a).flatten(1).sum(1) + 0.0005 * (
        images * b).flatten(1).sum(1))


def test_lambda_harmonic_formula_and_limits(random_clip):
    encoder = ClipScore.from_pretrained(str(random_clip)).eval()
    images, refs = torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        e, r, t = encoder.image_embeds(images), encoder.image_embeds(refs), encoder.text_embeds(["a red circle"] * 2)
        i_cos, t_cos = (e @ r.T).mean(1), (e * t).sum(-1)
        for lam in (0.0, 0.5, 1.0):
            got = LambdaHarmonic(encoder, lam)(images, "a red circle", refs)
            i, tt = (i_cos + 1) / 2, (t_cos + 1) / 2
            assert torch.allclose(got, 1 / (lam / i + (1 - lam) / tt), rtol=1e-5)
        assert torch.allclose(LambdaHarmonic(encoder, 0.0)(images, "a red circle", refs), (t_cos + 1) / 2)
    with pytest.raises(ValueError, match="reference images"):
        LambdaHarmonic(encoder)(images, "a red circle")
    with pytest.raises(ValueError, match="lam"):
        LambdaHarmonic(encoder, 1.5)(images, "a red circle", refs)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_dino_similarity_equals_cls_cosine(kind, tmp_path):
    from transformers import BitImageProcessor, Dinov2Model, ViTImageProcessor, ViTModel

    save_dino(tmp_path, kind)
    if kind == "vit":
        model = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False)
        processor = ViTImageProcessor.from_pretrained(tmp_path)
    else:
        model = Dinov2Model.from_pretrained(tmp_path)
        processor = BitImageProcessor.from_pretrained(tmp_path)
    scorer = DinoSimilarity.from_pretrained(str(tmp_path)).eval()
    images, refs = torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32)
    ours = scorer(images, "", refs)

    def cls(x):
        pixels = processor(list(x.permute(0, 2, 3, 1).numpy()), do_rescale=False, do_resize=False,
                           do_center_crop=False, return_tensors="pt").pixel_values
        with torch.no_grad():
            return torch.nn.functional.normalize(model.eval()(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(ours, (cls(images) @ cls(refs).T).mean(1), rtol=1e-5, atol=1e-6)
    grad_images = images.clone().requires_grad_(True)
    scorer(grad_images, "", refs).sum().backward()
    assert grad_images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reference images"):
        scorer(images, "")


def test_reference_embeddings_are_kept_while_the_references_are_unchanged(random_clip, tmp_path):
    """DINO and λ-Harmonic embed the same reference set once, not at every call, and again when it changes."""
    save_dino(tmp_path, "vit")
    dino = DinoSimilarity.from_pretrained(str(tmp_path)).eval()
    harmonic = LambdaHarmonic(ClipScore.from_pretrained(str(random_clip)).eval(), 0.5)
    images, refs = torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32)
    for scorer, encoder in ((dino, dino), (harmonic, harmonic.encoder)):
        calls = []
        encoder.image_embeds = lambda x, f=encoder.image_embeds: calls.append(len(x)) or f(x)
        first = scorer(images, "a red circle", refs)
        assert torch.allclose(scorer(images, "a red circle", refs), first) and calls == [2, 3, 2]
        refs_copy = refs.clone()
        assert torch.allclose(scorer(images, "a red circle", refs_copy), first) and calls[-2:] == [2, 3]
        refs_copy[0] = torch.rand(3, 32, 32)   # changed in place: embedded again, and the score moves
        moved = scorer(images, "a red circle", refs_copy)
        assert calls[-2:] == [2, 3] and not torch.allclose(moved, first)
        with torch.inference_mode():
            frozen = torch.rand(3, 3, 32, 32)
            scorer(images, "a red circle", frozen), scorer(images, "a red circle", frozen)
        assert calls[-5:] == [2, 3, 2, 3, 2]   # the moved set, then the frozen one once


def test_aesthetic_head_equals_the_linear_stack(random_clip, tmp_path):
    head, _ = save_aesthetic(tmp_path, clip_folder=random_clip)
    state = torch.load(head, weights_only=True)
    scorer = AestheticScore.from_pretrained(str(random_clip), head).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        x = scorer.clip.image_embeds(images)
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert torch.allclose(scorer(images), x.squeeze(-1), rtol=1e-5, atol=1e-5)
    torch.save({"layers.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="lacks layers.0.bias"):
        AestheticScore.from_pretrained(str(random_clip), str(tmp_path / "other.pth"))


def test_preprocess_truncates_the_long_side_as_torchvision_and_transformers_do():
    # 384 x 512 to a 224 short side: the long side is int(224 * 512 / 384) = 298 (round() would give 299)
    images = torch.rand(1, 3, 384, 512, generator=torch.Generator().manual_seed(0))
    out = base.preprocess(images, 224, [0, 0, 0], [1, 1, 1])
    resized = torch.nn.functional.interpolate(images, size=(224, 298), mode="bicubic", antialias=True,
                                              align_corners=False)
    assert torch.allclose(out, resized[..., :, 37:37 + 224], atol=1e-6)
    tall = base.preprocess(images.transpose(-1, -2), 224, [0, 0, 0], [1, 1, 1])
    assert torch.allclose(tall, out.transpose(-1, -2), atol=1e-6)
    # and the processor that made the official preprocessing says the same size
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, do_center_crop=False, do_normalize=False,
                                   do_rescale=False)
    shape = processor(images=np.zeros((384, 512, 3), np.float32), return_tensors="np")["pixel_values"].shape
    assert shape[-2:] == (224, 298)
