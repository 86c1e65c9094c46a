"""RPO trainer on the built-in tiny model and a built-in subject: the loss pieces, a short run end to end,
DreamBooth mode, cancel and resume, full fine-tuning and bad input."""
import dataclasses
import functools
import math

import pytest
import torch

from r0_core import lora
from r0_core.family import diffusion_loss, training_timesteps
from r0_core.generate import generate
from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import load_reward
from r0_core.sampler import Cancelled
from r0_core.tiny import subjects
from rpo_core.train import (RPOConfig, load_validated, pair_losses, pair_noise, preference_labels, preference_loss,
                            select, train_rpo, validation_score)

SUBJECT = subjects.SUBJECTS[0]


@pytest.fixture(scope="module")
def encoder():
    return load_reward("clip", TINY)


@pytest.fixture(scope="module")
def references():
    return torch.from_numpy(subjects.references(SUBJECT)).permute(0, 3, 1, 2).float()


def small_config(**overrides) -> RPOConfig:
    settings = dict(token=SUBJECT.token, class_name=SUBJECT.shape, prompts=subjects.training_prompts(SUBJECT)[:2],
                    iterations=4, batch_size=2, lr=1e-3, lora_rank=4, negatives_per_prompt=2, validate_every=2,
                    validation_images=1, checkpoint_every=2)
    settings.update(overrides)
    return RPOConfig(**settings)


def test_labels_follow_the_bradley_terry_probability():
    gen = torch.Generator().manual_seed(0)
    r_ref, r_gen = torch.full((20000,), 0.62), torch.full((20000,), 0.60)
    for tau, expected in ((0.02, 1 / (1 + math.exp(-1))), (1.0, 1 / (1 + math.exp(-0.02)))):
        assert preference_labels(r_ref, r_gen, tau, gen).mean().item() == pytest.approx(expected, abs=0.015)


def test_preference_loss_applies_beta_and_pushes_towards_the_preferred_image():
    delta = torch.tensor([0.0])
    assert preference_loss(delta, torch.ones(1), 1000.0).item() == pytest.approx(math.log(2))
    delta = torch.tensor([1e-3], requires_grad=True)
    small, large = preference_loss(delta, torch.ones(1), 1.0), preference_loss(delta, torch.ones(1), 1000.0)
    assert large.item() < small.item() - 0.3   # β scales Δ: the paper's SD script forgot it
    large.backward()
    assert delta.grad.item() < 0               # y = 1 (reference preferred): the loss falls as Δ grows
    delta.grad = None
    preference_loss(delta, torch.zeros(1), 1000.0).backward()
    assert delta.grad.item() > 0


def test_pairs_share_noise_and_timestep():
    pipe = load_pipeline(TINY)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    noise, t = pair_noise(latents, functools.partial(training_timesteps, pipe.scheduler), gen)
    cond = {"cond": pipe.encode_prompt(["a vum circle"] * 6, "cpu", 1, False)[0]}
    with torch.no_grad():
        losses = pair_losses(functools.partial(diffusion_loss, pipe), pipe.unet, latents, latents.clone(), cond,
                             noise, t)
    # the same image and prompt in both halves of every pair: identical losses, so Δ = 0 (up to the last bits a
    # CPU kernel may round differently by batch row; different noise would differ by ~0.1)
    torch.testing.assert_close(losses[:3], losses[3:], rtol=0, atol=1e-6)
    assert len(set(t.tolist())) > 1 or len(t) == 1


def test_rpo_trains_selects_the_best_checkpoint_and_saves_a_lora_that_reproduces_it(tmp_path, encoder,
                                                                                     references):
    pipe = load_pipeline(TINY)
    validation_prompts = [SUBJECT.prompt("on the left"), SUBJECT.prompt("below a red square")]
    config = small_config(validation_prompts=validation_prompts, keep_validated=True)
    result = train_rpo(pipe, encoder, references, config, str(tmp_path / "run"))
    assert [v["iteration"] for v in result.validations] == [2, 4]
    best = max(result.validations, key=lambda v: v["score"])
    assert (result.best_iteration, result.best_score) == (best["iteration"], pytest.approx(best["score"]))
    # each validation keeps its per-image cosines: any λ_val can select afterwards, the run's own included
    for v in result.validations:
        assert len(v["image_cos"]) == len(validation_prompts) * config.validation_images
        assert validation_score(v, config.lambda_val) == pytest.approx(v["score"], abs=1e-6)
    assert select(result.validations, config.lambda_val)["iteration"] == result.best_iteration
    assert {select(result.validations, lam)["iteration"] for lam in (0.0, 0.3, 0.7, 1.0)} <= {2, 4}
    assert all(h["l_pref"] > 0 for h in result.history) and all(h["l_sim"] > 0 for h in result.history)
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
    with torch.no_grad():
        trained, _ = generate(pipe, ["a vum circle on the left"], seeds=[5], guidance=2.0)
    fresh = load_pipeline(TINY)
    name = lora.load_lora(fresh, result.lora_path)
    lora.use_loras(fresh, [(name, 1.0)])
    with torch.no_grad():
        loaded, _ = generate(fresh, ["a vum circle on the left"], seeds=[5], guidance=2.0)
        lora.use_loras(fresh, [])
        base, _ = generate(fresh, ["a vum circle on the left"], seeds=[5], guidance=2.0)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=2e-5)
    assert (loaded - base).abs().max() > 1e-3   # the LoRA changed the model
    other = 2 if result.best_iteration == 4 else 4   # the saved weights of each validation
    for iteration, same in ((other, False), (result.best_iteration, True)):
        load_validated(pipe.unet, str(tmp_path / "run"), iteration)
        with torch.no_grad():
            images, _ = generate(pipe, ["a vum circle on the left"], seeds=[5], guidance=2.0)
        assert ((images - trained).abs().max() < 2e-5) == same


def test_dreambooth_mode_has_no_preference_term_and_keeps_the_last_weights(tmp_path, encoder, references):
    pipe = load_pipeline(TINY)
    result = train_rpo(pipe, encoder, references, small_config(preference=False, select_best=False, iterations=3,
                                                              validate_every=10), str(tmp_path / "db"))
    assert all(h["l_pref"] == 0 for h in result.history)
    assert [v["iteration"] for v in result.validations] == [3]   # validated once, at the end


def test_cancel_keeps_the_partial_state_and_resume_matches_an_uninterrupted_run(tmp_path, encoder, references):
    config = small_config()
    whole = train_rpo(load_pipeline(TINY), encoder, references, config, str(tmp_path / "whole"))

    def cancel_at_3(info):
        if info["i"] == 2:
            raise Cancelled

    stopped = train_rpo(load_pipeline(TINY), encoder, references, config, str(tmp_path / "split"),
                        callback=cancel_at_3)
    assert stopped.cancelled and stopped.lora_path.endswith("_partial.safetensors") and len(stopped.history) == 3
    resumed = train_rpo(load_pipeline(TINY), encoder, references, config, str(tmp_path / "split"))
    assert not resumed.cancelled and len(resumed.history) == 4
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-5)
    from safetensors.torch import load_file
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        train_rpo(load_pipeline(TINY), encoder, references, dataclasses.replace(config, lr=5e-4),
                  str(tmp_path / "split"))


def test_full_fine_tune_moves_the_unet_against_a_frozen_copy(tmp_path, encoder, references):
    pipe = load_pipeline(TINY)
    before = [p.detach().clone() for p in pipe.unet.parameters()]
    result = train_rpo(pipe, encoder, references, small_config(lora_rank=0, iterations=2, lr=1e-4,
                                                               select_best=False), str(tmp_path / "full"))
    assert result.lora_path is None and (tmp_path / "full" / "unet").is_dir()
    assert any((p.detach() - q).abs().max() > 0 for p, q in zip(pipe.unet.parameters(), before))


def test_prior_preservation_adds_its_loss(tmp_path, encoder, references):
    plain = train_rpo(load_pipeline(TINY), encoder, references, small_config(preference=False, iterations=2),
                      str(tmp_path / "plain"))
    prior = train_rpo(load_pipeline(TINY), encoder, references,
                      small_config(preference=False, iterations=2, prior_weight=1.0), str(tmp_path / "prior"))
    assert prior.history[0]["loss"] > plain.history[0]["loss"]


@pytest.mark.parametrize("overrides, message", [
    (dict(prompts=["a circle on the left"]), "lack the token"),
    (dict(token="two words"), "token"),
    (dict(lambda_val=1.5), "lambda_val"),
    (dict(tau=0.0), "tau"),
])
def test_bad_settings_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_bad_references_are_refused(tmp_path, encoder):
    with pytest.raises(ValueError, match="references"):
        train_rpo(load_pipeline(TINY), encoder, torch.rand(3, 32, 32), small_config(), str(tmp_path / "bad"))


def test_command_line_trains_from_a_folder_of_references(tmp_path, capsys):
    import json
    from rpo_core.train import main

    dataset = subjects.write_dreambench(str(tmp_path / "bench"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(subjects.training_prompts(SUBJECT)[:2]) + "\n")
    # no --prompts-file: on the tiny model the tiny subjects' eight training prompts, not the paper's
    main(["--model", "tiny", "--references", f"{dataset}/{SUBJECT.name}", "--token", SUBJECT.token,
          "--class-name", SUBJECT.shape, "--validation-prompts-file", str(prompts), "--out", str(tmp_path / "cli"),
          "--iterations", "2", "--validate-every", "1", "--negatives-per-prompt", "1", "--validation-images", "1",
          "--lr", "1e-3", "--preference", "false"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["best_iteration"] in (1, 2) and (tmp_path / "cli" / "rpo_lora.safetensors").exists()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "cli" / "rpo_lora.safetensors"), "pt") as f:
        trained_on = json.loads(f.metadata()["rpo_config"])
    assert trained_on["prompts"] == subjects.training_prompts(SUBJECT)
    assert trained_on["validation_prompts"] == subjects.training_prompts(SUBJECT)[:2]
