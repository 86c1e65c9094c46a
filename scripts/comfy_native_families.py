"""R0 Train and RPO Train (native MODEL) on ComfyUI's own SDXL and SD3 model classes, inside a ComfyUI checkout
(not part of CI):

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_native_families.py

The tiny world's SDXL and SD3 models have widths ComfyUI's classes cannot hold (its UNet needs channel
multiples of the first level, its MMDiT 64 channels per block of depth), so each family here is a small model
of the family's own structure (comfy_lora_keys.FAMILIES) with seeded random backbone weights, the tiny world's
text towers and a seeded 8×-downscaling VAE (ComfyUI reads SDXL's size conditioning at 8 pixels per latent
cell, as SDXL's and SD3's VAEs have), built twice with the same weights: as a diffusers pipeline, and as ComfyUI's
MODEL (comfy.model_base.SDXL / SD3 in a ModelPatcher), CLIP (its SDXL / SD3 CLIP classes at the towers' sizes)
and VAE. Checked per family:
- the denoiser: ComfyUI's sampling_function on CLIPTextEncode's conditioning vs r0_core's on the pipeline's;
- R0 Train (native) and RPO Train (native): iteration 1 (before any update) equals the pipeline trainers' on the
  same settings (same σ, noise, η, prompts, references);
- each LoRA file loads in ComfyUI's LoraLoader with no "lora key not loaded", and the MODEL the node returns
  samples what LoraLoader(MODEL, file) samples (SamplerCustom + R0 Sampler), which differs from the MODEL given;
- Cancel during R0 Train leaves a partial LoRA, and re-queueing resumes to the same LoRA, bit for bit.
Writes benchmarks/results/comfy_native_families.json and .md; exits 1 if a check fails.
"""
import json
import os
import shutil
import sys
import tempfile

import in_comfyui as harness  # noqa: I001  (first: it imports ComfyUI as its server does)
import torch

import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.text_encoders.sd3_clip as sd3_clip  # noqa: E402
import comfy_extras.nodes_custom_sampler as custom  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from comfy_lora_keys import FAMILIES  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from r0_core import family  # noqa: E402
from r0_core.convert import sd3_transformer_to_original, unet_to_original  # noqa: E402
from r0_core.loading import TINY_PIPELINE_DIR  # noqa: E402
from r0_core.schedule import sigmas_from_alphas_cumprod  # noqa: E402
from r0_core.tiny import models, protocol  # noqa: E402
from r0_core.tiny.families import FamilyBuildConfig, frozen_parts  # noqa: E402

run = harness.run
native_nodes = sys.modules[harness.NODES["R0TinyNativeLoader"].__module__]
TOKENIZER = os.path.join(TINY_PIPELINE_DIR, "tokenizer")
TEXT = 2 * models.TEXT_CONFIG["hidden_size"]   # both towers side by side (SDXL) or pooled together (SD3)
SIDE = 64                                      # pixels: 8×8 latents
PROMPTS = ["a red circle above a blue square", "a green triangle left of a yellow circle", "a blue square",
           "a yellow triangle below a red square"]
STEPS, BATCH, SEED, CANCEL_AT = 6, 4, 0, 3
R0_SETTINGS = dict(lr=1e-3, lora_rank=4, reg_weight=0.1, eta_min=0.0, eta_max=1.0, mode="r0", seed=SEED,
                   batch_size=BATCH, guidance=1.0)
SUBJECT, TOKEN, CLASS = "tiny/ring_circle", "vum", "circle"
RPO_STEPS, RPO_BETA, RPO_LR = 2, 0.5, 1e-4


# ----------------------------------------------------------------------------------------------- the two builds

def backbone(name: str):
    """The family's diffusers backbone at comfy_lora_keys' sizes, its text inputs widened to the tiny towers."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    settings = dict(FAMILIES[name]["diffusers"])
    torch.manual_seed(SEED + 1)
    if name == "SD3":   # ComfyUI's SD3 CLIP pads both CLIPs' states to T5's 4096 channels
        return SD3Transformer2DModel(**dict(settings, sample_size=8, joint_attention_dim=4096,
                                            pooled_projection_dim=TEXT))
    return UNet2DConditionModel(**dict(settings, cross_attention_dim=TEXT,
                                       projection_class_embeddings_input_dim=6 * 256 + TEXT // 2))


def vae_8x():
    """A seeded AutoencoderKL with four levels (8× downscaling, as SDXL's and SD3's), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 2)
    return AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                         sample_size=SIDE, shift_factor=0.0).eval()


def pipeline(name: str):
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                           StableDiffusionXLPipeline)

    parts = dict(frozen_parts(FamilyBuildConfig(family=name.lower())), vae=vae_8x())
    if name == "SD3":
        pipe = StableDiffusion3Pipeline(transformer=backbone(name), scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0), text_encoder_3=None, tokenizer_3=None, **parts)
    else:
        # diffusers' SDXL zeroes an empty negative prompt by default; ComfyUI's CLIPTextEncode("") encodes it
        pipe = StableDiffusionXLPipeline(unet=backbone(name), scheduler=DDIMScheduler(**models.SCHEDULER_CONFIG),
                                         force_zeros_for_empty_prompt=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def comfy_model(name: str, pipe):
    """MODEL: ComfyUI's SDXL or SD3 BaseModel over the pipeline's backbone weights."""
    import comfy.latent_formats

    scale = pipe.vae.config.scaling_factor

    class Latent(comfy.latent_formats.LatentFormat):
        scale_factor = scale

    base = getattr(comfy.supported_models, name)
    unet_config = dict(FAMILIES[name]["comfy"][1])
    if name == "SD3":
        unet_config.update(adm_in_channels=TEXT, context_embedder_config={
            "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}})
        weights = sd3_transformer_to_original(pipe.transformer)
    else:
        unet_config.update(context_dim=TEXT, adm_in_channels=6 * 256 + TEXT // 2)
        weights = unet_to_original(pipe.unet)
    kind = native_nodes.model_type_name(pipe.scheduler.config) if name == "SDXL" else "FLOW"

    class Check(base):
        latent_format = Latent
        # BASE's extra config sets 64 channels per head (SDXL's); this UNet's heads have num_head_channels
        unet_extra_config = {} if name == "SD3" else {"num_heads": -1,
                                                      "num_head_channels": unet_config["num_head_channels"]}

        def model_type(self, state_dict, prefix=""):
            return getattr(comfy.model_base.ModelType, kind)
    config = Check(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(weights, strict=True)
    if name == "SDXL":
        model.model_sampling.set_sigmas(sigmas_from_alphas_cumprod(pipe.scheduler.alphas_cumprod.double()))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_clip(name: str, pipe):
    """CLIP: ComfyUI's SDXL or SD3 text-encoder class at the tiny towers' sizes; both towers give their
    penultimate layer, as in those families; pooled: SDXL the second tower's projection, SD3 both projections."""
    towers = (pipe.text_encoder, pipe.text_encoder_2)
    hidden = dict(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)
    l_tok, l_model = native_nodes.tiny_clip_classes(towers[0].config.to_dict(), TOKENIZER, "clip_l", **hidden,
                                                    return_projected_pooled=False)
    g_tok, g_model = native_nodes.tiny_clip_classes(towers[1].config.to_dict(), TOKENIZER, "clip_g", **hidden,
                                                    return_projected_pooled=True)

    class Tokenizers(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.clip_l = l_tok(embedding_directory, tokenizer_data)
            self.clip_g = g_tok(embedding_directory, tokenizer_data)

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            out = super().tokenize_with_weights(text, return_word_ids, **kwargs)
            return dict(out, t5xxl=[]) if name == "SD3" else out   # SD3's CLIP without T5 reads no T5 tokens

    parent = sd3_clip.SD3ClipModel if name == "SD3" else comfy.sdxl_clip.SDXLClipModel

    class TextModels(parent):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = l_model(device=device, dtype=dtype, model_options=model_options)
            self.clip_g = g_model(device=device, dtype=dtype, model_options=model_options)
            self.t5xxl, self.dtypes = None, {dtype}

    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(Tokenizers, TextModels),
                         model_options={"load_device": cpu, "offload_device": cpu, "initial_device": cpu})
    for part, tower in zip((clip.cond_stage_model.clip_l, clip.cond_stage_model.clip_g), towers):
        missing, unexpected = part.load_sd(native_nodes.text_weights(tower))
        assert not missing and not unexpected, (missing, unexpected)
    return clip


# ----------------------------------------------------------------------------------------------- the checks

def denoiser_parity(pipe, model, clip, sigmas) -> float:
    """ComfyUI's guided x̂0 (sampling_function, CFG 2, CLIPTextEncode's conditioning) vs r0_core's on the
    pipeline's conditioning, at each of the schedule's σ: the largest difference over all."""
    import comfy.sampler_helpers

    ours, c = family.denoiser(pipe), family.conditioning(pipe, PROMPTS[:1], 2.0)
    gen = torch.Generator().manual_seed(SEED)
    noise, x0 = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)

    def conds(text, x, kind):
        cond = comfy.sampler_helpers.convert_cond(run("CLIPTextEncode", clip, text)[0])
        return comfy.samplers.encode_model_conds(model.model.extra_conds, cond, x, x.device, kind)
    comfy.model_management.load_models_gpu([model])
    model.model.current_patcher = model   # as a sampler's setup sets it
    worst = 0.0
    with torch.no_grad():
        for sigma in sigmas[:-1].reshape(-1, 1):
            x = family.noise_scaling(pipe)(sigma, noise, x0)
            theirs = comfy.samplers.sampling_function(model.model, x, sigma, conds("", x, "negative"),
                                                      conds(PROMPTS[0], x, "positive"), 2.0, {}, seed=SEED)
            worst = max(worst, float((theirs - ours(x, sigma, guidance=2.0, **c)).abs().max()))
    return worst


def sample(model, clip, vae, sigmas, seed=7):
    """SamplerCustom with the R0 Sampler at cfg 1, then VAEDecode: 4 images of the first prompt."""
    sampler = run("R0Sampler", 0.0)[0]
    positive = run("CLIPTextEncode", clip, PROMPTS[0])[0]
    latent = run("EmptyLatentImage", SIDE, SIDE, 4)[0]
    with torch.inference_mode():
        out = custom.SamplerCustom().sample(model, True, seed, 1.0, positive, positive, sampler, sigmas, latent)
        out = out[0] if isinstance(out, tuple) else out.result[0]
        return nodes.VAEDecode().decode(vae, out)[0]


def fresh(*names):
    """Remove what an earlier run of this check left (LoRA files, run folders): each run starts afresh."""
    loras = folder_paths.get_folder_paths("loras")[0]
    for name in names:
        for suffix in ("", "_partial"):
            path = os.path.join(loras, f"{name}{suffix}.safetensors")
            if os.path.exists(path):
                os.remove(path)
        for kind in ("r0_native_train", "rpo_native_train"):
            shutil.rmtree(os.path.join(folder_paths.get_output_directory(), kind, name), ignore_errors=True)


def history_of(kind: str, name: str) -> list[dict]:
    state = torch.load(os.path.join(folder_paths.get_output_directory(), kind, name, "trainer_state.pt"),
                       weights_only=True)
    return json.loads(state["history"])


def loads_cleanly(model, clip, vae, sigmas, patched, lora_path) -> dict:
    """LoraLoader on the file: its warnings, and its images against the returned MODEL's and the given one's."""
    with harness.Messages() as messages:
        loaded, _ = run("LoraLoader", model, clip, os.path.basename(lora_path), 1.0, 1.0)
        with_loader = sample(loaded, clip, vae, sigmas)
    with_node, given = sample(patched, clip, vae, sigmas), sample(model, clip, vae, sigmas)
    return {"lora_tensors": len(load_file(lora_path)), "not_loaded": messages.not_loaded(),
            "node_vs_loraloader": float((with_node - with_loader).abs().max()),
            "lora_changes_images": float((with_node - given).abs().max())}


def r0_check(name, pipe, model, clip, vae, sigmas, reward) -> dict:
    from r0_core.train import R0Config, train_r0

    save = f"r0_native_{name.lower()}_check"
    fresh(save, save + "_cancel")
    latent = run("EmptyLatentImage", SIDE, SIDE, 1)[0]
    args = (model, clip, vae, sigmas, latent, reward, "\n".join(PROMPTS), STEPS)
    out, error, _ = harness.queued("R0TrainNative", *args, save_name=save, cfg_reward_weight=0.5, **R0_SETTINGS)
    assert error is None, error
    patched, lora_path, _ = out
    native = history_of("r0_native_train", save)[0]
    config = R0Config(prompts=PROMPTS, iterations=1, lr=R0_SETTINGS["lr"], lora_rank=R0_SETTINGS["lora_rank"],
                      reg_weight=R0_SETTINGS["reg_weight"], batch_size=BATCH, steps=len(sigmas) - 1, seed=SEED,
                      cfg_reward_weight=0.5, mixed_precision="no")
    with tempfile.TemporaryDirectory() as tmp:
        ours = train_r0(pipe, reward, config, tmp).history[0]
    _, cancel_error, cancel_calls = harness.queued("R0TrainNative", *args, save_name=save + "_cancel",
                                                   cfg_reward_weight=0.5, hook=harness.cancel_at(CANCEL_AT),
                                                   **R0_SETTINGS)
    partial = os.path.join(folder_paths.get_folder_paths("loras")[0], f"{save}_cancel_partial.safetensors")
    partial_saved = os.path.exists(partial)
    out, resume_error, resume_calls = harness.queued("R0TrainNative", *args, save_name=save + "_cancel",
                                                     cfg_reward_weight=0.5, **R0_SETTINGS)
    first, second = load_file(lora_path), load_file(out[1])
    same = sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)
    fresh(save + "_bf16")   # bf16 autocast (what "auto" picks on a CUDA GPU), here on the CPU: two steps
    out, bf16_error, _ = harness.queued("R0TrainNative", *args[:-1], 2, save_name=save + "_bf16",
                                        cfg_reward_weight=0.5, mixed_precision="bf16", **R0_SETTINGS)
    bf16 = history_of("r0_native_train", save + "_bf16")
    return {"native_first": native, "pipeline_first": ours, "loss_difference": abs(native["loss"] - ours["loss"]),
            "reward_difference": max(abs(a - b) for a, b in zip(native["rewards"], ours["rewards"])),
            **loads_cleanly(model, clip, vae, sigmas, patched, lora_path),
            "bf16": {"error": bf16_error, "losses": [h["loss"] for h in bf16],
                     "lora_dtypes": sorted({str(t.dtype) for t in load_file(out[1]).values()})},
            "cancel": {"error": cancel_error, "progress_calls": len(cancel_calls), "partial_lora": partial_saved,
                       "resume_error": resume_error, "resumed_at": resume_calls[0] if resume_calls else None,
                       "same_lora_as_uninterrupted": same}}


def rpo_check(name, pipe, model, clip, vae, sigmas, encoder) -> dict:
    from rpo_core.train import RPOConfig, default_prompts, train_rpo

    save = f"rpo_native_{name.lower()}_check"
    fresh(save)
    refs = run("RPOLoadReferences", SUBJECT, SIDE)[0]
    latent = run("EmptyLatentImage", SIDE, SIDE, 1)[0]
    prompts = default_prompts(TOKEN, CLASS, tiny=True)
    out, error, _ = harness.queued("RPOTrainNative", model, clip, vae, sigmas, latent, refs, encoder, TOKEN, CLASS,
                                   "\n".join(prompts), RPO_STEPS, 0.5, RPO_BETA, 1.0, RPO_LR, 4, RPO_STEPS, SEED,
                                   save, True, 2.0)
    assert error is None, error
    patched, lora_path, _ = out
    native = history_of("rpo_native_train", save)[0]
    config = RPOConfig(token=TOKEN, class_name=CLASS, prompts=prompts, iterations=1, beta=RPO_BETA, lr=RPO_LR,
                       lora_rank=4, validate_every=RPO_STEPS, seed=SEED, sampler_steps=len(sigmas) - 1,
                       guidance=2.0, mixed_precision="no")
    with tempfile.TemporaryDirectory() as tmp:
        ours = train_rpo(pipe, encoder, refs.permute(0, 3, 1, 2).clone(), config, tmp).history[0]
    keys = ("l_sim", "l_pref", "labels", "loss")
    return {"native_first": {k: native[k] for k in keys}, "pipeline_first": {k: ours[k] for k in keys},
            "difference": max(abs(native[k] - ours[k]) for k in keys),
            **loads_cleanly(model, clip, vae, sigmas, patched, lora_path)}


def check(name: str, reward) -> dict:
    pipe = pipeline(name)
    model, clip = comfy_model(name, pipe), comfy_clip(name, pipe)
    vae = native_nodes.native_vae(pipe, torch.float32, torch.device("cpu"))
    sigmas = family.sampler_sigmas(pipe, 4).float()
    node_sigmas = run("R0Sigmas", model, 4, "")[0]
    return {"family": name, "sigmas": sigmas.tolist(), "r0_sigmas_node": node_sigmas.tolist(),
            "denoiser_difference": denoiser_parity(pipe, model, clip, sigmas),
            "r0": r0_check(name, pipe, model, clip, vae, sigmas, reward),
            "rpo": rpo_check(name, pipe, model, clip, vae, sigmas, reward)}


def passed(r: dict) -> bool:
    r0, rpo, cancel = r["r0"], r["rpo"], r["r0"]["cancel"]
    clean = all(not x["not_loaded"] and x["node_vs_loraloader"] <= 1e-4 and x["lora_changes_images"] > 0
                for x in (r0, rpo))
    bf16 = r0["bf16"]
    bf16_ok = (bf16["error"] is None and len(bf16["losses"]) == 2 and bf16["lora_dtypes"] == ["torch.float32"]
               and abs(bf16["losses"][0] - r0["native_first"]["loss"]) <= 0.05)
    return (bf16_ok and r["denoiser_difference"] <= 1e-4 and r0["loss_difference"] <= 1e-3
            and r0["reward_difference"] <= 1e-3 and rpo["difference"] <= 1e-3 and clean
            and cancel["error"] == "InterruptProcessingException"
            and cancel["progress_calls"] == CANCEL_AT and cancel["partial_lora"] and cancel["resume_error"] is None
            and cancel["resumed_at"] == CANCEL_AT + 1 and cancel["same_lora_as_uninterrupted"])


def main():
    import comfyui_version

    beside = harness.NODES["RewardLoader"].INPUT_TYPES()["required"]["support"][0][0]
    reward = run("RewardLoader", "clip", "tiny", beside, "cpu", "fp32")[0]
    rows = [check(name, reward) for name in ("SDXL", "SD3")]
    for r in rows:
        r["ok"] = passed(r)
    ok = all(r["ok"] for r in rows)
    lines = [f"R0 Train and RPO Train (native MODEL) on ComfyUI {comfyui_version.__version__}'s own SDXL and SD3 "
             f"model classes, fp32 on the CPU. Each family: the structure of comfy_lora_keys.FAMILIES with "
             f"seeded random backbone weights, the tiny world's text towers, a seeded 8× VAE, {SIDE}×{SIDE} images; "
             f"the same weights as a diffusers pipeline (the pipeline trainers' reference). R0: {STEPS} steps, "
             f"batch {BATCH}, 4 σ, rank 4, implicit CFG reward 0.5, reward tiny CLIP. RPO: {SUBJECT}, "
             f"{RPO_STEPS} steps, rank 4, λ-Harmonic encoder tiny CLIP. Run inside ComfyUI: `cd <ComfyUI> && "
             f"<ComfyUI's python> "
             f"<pack>/scripts/comfy_native_families.py`. All checks {'pass' if ok else 'do NOT all pass'}.", "",
             "| check | " + " | ".join(r["family"] for r in rows) + " |", "|---|" + "---|" * len(rows)]

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(r) for r in rows) + " |")
    row("R0 Sigmas (node, on the MODEL) vs the pipeline's 4-step σ, max difference",
        lambda r: f"{max(abs(a - b) for a, b in zip(r['sigmas'], r['r0_sigmas_node'])):.1e}")
    row("guided x̂0 (CFG 2) at each σ: ComfyUI's sampling_function vs r0_core's denoiser, max difference",
        lambda r: f"{r['denoiser_difference']:.1e}")
    row("R0 iteration 1 vs the pipeline R0 trainer: loss; largest reward difference",
        lambda r: f"{r['r0']['native_first']['loss']:.5f} vs {r['r0']['pipeline_first']['loss']:.5f}; "
                  f"{r['r0']['reward_difference']:.1e}")
    row("RPO iteration 1 vs the pipeline RPO trainer: L_sim, L_pref (largest difference of L_sim, L_pref, labels, "
        "loss)", lambda r: f"{r['rpo']['native_first']['l_sim']:.5f} vs {r['rpo']['pipeline_first']['l_sim']:.5f}, "
                           f"{r['rpo']['native_first']['l_pref']:.5f} vs {r['rpo']['pipeline_first']['l_pref']:.5f} "
                           f"({r['rpo']['difference']:.1e})")
    for kind in ("r0", "rpo"):
        label = kind.upper()
        row(f"{label} LoRA: tensors; LoraLoader \"lora key not loaded\"",
            lambda r: f"{r[kind]['lora_tensors']}; {len(r[kind]['not_loaded'])}")
        row(f"{label}: returned MODEL vs LoraLoader(MODEL, file), images max difference; vs the given MODEL",
            lambda r: f"{r[kind]['node_vs_loraloader']:.1e}; {r[kind]['lora_changes_images']:.3f}")
    row("R0 with mixed_precision bf16 (autocast; here on the CPU), 2 steps: iteration-1 loss (vs fp32's above); "
        "LoRA tensors' dtype", lambda r: f"{r['r0']['bf16']['losses'][0]:.5f}; "
                                         f"{', '.join(r['r0']['bf16']['lora_dtypes'])}")
    row(f"R0 Cancel at progress {CANCEL_AT} of {STEPS}, then queued again",
        lambda r: f"{r['r0']['cancel']['error']}, partial LoRA {r['r0']['cancel']['partial_lora']}; resumed at "
                  f"{r['r0']['cancel']['resumed_at']}, same LoRA bit for bit "
                  f"{r['r0']['cancel']['same_lora_as_uninterrupted']}")
    row("all checks", lambda r: "pass" if r["ok"] else "FAIL")
    lines += ["", "What the two builds must agree on, found by this check: ComfyUI's BASE config sets 64 channels per "
              "attention head (SDXL's own), so a UNet with other heads needs its num_head_channels in the config; "
              "diffusers' SDXL pipeline zeroes an empty negative prompt by default (force_zeros_for_empty_prompt) "
              "where ComfyUI's CLIPTextEncode(\"\") encodes it, so the reference pipeline is built without the "
              "zeroing. SD3 without T5 has no rows in T5's place in both (r0_core's conditioning follows ComfyUI's "
              "SD3 CLIP; diffusers' pipeline would add 256 zero rows). The native trainers take the negative as the "
              "CLIP encodes \"\" (ConditioningZeroOut is ComfyUI's way to the zeroed one)."]
    paths = protocol.write_results("comfy_native_families", {"comfyui": comfyui_version.__version__, "rows": rows,
                                                             "ok": ok}, "\n".join(lines), out=harness.RESULTS,
                                   argv=[os.path.join(harness.PACK, "scripts", "comfy_native_families.py")])
    print("\n".join(lines) + f"\nwrote {', '.join(paths)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
