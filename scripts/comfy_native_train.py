"""R0 Train (native MODEL) inside a ComfyUI checkout (not part of CI), on the tiny world's native MODEL/CLIP/VAE
and the tiny CLIP reward:

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_native_train.py

Checked:
- the first iteration (before any update) computes what the pipeline trainer computes on the same settings;
- the run trains: on held-out prompts and fixed seeds the trained MODEL's images score higher than the base's;
- the LoRA file is in ComfyUI's key format, and ComfyUI's LoraLoader loads it with no "lora key not loaded";
- the MODEL the node returns and LoraLoader(MODEL, the file) sample the same images (SamplerCustom, R0 Sampler);
- the MODEL given to the node is unchanged (same images as before training);
- Cancel: ComfyUI's interrupt at progress CANCEL_AT leaves a partial LoRA and the state; queueing again resumes
  at CANCEL_AT + 1 and ends with the same LoRA, bit for bit, as the uninterrupted run; queueing a finished run
  again reuses it (no iteration runs).
Writes benchmarks/results/comfy_native_train.json and .md; exits 1 if a check fails.
"""
import json
import os
import shutil
import sys

import in_comfyui as harness  # noqa: I001  (first: it imports ComfyUI as its server does)
import torch

import comfy_extras.nodes_custom_sampler as custom  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402

from r0_core.tiny import protocol  # noqa: E402

PACK, NODES, run = harness.PACK, harness.NODES, harness.run
PROMPTS = ["a red circle above a blue square", "a green triangle left of a yellow circle", "a blue square",
           "a yellow triangle below a red square"]
HELD_OUT = ["a red square above a green circle", "a blue circle left of a yellow square", "a green circle",
            "a yellow square right of a red triangle"]
STEPS, BATCH, SEED, CANCEL_AT, IMAGES = 24, 4, 0, 10, 4
SETTINGS = dict(lr=1e-3, lora_rank=8, reg_weight=0.1, eta_min=0.0, eta_max=1.0, mode="r0", seed=SEED,
                batch_size=BATCH, guidance=1.0)


def sample(model, clip, vae, sigmas, prompts, seed=7):
    """SamplerCustom with the R0 Sampler at cfg 1, then VAEDecode: the images an artist gets."""
    sampler = run("R0Sampler", 0.0)[0]
    images = []
    for i, prompt in enumerate(prompts):
        positive = run("CLIPTextEncode", clip, prompt)[0]
        latent = run("EmptyLatentImage", 128, 128, IMAGES)[0]
        with torch.inference_mode():
            out = custom.SamplerCustom().sample(model, True, seed + i, 1.0, positive, positive, sampler, sigmas,
                                                latent)
            out = out[0] if isinstance(out, tuple) else out.result[0]
            images.append(nodes.VAEDecode().decode(vae, out)[0])
    return torch.cat(images)


def train(model, clip, vae, sigmas, latent, reward, save_name, hook=None):
    """R0 Train (native MODEL) as ComfyUI runs it: (outputs or None, the interrupt's error, progress values)."""
    return harness.queued("R0TrainNative", model, clip, vae, sigmas, latent, reward, "\n".join(PROMPTS), STEPS,
                          save_name=save_name, cfg_reward_weight=0.5, hook=hook, **SETTINGS)


def pipeline_first_iteration(reward, native_first: dict) -> dict:
    """The pipeline trainer (R0 Train's core, on the diffusers tiny pipeline) for one iteration with the same
    settings: its loss and rewards are computed before the first update, from the same noise, η and prompts, so
    they should equal the native run's first entry up to the two models' float differences."""
    import tempfile

    from r0_core.loading import load_pipeline
    from r0_core.train import R0Config, train_r0

    config = R0Config(prompts=PROMPTS, iterations=1, lr=SETTINGS["lr"], lora_rank=SETTINGS["lora_rank"],
                      reg_weight=SETTINGS["reg_weight"], batch_size=BATCH, steps=4, seed=SEED, cfg_reward_weight=0.5,
                      mixed_precision="no")
    with tempfile.TemporaryDirectory() as out:
        first = train_r0(load_pipeline("tiny"), reward, config, out).history[0]
    return {"pipeline": first, "native": native_first,
            "loss_difference": abs(first["loss"] - native_first["loss"]),
            "reward_difference": max(abs(a - b) for a, b in zip(first["rewards"], native_first["rewards"]))}


def save_picture(base, trained) -> str:
    """Base and trained rows (each held-out prompt's seeds side by side), as one PNG beside the results."""
    import numpy as np
    from PIL import Image

    rows = [torch.cat(list(images), dim=1) for images in (base, trained)]   # [H, N*W, 3] each
    grid = (torch.cat(rows, dim=0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    path = os.path.join(PACK, "benchmarks", "results", "comfy_native_train.png")
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
    return path


def lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def main():
    import comfyui_version

    model, clip, vae = run("R0TinyNativeLoader", "tiny", "fp32", "cpu")
    beside = NODES["RewardLoader"].INPUT_TYPES()["required"]["support"][0][0]
    reward = run("RewardLoader", "clip", "tiny", beside, "cpu", "fp32")[0]
    sigmas = run("R0Sigmas", model, 4, "")[0]
    latent = run("EmptyLatentImage", 128, 128, 1)[0]
    loras = folder_paths.get_folder_paths("loras")[0]
    names = ("r0_native_check", "r0_native_check_cancel")
    for name in names:   # a fresh start each time this check runs
        for path in (os.path.join(loras, f"{name}{s}.safetensors") for s in ("", "_partial")):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(folder_paths.get_output_directory(), "r0_native_train", name), ignore_errors=True)

    base_before = sample(model, clip, vae, sigmas, HELD_OUT)
    (patched, lora_path, curve), error, calls = train(model, clip, vae, sigmas, latent, reward, names[0])
    state = torch.load(os.path.join(folder_paths.get_output_directory(), "r0_native_train", names[0],
                                    "trainer_state.pt"), weights_only=True)
    history = json.loads(state["history"])
    quarter = max(1, STEPS // 4)
    first = sum(h["rewards"][0] for h in history[:quarter]) / quarter
    last = sum(h["rewards"][0] for h in history[-quarter:]) / quarter
    history_rewards = {"first_quarter": first, "last_quarter": last}

    tensors = lora_tensors(lora_path)
    keys_ok = all(k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
                  for k in tensors)
    with harness.Messages() as messages:
        loaded, _ = run("LoraLoader", model, clip, os.path.basename(lora_path), 1.0, 1.0)
        with_loader = sample(loaded, clip, vae, sigmas, HELD_OUT)
    not_loaded = messages.not_loaded()
    with_node = sample(patched, clip, vae, sigmas, HELD_OUT)
    base_after = sample(model, clip, vae, sigmas, HELD_OUT)
    with torch.no_grad():
        prompts = [p for p in HELD_OUT for _ in range(IMAGES)]
        score = lambda images: float(reward(images.permute(0, 3, 1, 2), prompts).float().mean())  # noqa: E731
    parity = pipeline_first_iteration(reward, history[0])
    picture = save_picture(base_before, with_node)

    # Cancel at CANCEL_AT, then queue again: resumes, and ends where the uninterrupted run ended
    _, cancel_error, cancel_calls = train(model, clip, vae, sigmas, latent, reward, names[1],
                                          hook=harness.cancel_at(CANCEL_AT))
    partial = os.path.join(loras, f"{names[1]}_partial.safetensors")
    partial_exists = os.path.exists(partial)
    (_, resumed_path, _), resume_error, resume_calls = train(model, clip, vae, sigmas, latent, reward, names[1])
    resumed = lora_tensors(resumed_path)
    same_lora = sorted(resumed) == sorted(tensors) and all(torch.equal(resumed[k], tensors[k]) for k in tensors)
    (_, again_path, _), again_error, again_calls = train(model, clip, vae, sigmas, latent, reward, names[0])

    results = {
        "comfyui": comfyui_version.__version__, "steps": STEPS, "batch": BATCH, "prompts": PROMPTS,
        "train_error": error, "progress_calls": len(calls), "reward_curve": history_rewards,
        "lora_keys": len(tensors), "lora_keys_comfyui_format": keys_ok, "lora_key_not_loaded": not_loaded,
        "node_model_vs_loraloader": float((with_node - with_loader).abs().max()),
        "lora_changes_images": float((with_node - base_before).abs().max()),
        "given_model_unchanged": float((base_after - base_before).abs().max()),
        "held_out_reward": {"base": score(base_before), "r0_native": score(with_node)},
        "pipeline_parity": parity,
        "cancel": {"error": cancel_error, "progress_calls": len(cancel_calls), "partial_lora": partial_exists},
        "resume": {"error": resume_error, "first_progress": resume_calls[0] if resume_calls else None,
                   "progress_calls": len(resume_calls), "same_lora_as_uninterrupted": same_lora},
        "requeue_finished": {"error": again_error, "progress_calls": len(again_calls), "path": os.path.basename(
            again_path)},
    }
    ok = (error is None and results["held_out_reward"]["r0_native"] > results["held_out_reward"]["base"]
          and parity["loss_difference"] <= 1e-3 and parity["reward_difference"] <= 1e-3 and keys_ok and not not_loaded
          and results["node_model_vs_loraloader"] <= 1e-4 and results["lora_changes_images"] > 1 / 255
          and results["given_model_unchanged"] == 0.0 and cancel_error == "InterruptProcessingException"
          and partial_exists and len(cancel_calls) == CANCEL_AT and resume_error is None
          and results["resume"]["first_progress"] == CANCEL_AT + 1 and same_lora and again_error is None
          and os.path.basename(again_path) == os.path.basename(lora_path))
    results["ok"] = ok
    r = results
    lines = [f"R0 Train (native MODEL) in ComfyUI {r['comfyui']}, on R0 Tiny World (native MODEL/CLIP/VAE), fp32 "
             f"on the CPU: {STEPS} steps, batch {BATCH}, R0 Sigmas 4 steps, lr 1e-3, rank 8, reg 0.1, implicit CFG "
             f"reward 0.5, reward tiny CLIP, {len(PROMPTS)} prompts. Run inside ComfyUI: `cd <ComfyUI> && "
             f"<ComfyUI's python> <pack>/scripts/comfy_native_train.py`. All checks "
             f"{'pass' if ok else 'do NOT all pass'}.", "",
             "| check | result |", "|---|---|",
             f"| iteration 1 (before any update) vs the pipeline trainer's on the same settings: loss, rewards "
             f"| {parity['native']['loss']:.5f} vs {parity['pipeline']['loss']:.5f}; "
             f"{', '.join(f'{v:.4f}' for v in parity['native']['rewards'])} vs "
             f"{', '.join(f'{v:.4f}' for v in parity['pipeline']['rewards'])} |",
             f"| batch reward (tiny CLIP), first → last quarter of the run (random prompts per batch: noisy) | "
             f"{first:.3f} → {last:.3f} |",
             f"| LoRA file | {r['lora_keys']} tensors, ComfyUI key format: {keys_ok} |",
             f"| LoraLoader warnings \"lora key not loaded\" | {len(not_loaded)} |",
             f"| images: returned MODEL vs LoraLoader(MODEL, file), max difference | "
             f"{r['node_model_vs_loraloader']:.1e} |",
             f"| images: returned MODEL vs the MODEL before training, max difference | {r['lora_changes_images']:.3f} |",
             f"| images: given MODEL after vs before training | {r['given_model_unchanged']:.1e} |",
             f"| held-out prompts' reward, base → trained ({len(HELD_OUT)} prompts × {IMAGES} seeds; plumbing, not "
             f"a claim) | "
             f"{r['held_out_reward']['base']:.3f} → {r['held_out_reward']['r0_native']:.3f} |",
             f"| Cancel at progress {CANCEL_AT} of {STEPS} | {cancel_error}, {len(cancel_calls)} progress calls, "
             f"partial LoRA saved: {partial_exists} |",
             f"| queued again | resumed at {r['resume']['first_progress']}, {len(resume_calls)} progress calls, "
             f"LoRA equal bit for bit to the uninterrupted run's: {same_lora} |",
             f"| finished run queued again | {len(again_calls)} iterations run, same file: "
             f"{os.path.basename(again_path) == os.path.basename(lora_path)} |"]
    lines += ["", f"![base and trained]({os.path.basename(picture)}) Top row: the MODEL before training; bottom: "
              f"the returned MODEL; {IMAGES} seeds of each held-out prompt in turn ({', '.join(HELD_OUT)}), "
              f"SamplerCustom + R0 Sampler at 4 steps, cfg 1; 32×32 shown at 3×."]
    paths = protocol.write_results("comfy_native_train", results, "\n".join(lines),
                                   out=os.path.join(PACK, "benchmarks", "results"),
                                   argv=[os.path.join(PACK, "scripts", "comfy_native_train.py")])
    print("\n".join(lines) + f"\nwrote {', '.join(paths)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
