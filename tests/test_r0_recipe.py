"""R0's whole recipe on the built-in tiny model: the implicit CFG reward (the frozen model's guidance direction),
several rewards with normalised gradients, η per image, R0+'s step distribution and the EMA of the weights."""
import os

import pytest
import torch
from safetensors.torch import load_file

from r0_core import lora
from r0_core.denoisers import DiffusersDenoiser
from r0_core.family import encode_prompts
from r0_core.generate import generate
from r0_core.loading import load_pipeline
from r0_core.rewards import WeightedReward, load_reward
from r0_core.rewards.implicit_cfg import ImplicitCFG
from r0_core.sampler import Cancelled, sample_r0, seeded_noise
from r0_core.schedule import scheduler_sigmas
from r0_core.test_time import refine_noise
from r0_core.train import R0Config, Trainable, generator_latents, main, pretrained, train_r0

PROMPTS = ["a red circle above a blue square", "a green triangle left of a yellow circle"]


def fresh_pipe():
    return load_pipeline("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def clip():
    return load_reward("clip", "tiny", device="cpu", dtype=torch.float32)


def mean_reward(pipe, reward, guidance=1.0):
    prompts = PROMPTS * 4
    with torch.no_grad():
        images, _ = generate(pipe, prompts, steps=4, guidance=guidance, seeds=range(100, 100 + len(prompts)))
        return float(reward(images, prompts).mean())


def test_implicit_cfg_direction_is_the_frozen_models_guidance_direction():
    pipe = fresh_pipe()
    cond, uncond = encode_prompts(pipe, PROMPTS, 1.0, with_uncond=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = ImplicitCFG(weight=1.0, t_range=(0.5, 0.5))
    model = DiffusersDenoiser.from_pipeline(pipe)
    d = cfg.direction(model, latents, {"cond": cond, "uncond": uncond}, pipe.scheduler.alphas_cumprod,
                      torch.Generator().manual_seed(1))
    # by hand: the same re-noising (t = 500 of 1000, noise drawn after the level), then x̂0(c) − x̂0(∅)
    gen = torch.Generator().manual_seed(1)
    sigma = cfg.sigmas(pipe.scheduler.alphas_cumprod, 2, gen)
    x_t = latents + sigma.view(-1, 1, 1, 1) * torch.randn(latents.shape, generator=gen)
    with torch.no_grad():
        expected = model(x_t, sigma, cond=cond) - model(x_t, sigma, cond=uncond)
    assert torch.allclose(d, expected, atol=1e-5) and d.abs().mean() > 1e-3
    # with no prompt to tell apart there is no direction
    same = cfg.direction(model, latents, {"cond": uncond, "uncond": uncond}, pipe.scheduler.alphas_cumprod,
                         torch.Generator())
    assert same.abs().max() < 1e-5


def test_the_pretrained_model_is_asked_however_far_the_lora_moved():
    pipe = fresh_pipe()
    config = R0Config(prompts=PROMPTS, lora_rank=4)
    trainable = Trainable(pipe.unet, config, "r0")
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    cond, _ = encode_prompts(pipe, PROMPTS[:1], 1.0)
    model = DiffusersDenoiser.from_pipeline(pipe)
    with torch.no_grad():
        base = model(x, sigma, cond=cond)
        for p in trainable.params:
            p.add_(0.05 * torch.randn_like(p))
        moved = model(x, sigma, cond=cond)
        with pretrained(trainable) as unet:
            asked = DiffusersDenoiser(unet, pipe.scheduler.alphas_cumprod, "v_prediction")(x, sigma, cond=cond)
        after = model(x, sigma, cond=cond)
    assert (moved - base).abs().max() > 1e-3          # the LoRA changes the model...
    assert torch.allclose(asked, base, atol=1e-6)     # ...but not what the implicit reward asks
    assert torch.equal(after, moved)                  # and it is back on afterwards


def test_implicit_cfg_reward_alone_teaches_the_no_cfg_generator_what_guidance_gives(clip, tmp_path):
    pipe = fresh_pipe()
    before, with_cfg = mean_reward(pipe, clip), mean_reward(pipe, clip, guidance=2.0)
    config = R0Config(prompts=PROMPTS, iterations=12, batch_size=4, lr=3e-3, seed=1, cfg_reward_weight=1.0)
    result = train_r0(pipe, None, config, str(tmp_path))
    after = mean_reward(pipe, clip)
    # the tiny CLIP never took part in training: it only sees the images move towards the CFG ones
    assert with_cfg > before + 5 and after > before + 2, (before, after, with_cfg)
    assert len(result.history[-1]["rewards"]) == 1  # the CFG gap
    with pytest.raises(ValueError, match="nothing to maximise"):
        train_r0(fresh_pipe(), None, R0Config(prompts=PROMPTS, iterations=1), str(tmp_path / "none"))


def test_full_mix_with_ema_resumes_exactly(clip, tmp_path):
    hps = load_reward("hpsv2", "tiny", device="cpu", dtype=torch.float32)
    mix = WeightedReward([clip, hps], [1.0, 0.5])
    config = R0Config(prompts=PROMPTS, iterations=4, batch_size=2, lr=3e-3, checkpoint_every=2, seed=2,
                      cfg_reward_weight=0.5, eta_per_image=True, ema_decay=0.9, adam_beta1=0.0)
    whole = train_r0(fresh_pipe(), mix, config, str(tmp_path / "whole"))
    assert len(whole.history[-1]["rewards"]) == 3   # CLIP, HPS, the CFG gap

    def cancel_at_2(info):
        if info["i"] == 1:
            raise Cancelled

    assert train_r0(fresh_pipe(), mix, config, str(tmp_path / "split"), callback=cancel_at_2).cancelled
    second = train_r0(fresh_pipe(), mix, config, str(tmp_path / "split"))
    a, b = load_file(whole.lora_path), load_file(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the saved LoRA is the average, not the last iterate
    no_ema = train_r0(fresh_pipe(), mix, R0Config(**{**config.__dict__, "ema_decay": 0.0}), str(tmp_path / "raw"))
    c = load_file(no_ema.lora_path)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_up.weight"))


def test_eta_per_image_is_each_image_run_with_its_own_eta():
    pipe = fresh_pipe()
    cond, _ = encode_prompts(pipe, PROMPTS, 1.0)
    model = DiffusersDenoiser.from_pipeline(pipe)
    sigmas = scheduler_sigmas(pipe.scheduler, 3)
    x = seeded_noise((2, 4, 8, 8), [0, 1]) * (1 + sigmas[0] ** 2).sqrt()
    etas = torch.tensor([[0.0, 1.0], [0.3, 0.7], [0.5, 0.5]])
    fixed = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def noise(sigma, sigma_next):  # the same ξ at a step whether or not another image's η asked for one
        return fixed[sigmas.tolist().index(float(sigma))]
    with torch.no_grad():
        both = sample_r0(model, x, sigmas, {"cond": cond}, eta=etas, noise_sampler=noise, disable=True)
        for i in range(2):
            one = sample_r0(model, x, sigmas, {"cond": cond}, eta=etas[:, i].contiguous(), noise_sampler=noise,
                            disable=True)
            assert torch.allclose(both[i], one[i], atol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        sample_r0(model, x, sigmas, {"cond": cond}, eta=torch.zeros(3, 5), disable=True)
    with pytest.raises(ValueError, match="eta"):
        sample_r0(model, x, sigmas, {"cond": cond}, eta=float("nan"), disable=True)


def test_recipe_settings_are_checked_and_old_runs_keep_their_fingerprint():
    for bad, match in (({"cfg_reward_weight": -1.0}, "implicit CFG reward weight"),
                       ({"cfg_reward_weight": float("nan")}, "implicit CFG reward weight"),
                       ({"cfg_reward_t_range": (0.9, 0.1)}, "t_range"),
                       ({"plus_step_weights": (1.0, 0.0)}, "plus_step_weights"),
                       ({"plus_step_weights": (0.0, 0.0, 0.0, 0.0)}, "plus_step_weights"),
                       ({"ema_decay": 1.0}, "ema_decay"), ({"adam_beta1": -0.1}, "adam_beta1"),
                       ({"lr": float("inf")}, "lr"), ({"lr": 0.0}, "lr"), ({"reg_weight": float("nan")}, "reg_weight"),
                       ({"reg_weight": -1.0}, "reg_weight"), ({"guidance": float("nan")}, "guidance"),
                       ({"guidance": 0.5}, "guidance"), ({"checkpoint_every": 0}, "checkpoint_every"),
                       ({"eta_range": (float("nan"), 1.0)}, "eta_range")):
        with pytest.raises(ValueError, match=match):
            R0Config(prompts=PROMPTS, **bad)
    # the options' neutral values leave the fingerprint as the trainer before them made it (runs resume)
    assert R0Config(prompts=PROMPTS).fingerprint() == R0Config(prompts=PROMPTS, ema_decay=0.0).fingerprint()
    assert R0Config(prompts=PROMPTS).fingerprint() != R0Config(prompts=PROMPTS, ema_decay=0.5).fingerprint()


def test_r0_plus_step_distribution_picks_the_step():
    pipe = fresh_pipe()
    cond, _ = encode_prompts(pipe, PROMPTS, 1.0)
    sigmas = scheduler_sigmas(pipe.scheduler, 4)
    denoiser, seen = DiffusersDenoiser.from_pipeline(pipe), []

    def model(x, sigma, **extra):  # the real denoiser, noting the level of each call
        seen.append(float(sigma[0]))
        return denoiser(x, sigma, **extra)
    for k in range(4):
        seen.clear()
        config = R0Config(prompts=PROMPTS, mode="r0+", plus_step_weights=tuple(float(i == k) for i in range(4)))
        generator_latents(model, config, {"cond": cond}, (2, 4, 8, 8), sigmas, torch.Generator().manual_seed(k))
        assert seen == pytest.approx(sigmas[:k + 1].tolist())  # k steps without grad, then x̂0 at step k


def test_command_line_takes_several_rewards_and_the_implicit_cfg_reward(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    main(["--model", "tiny", "--reward", "clip:tiny", "--reward", "hpsv2:tiny@0.5", "--cfg-reward-weight", "1",
          "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--iterations", "2", "--batch-size", "2",
          "--eta-per-image", "true", "--ema-decay", "0.5"])
    assert '"lora"' in capsys.readouterr().out and os.path.isfile(tmp_path / "run" / "r0_lora.safetensors")
    main(["--model", "tiny", "--cfg-reward-weight", "1", "--prompts", str(prompts), "--out", str(tmp_path / "cfg"),
          "--iterations", "1", "--batch-size", "2"])
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "x"), "--iterations", "1"])


def test_lora_adapter_is_left_active_after_training_with_the_implicit_reward(tmp_path):
    pipe = fresh_pipe()
    train_r0(pipe, None, R0Config(prompts=PROMPTS, iterations=1, batch_size=2, cfg_reward_weight=1.0),
             str(tmp_path))
    assert lora.active_loras(pipe) == [("r0", 1.0)]


def test_test_time_r0_takes_the_implicit_cfg_reward(clip):
    pipe = fresh_pipe()
    plain = refine_noise(pipe, clip, PROMPTS[0], iterations=3, batch_size=2, seed=5)
    mixed = refine_noise(pipe, clip, PROMPTS[0], iterations=3, batch_size=2, seed=5, cfg_reward_weight=1.0)
    assert torch.equal(plain.initial_images, mixed.initial_images)  # iterate 0 is the plain sample either way
    assert not torch.allclose(plain.noise, mixed.noise)              # the guidance direction moved the noise
    with pytest.raises(ValueError, match="implicit CFG reward weight"):
        refine_noise(pipe, clip, PROMPTS[0], iterations=1, cfg_reward_weight=-1.0)
