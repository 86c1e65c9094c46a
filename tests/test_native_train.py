"""R0 Train (native MODEL)'s adapter code without ComfyUI. A stand-in for ComfyUI's ModelPatcher applies the
node's own weight wrappers (SwitchedLoRA) to the tiny world's real UNet, as ComfyUI's weight_function does, and
r0_core.train.fit_r0 trains them: the first iteration is the pipeline trainer's, the weights move, switched off
the model is the pretrained one, a cancelled run resumes to the same LoRA, and the file is in ComfyUI's format.
(scripts/comfy_native_train.py runs the node itself in a real ComfyUI and loads the file with LoraLoader.)"""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from nodes import NODE_CLASS_MAPPINGS
from nodes.native_train import R0TrainNative, add_native_lora, adapted_layers, save_native_lora
from r0_core import family
from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import load_reward
from r0_core.sampler import Cancelled, vp_noise_scaling
from r0_core.train import (R0Config, R0Generator, fit_r0, make_accelerator, run_fingerprint, saved_name,
                           train_r0)

PROMPTS = ["a red circle above a blue square", "a green triangle left of a yellow circle"]


class Patcher:
    """ComfyUI's ModelPatcher as far as add_native_lora uses it: `.model` (a BaseModel holding the network as
    `diffusion_model`, whose matrix layers carry a `weight_function` list) and add_weight_wrapper(key, f), here
    applied with torch's parametrize (W -> f(W) at every use, as ComfyUI's ops do)."""

    def __init__(self, unet):
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet
        for module in unet.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight_function = []

    def add_weight_wrapper(self, key, wrapper):
        parametrize.register_parametrization(self.model.get_submodule(key.rsplit(".", 1)[0]), "weight", wrapper,
                                             unsafe=True)


@pytest.fixture()
def pipe():
    pipe = load_pipeline(TINY, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def config(**overrides):
    return R0Config(**{"prompts": PROMPTS, "iterations": 4, "batch_size": 2, "steps": 2, "lr": 3e-3,
                       "cfg_reward_weight": 0.5, "checkpoint_every": 2, "mixed_precision": "no", **overrides})


def generator(pipe, cfg, weights, shapes):
    sigmas = family.sampler_sigmas(pipe, cfg.steps)
    model = family.denoiser(pipe)
    return R0Generator(
        trainable=weights, denoiser=model, base=model,
        encode=lambda prompts, with_uncond: family.conditioning(pipe, prompts, cfg.guidance, with_uncond=with_uncond),
        decode=lambda latents: family.decode(pipe, latents), sigmas=sigmas,
        latent_shape=family.latent_shape(pipe, cfg.batch_size), start=lambda eps: family.start_latents(eps, sigmas),
        noise_scaling=vp_noise_scaling, alphas_cumprod=pipe.scheduler.alphas_cumprod,
        save=lambda out_dir, path, cancelled, metadata: save_native_lora(weights, shapes, saved_name(path, cancelled),
                                                                        metadata))


def native_run(pipe, cfg, reward, out_dir, callback=None):
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    weights, shapes = add_native_lora(Patcher(pipe.unet), cfg, "cpu")
    fingerprint = run_fingerprint(cfg, pipe.unet, reward)
    result = fit_r0(generator(pipe, cfg, weights, shapes), reward, cfg, make_accelerator("no", torch.device("cpu")),
                    str(out_dir), str(out_dir / "native.safetensors"), fingerprint, callback)
    return weights, shapes, result


def test_node_is_registered_with_comfyui_types():
    assert NODE_CLASS_MAPPINGS["R0TrainNative"] is R0TrainNative
    inputs = R0TrainNative.INPUT_TYPES()
    assert [inputs["required"][k][0] for k in ("model", "clip", "vae", "sigmas", "latent_image")] == [
        "MODEL", "CLIP", "VAE", "SIGMAS", "LATENT"]
    assert R0TrainNative.RETURN_TYPES == ("MODEL", "STRING", "IMAGE")
    assert {"cfg_reward_weight", "overwrite", "lora_targets"} <= set(inputs["optional"])


def test_attention_rule_picks_the_attention_matrices(pipe):
    patcher = Patcher(pipe.unet)
    names = adapted_layers(patcher.model, "attention")
    assert names and all(n.rsplit(".", 2)[-2:] in (["attn1", "to_q"], ["attn1", "to_k"], ["attn1", "to_v"],
                                                   ["attn2", "to_q"], ["attn2", "to_k"], ["attn2", "to_v"])
                         or n.endswith("to_out.0") for n in names)
    assert len(adapted_layers(patcher.model, "all")) > len(names)
    with pytest.raises(ValueError, match="lora_targets='mlp'"):
        adapted_layers(patcher.model, "mlp")


def test_native_lora_trains_resumes_and_saves_in_comfyui_format(pipe, tmp_path):
    reward = load_reward("clip", TINY, device="cpu")
    cfg = config()
    with torch.inference_mode(False):
        reference = train_r0(load_pipeline(TINY, device="cpu", dtype=torch.float32), reward,
                             config(iterations=1), str(tmp_path / "pipeline")).history[0]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        c = family.conditioning(pipe, PROMPTS[:1], 1.0)
        before = family.denoiser(pipe)(x, torch.tensor([2.0]), **c, guidance=1.0)
        weights, shapes, result = native_run(pipe, cfg, reward, tmp_path / "whole")
        model = family.denoiser(pipe)
        with torch.no_grad():
            after = model(x, torch.tensor([2.0]), **c, guidance=1.0)
            with weights.switched_off():
                off = model(x, torch.tensor([2.0]), **c, guidance=1.0)
    # before any update, the same loss and rewards as the pipeline trainer (same noise, η, prompts)
    assert result.history[0]["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert result.history[0]["rewards"] == pytest.approx(reference["rewards"], abs=1e-5)
    assert not result.cancelled and len(result.history) == cfg.iterations
    assert float(weights.delta_norm2().detach()) > 0 and (after - before).abs().max() > 1e-4
    torch.testing.assert_close(off, before, atol=1e-6, rtol=0)   # switched off: the pretrained model

    tensors = load_file(result.lora_path)
    assert set(tensors) == {f"{n}.{part}" for n in weights.pairs for part in ("lora_up.weight", "lora_down.weight",
                                                                              "alpha")}
    for name, (up, down) in weights.pairs.items():
        delta = tensors[f"{name}.alpha"] / up.shape[1] * (tensors[f"{name}.lora_up.weight"].flatten(1)
                                                          @ tensors[f"{name}.lora_down.weight"].flatten(1))
        torch.testing.assert_close(delta, weights.delta(name).detach(), atol=1e-7, rtol=1e-6)

    # cancelled after iteration 1, run again: resumes and ends with the same LoRA
    def stop(info):
        if info["i"] == 0:
            raise Cancelled
    fresh = load_pipeline(TINY, device="cpu", dtype=torch.float32)
    with torch.inference_mode(False):
        _, _, cancelled = native_run(fresh, cfg, reward, tmp_path / "resumed", stop)
        assert cancelled.cancelled and cancelled.lora_path.endswith("native_partial.safetensors")
        fresh = load_pipeline(TINY, device="cpu", dtype=torch.float32)
        _, _, resumed = native_run(fresh, cfg, reward, tmp_path / "resumed")
    again = load_file(resumed.lora_path)
    assert len(resumed.history) == cfg.iterations
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("tiny", [TINY, "tiny-sd3"])
def test_diffusion_loss_from_x0_is_the_models_own_training_loss(tiny):
    """The native RPO loss recovers the model's target (v for the tiny world, the flow velocity for tiny-sd3) from
    the σ-convention denoiser's x̂0: it equals the pipeline trainer's loss on the backbone's own output."""
    pipe = load_pipeline(tiny, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    shape = family.latent_shape(pipe, 3)
    latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = family.training_timesteps(pipe.scheduler, 3, gen)
    c = family.conditional(family.conditioning(pipe, ["a red circle"] * 3, 1.0))
    flow = family.is_flow(pipe)
    if flow:
        sigma, kind = t.float() / pipe.scheduler.config.num_train_timesteps, "flow"
    else:
        a = pipe.scheduler.alphas_cumprod
        sigma, kind = ((1 - a) / a).sqrt()[t].float(), pipe.scheduler.config.get("prediction_type", "epsilon")
    model = family.denoiser(pipe)
    with torch.no_grad():
        expected = family.diffusion_loss(pipe, family.backbone(pipe), latents, c, noise, t)
        got = family.denoiser_diffusion_loss(lambda x, s, **k: model(x, s, **k, guidance=1.0), latents, c, noise,
                                             sigma, kind)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="prediction='x0'"):
        family.denoiser_diffusion_loss(model, latents, c, noise, sigma, "x0")


def test_native_rpo_model_trains_like_the_pipeline_trainer_and_resumes(pipe, tmp_path):
    """fit_rpo on an RPOModel whose LoRA is applied by weight wrappers (as the native node's): the first iteration
    is the pipeline RPO trainer's, and a cancelled run resumes to the same LoRA."""
    from functools import partial

    from r0_core.generate import generate
    from r0_core.tiny import subjects
    from rpo_core.train import RPOConfig, RPOModel, default_prompts, fit_rpo, reference_hash, train_rpo

    subject = subjects.SUBJECTS[0]
    refs = torch.from_numpy(subjects.references(subject)).permute(0, 3, 1, 2).float()
    encoder = load_reward("clip", TINY, device="cpu")
    cfg = RPOConfig(token=subject.token, class_name=subject.shape, iterations=4, validate_every=2, batch_size=2,
                    negatives_per_prompt=1, validation_images=1, checkpoint_every=2, mixed_precision="no",
                    prompts=default_prompts(subject.token, subject.shape, tiny=True)[:2])
    with torch.inference_mode(False):
        reference = train_rpo(load_pipeline(TINY, device="cpu", dtype=torch.float32), encoder, refs,
                              dataclasses.replace(cfg, iterations=1), str(tmp_path / "pipeline")).history[0]

    def sample(pipe, prompts, seeds, steps, guidance):
        images, latents = generate(pipe, prompts, steps=steps, guidance=guidance, seeds=seeds)
        return images, latents * pipe.vae.config.scaling_factor

    def run(pipe, out_dir, callback=None):
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        weights, shapes = add_native_lora(Patcher(pipe.unet), cfg, "cpu")
        a = pipe.scheduler.alphas_cumprod
        sigmas = ((1 - a) / a).sqrt().float()
        model = family.denoiser(pipe)
        rpo = RPOModel(
            trainable=weights, net=None, frozen=weights.switched_off,
            loss=lambda net, latents, c, noise, t: family.denoiser_diffusion_loss(
                partial(model, guidance=1.0), latents, c, noise, sigmas[t], "v_prediction"),
            timesteps=lambda n, gen: family.training_timesteps(pipe.scheduler, n, gen),
            sample=partial(sample, pipe),
            encode=lambda images: family.encode(pipe, images),
            conditioning=lambda texts: family.conditional(family.conditioning(pipe, texts, 1.0)),
            save=lambda out_dir_, path, cancelled, metadata: save_native_lora(weights, shapes,
                                                                             saved_name(path, cancelled), metadata))
        fingerprint = run_fingerprint(cfg, pipe.unet, encoder, extra=reference_hash(refs))
        return fit_rpo(rpo, encoder, refs, cfg, make_accelerator("no", torch.device("cpu")), str(out_dir),
                       str(out_dir / "rpo.safetensors"), fingerprint, callback)

    def stop(info):
        if info["i"] == 0:
            raise Cancelled
    with torch.inference_mode(False):
        whole = run(pipe, tmp_path / "whole")
        cancelled = run(load_pipeline(TINY, device="cpu", dtype=torch.float32), tmp_path / "resumed", stop)
        resumed = run(load_pipeline(TINY, device="cpu", dtype=torch.float32), tmp_path / "resumed")
    for key in ("l_sim", "l_pref", "labels", "loss"):
        assert whole.history[0][key] == pytest.approx(reference[key], abs=1e-5), key
    assert [v["iteration"] for v in whole.validations] == [2, 4] and whole.best_iteration in (2, 4)
    assert cancelled.cancelled and len(resumed.history) == cfg.iterations
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainers_of_different_precisions_run_in_one_process():
    """ComfyUI's server is one process: a bf16 run after a full-precision one, and back, each gets its own
    precision (accelerate keeps one per process)."""
    for precision in ("no", "bf16", "no"):
        assert make_accelerator(precision, torch.device("cpu")).mixed_precision == precision
