"""Test-time R0 (noise refinement) on the tiny world: the reward rises, weights stay put, same seed same result,
the χ-shell regulariser holds the noise norm, inference mode and cancel work."""
import math

import pytest
import torch

from r0_core.denoisers import DiffusersDenoiser
from r0_core.family import decode, encode_prompts
from r0_core.generate import generate
from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import RewardModel, WeightedReward, load_reward
from r0_core.sampler import Cancelled, sample_r0
from r0_core.schedule import scheduler_sigmas
from r0_core.test_time import chi_shell_penalty, refine_noise
from r0_core.tiny import oracle
from r0_core.tiny.evaluate import eval_prompts

PROMPT = eval_prompts("pair", 1)[0]  # a held-out two-object relation caption


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def clip():
    return load_reward("clip", TINY, device="cpu")


class _Scaled(RewardModel):
    def __init__(self, scorer, scale):
        super().__init__()
        self.scorer, self.scale = scorer, scale

    def forward(self, images, prompts, references=None):
        return self.scale * self.scorer(images, prompts, references)


def _render(pipe, noise, prompt, steps=4):
    """The 4-step R0 sampler from a given start noise, as `generate` runs it from seeded noise."""
    cond, _ = encode_prompts(pipe, [prompt] * len(noise), 1.0)
    sigmas = scheduler_sigmas(pipe.scheduler, steps)
    x = sample_r0(DiffusersDenoiser.from_pipeline(pipe), noise * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                  {"cond": cond}, disable=True)
    return decode(pipe, x)


def _snapshot(*modules):
    return [(p.detach().clone(), p.requires_grad) for m in modules for p in m.parameters()]


def _unchanged(before, *modules):
    after = [p for m in modules for p in m.parameters()]
    return len(before) == len(after) and all(torch.equal(v, p) and g == p.requires_grad
                                             for (v, g), p in zip(before, after))


def test_iteration_0_is_generate_and_bad_input_is_named(pipe, clip):
    result = refine_noise(pipe, clip, PROMPT, iterations=0, seed=3, batch_size=2)
    with torch.no_grad():
        images, latents = generate(pipe, [PROMPT] * 2, seeds=[3, 4])
        scores = clip(images, PROMPT)
    assert torch.equal(result.initial_images, images) and torch.equal(result.images, images)
    assert torch.allclose(result.latents, latents) and result.rewards.shape == (1, 2)
    assert torch.allclose(result.rewards[0], scores) and result.best_iteration.tolist() == [0, 0]
    assert not result.cancelled
    with pytest.raises(ValueError, match="one per image"):
        refine_noise(pipe, clip, [PROMPT] * 3, batch_size=2)
    with pytest.raises(ValueError, match="iterations=-1"):
        refine_noise(pipe, clip, PROMPT, iterations=-1)
    with pytest.raises(ValueError, match="lr=0.0; expected a finite number > 0"):
        refine_noise(pipe, clip, PROMPT, lr=0.0)
    with pytest.raises(ValueError, match="guidance=nan"):
        refine_noise(pipe, clip, PROMPT, guidance=float("nan"))
    with pytest.raises(ValueError, match="RewardModel"):
        refine_noise(pipe, lambda images, prompts: images.mean(), PROMPT)
    made_in_inference_mode = _Scaled(clip, 1.0)
    with torch.inference_mode():   # weights created inside inference mode cannot pass gradients: say so
        made_in_inference_mode.head = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="outside inference mode"):
        refine_noise(pipe, made_in_inference_mode, PROMPT, iterations=0)


def test_refining_raises_the_reward_of_a_wrong_image_and_leaves_weights_alone(pipe, clip):
    # the seed whose plain 4-step image the oracle judges wrong and the reward likes least, above 0 (the CLIP
    # score is max(100 cos, 0): at 0 it has no gradient to follow)
    start = refine_noise(pipe, clip, PROMPT, iterations=0, batch_size=8)
    wrong = [i for i, im in enumerate(start.images)
             if not oracle.judge(im.permute(1, 2, 0).numpy(), PROMPT).correct and start.rewards[0, i] > 0]
    seed = min(wrong, key=lambda i: start.rewards[0, i])
    before = _snapshot(pipe.unet, pipe.vae, pipe.text_encoder, clip)

    result = refine_noise(pipe, clip, PROMPT, iterations=4, seed=seed)
    assert _unchanged(before, pipe.unet, pipe.vae, pipe.text_encoder, clip)   # bit-identical, flags restored
    assert result.rewards.shape == (5, 1)
    assert torch.isclose(result.rewards[0, 0], start.rewards[0, seed], atol=1e-3)
    assert result.best_reward[0] == result.rewards.max() and result.best_iteration[0] > 0
    assert result.best_reward[0] > result.initial_reward[0] + 5, result.rewards.flatten()
    with torch.no_grad():   # the returned image really has that reward, and is the render of the returned noise
        assert torch.allclose(clip(result.images, PROMPT), result.best_reward, atol=1e-3)
        assert torch.allclose(_render(pipe, result.noise, PROMPT), result.images, atol=1e-4)
        again, _ = generate(pipe, [PROMPT], seeds=[seed])
    assert torch.equal(again, result.initial_images)
    assert result.noise.dtype == torch.float32 and result.images.shape == (1, 3, 32, 32)


def test_same_seed_same_result_inside_inference_mode_whatever_the_batch(pipe, clip):
    first = refine_noise(pipe, clip, PROMPT, iterations=2, batch_size=2, seed=5)
    with torch.inference_mode():   # as ComfyUI runs every node
        second = refine_noise(pipe, clip, PROMPT, iterations=2, batch_size=2, seed=5)
    assert torch.equal(first.images, second.images) and torch.equal(first.noise, second.noise)
    assert torch.equal(first.rewards, second.rewards)
    assert not second.images.is_inference() and not second.noise.requires_grad
    alone = refine_noise(pipe, clip, PROMPT, iterations=2, batch_size=1, seed=6)   # image 1 of the batch above
    assert torch.allclose(alone.noise[0], first.noise[1], atol=1e-4)
    assert torch.allclose(alone.rewards[:, 0], first.rewards[:, 1], atol=1e-2)


def test_the_regulariser_keeps_the_noise_on_the_chi_shell(pipe, clip):
    d = 4 * 16 * 16
    direction = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
    penalty = chi_shell_penalty(direction * math.sqrt(d - 1) * torch.tensor([[0.9], [1.0], [1.1]]))
    assert penalty.argmin() == 1                             # least on the shell ‖ε‖ = sqrt(d − 1)

    def norms(reg_weight):
        seen = []
        refine_noise(pipe, clip, "a red circle left of a blue square", iterations=5, lr=20.0, batch_size=2,
                     reg_weight=reg_weight, callback=lambda info: seen.append(info["noise_norm"]))
        return torch.tensor(seen) - math.sqrt(d - 1)       # [iterations, B] distance from the shell

    free, held = norms(0.0), norms(0.01)
    # a large lr alone walks off the shell (an image whose tiny-CLIP score is clamped at 0 gets no gradient and
    # stays put, so the test asks it of the batch's furthest image)
    assert free[-1].max() > 2.0, free
    assert held.abs().max() < 1.5, held


def test_cancel_returns_the_best_so_far(pipe, clip):
    calls = []

    def stop_after_two(info):
        calls.append((info["i"], info["total"], len(info["reward"])))
        if info["i"] == 1:
            raise Cancelled

    before = _snapshot(pipe.unet, pipe.vae, clip)
    result = refine_noise(pipe, clip, PROMPT, iterations=10, batch_size=2, callback=stop_after_two)
    assert result.cancelled and calls == [(0, 10, 2), (1, 10, 2)]
    assert result.rewards.shape == (3, 2) and torch.equal(result.best_reward, result.rewards.max(0).values)
    assert (result.best_reward >= result.initial_reward).all() and result.images.shape == (2, 3, 32, 32)

    def broken(info):
        raise RuntimeError("not a cancel")
    with pytest.raises(RuntimeError, match="not a cancel"):
        refine_noise(pipe, clip, PROMPT, iterations=3, callback=broken)
    assert _unchanged(before, pipe.unet, pipe.vae, clip)     # requires_grad flags restored on every exit


def test_normalised_gradients_make_the_path_independent_of_the_reward_scale(pipe, clip):
    def run(reward, lr=1.0, **kw):
        return refine_noise(pipe, reward, PROMPT, iterations=2, lr=lr, grad_clip=None, **kw)
    plain, scaled = run(clip), run(_Scaled(clip, 1000.0))
    assert torch.allclose(plain.noise, scaled.noise, atol=1e-4)
    assert torch.allclose(1000 * plain.rewards, scaled.rewards, rtol=1e-4)
    raw = run(_Scaled(clip, 1000.0), normalize_gradients=False)
    assert not torch.allclose(plain.noise, raw.noise, atol=1e-2)
    # a WeightedReward normalises each reward, then sums: two copies of one reward step twice as far
    pair = run(WeightedReward([clip, _Scaled(clip, 1000.0)]), reg_weight=0.0)
    double = run(clip, reg_weight=0.0, lr=2.0)
    assert torch.allclose(pair.noise, double.noise, atol=1e-4)
    assert torch.allclose(pair.rewards[0], 1001 * plain.rewards[0], rtol=1e-4)
