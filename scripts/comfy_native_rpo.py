"""RPO Train (native MODEL) inside a ComfyUI checkout (not part of CI), on the tiny world's native MODEL/CLIP/VAE,
a built-in tiny subject and the tiny CLIP as the λ-Harmonic encoder:

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_native_rpo.py

Checked:
- the first iteration (before any update) computes what the pipeline RPO trainer computes on the same settings
  (L_sim from the VAE-encoded references, the labels from the K-step negatives and their λ-Harmonic rewards);
- the LoRA file is in ComfyUI's key format, and ComfyUI's LoraLoader loads it with no "lora key not loaded";
- the MODEL the node returns and LoraLoader(MODEL, the file) sample the same images;
- the MODEL given to the node is unchanged;
- Cancel at progress CANCEL_AT leaves a partial LoRA; queueing again resumes at CANCEL_AT + 1 and ends with the
  same LoRA, bit for bit, as the uninterrupted run.
Writes benchmarks/results/comfy_native_rpo.json and .md; exits 1 if a check fails.
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
SUBJECT = "tiny/ring_circle"          # token vum, class circle
TOKEN, CLASS = "vum", "circle"
STEPS, VALIDATE_EVERY, SEED, CANCEL_AT, BETA, LR = 12, 6, 0, 5, 0.5, 1e-4
PROMPT = "a vum circle above a red circle"


def sample(model, clip, vae, sigmas, seed=11):
    sampler = run("R0Sampler", 0.0)[0]
    positive = run("CLIPTextEncode", clip, PROMPT)[0]
    negative = run("CLIPTextEncode", clip, "")[0]
    latent = run("EmptyLatentImage", 128, 128, 4)[0]
    with torch.inference_mode():
        out = custom.SamplerCustom().sample(model, True, seed, 2.0, positive, negative, sampler, sigmas, latent)
        out = out[0] if isinstance(out, tuple) else out.result[0]
        return nodes.VAEDecode().decode(vae, out)[0]


def train(model, clip, vae, sigmas, latent, refs, encoder, save_name, hook=None):
    """RPO Train (native MODEL) as ComfyUI runs it: (outputs or None, the interrupt's error, progress values)."""
    return harness.queued("RPOTrainNative", model, clip, vae, sigmas, latent, refs, encoder, TOKEN, CLASS, "", STEPS,
                          0.5, BETA, 1.0, LR, 8, VALIDATE_EVERY, SEED, save_name, True, 2.0, hook=hook)


def pipeline_first_iteration(encoder, refs) -> dict:
    """The pipeline RPO trainer (RPO Train's core, on the diffusers tiny pipeline) for one iteration, same settings."""
    import tempfile

    from r0_core.loading import load_pipeline
    from rpo_core.train import RPOConfig, default_prompts, train_rpo

    config = RPOConfig(token=TOKEN, class_name=CLASS, prompts=default_prompts(TOKEN, CLASS, tiny=True), iterations=1,
                       beta=BETA, lr=LR, validate_every=VALIDATE_EVERY, seed=SEED, mixed_precision="no")
    with tempfile.TemporaryDirectory() as out:
        result = train_rpo(load_pipeline("tiny"), encoder, refs.permute(0, 3, 1, 2).clone(), config, out)
    return {"first": result.history[0], "validation_score": result.validations[0]["score"]}


def main():
    import comfyui_version
    from safetensors.torch import load_file

    model, clip, vae = run("R0TinyNativeLoader", "tiny", "fp32", "cpu")
    beside = NODES["RewardLoader"].INPUT_TYPES()["required"]["support"][0][0]
    encoder = run("RewardLoader", "clip", "tiny", beside, "cpu", "fp32")[0]
    refs = run("RPOLoadReferences", SUBJECT, 32)[0]
    sigmas = run("R0Sigmas", model, 4, "")[0]
    latent = run("EmptyLatentImage", 128, 128, 1)[0]
    loras = folder_paths.get_folder_paths("loras")[0]
    names = ("rpo_native_check", "rpo_native_check_cancel")
    for name in names:
        for path in (os.path.join(loras, f"{name}{s}.safetensors") for s in ("", "_partial")):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(folder_paths.get_output_directory(), "rpo_native_train", name), ignore_errors=True)

    base_before = sample(model, clip, vae, sigmas)
    (patched, lora_path, _), error, calls = train(model, clip, vae, sigmas, latent, refs, encoder, names[0])
    state = torch.load(os.path.join(folder_paths.get_output_directory(), "rpo_native_train", names[0],
                                    "trainer_state.pt"), weights_only=True)
    history = json.loads(state["history"])
    validations = json.loads(state["selection"]["validations"])
    parity = pipeline_first_iteration(encoder, refs)
    first = history[0]
    differences = {k: abs(first[k] - parity["first"][k]) for k in ("l_sim", "l_pref", "labels", "loss")}
    tensors = load_file(lora_path)
    keys_ok = all(k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
                  for k in tensors)
    with harness.Messages() as messages:
        loaded, _ = run("LoraLoader", model, clip, os.path.basename(lora_path), 1.0, 1.0)
        with_loader = sample(loaded, clip, vae, sigmas)
    not_loaded = messages.not_loaded()
    with_node = sample(patched, clip, vae, sigmas)
    base_after = sample(model, clip, vae, sigmas)

    _, cancel_error, cancel_calls = train(model, clip, vae, sigmas, latent, refs, encoder, names[1],
                                          hook=harness.cancel_at(CANCEL_AT))
    partial_exists = os.path.exists(os.path.join(loras, f"{names[1]}_partial.safetensors"))
    (_, resumed_path, _), resume_error, resume_calls = train(model, clip, vae, sigmas, latent, refs, encoder, names[1])
    resumed = load_file(resumed_path)
    same_lora = sorted(resumed) == sorted(tensors) and all(torch.equal(resumed[k], tensors[k]) for k in tensors)

    results = {
        "comfyui": comfyui_version.__version__, "steps": STEPS, "validate_every": VALIDATE_EVERY, "subject": SUBJECT,
        "train_error": error, "progress_calls": len(calls), "first_iteration": first,
        "pipeline_first_iteration": parity["first"], "first_iteration_differences": differences,
        "validations": [{"iteration": v["iteration"], "score": v["score"]} for v in validations],
        "pipeline_validation_after_1": parity["validation_score"],
        "lora_keys": len(tensors), "lora_keys_comfyui_format": keys_ok, "lora_key_not_loaded": not_loaded,
        "node_model_vs_loraloader": float((with_node - with_loader).abs().max()),
        "lora_changes_images": float((with_node - base_before).abs().max()),
        "given_model_unchanged": float((base_after - base_before).abs().max()),
        "cancel": {"error": cancel_error, "progress_calls": len(cancel_calls), "partial_lora": partial_exists},
        "resume": {"error": resume_error, "first_progress": resume_calls[0] if resume_calls else None,
                   "same_lora_as_uninterrupted": same_lora},
    }
    ok = (error is None and max(differences.values()) <= 1e-3 and keys_ok and not not_loaded
          and results["node_model_vs_loraloader"] <= 1e-4 and results["lora_changes_images"] > 0
          and results["given_model_unchanged"] == 0.0 and cancel_error == "InterruptProcessingException"
          and partial_exists and len(cancel_calls) == CANCEL_AT and resume_error is None
          and results["resume"]["first_progress"] == CANCEL_AT + 1 and same_lora)
    results["ok"] = ok
    r = results
    validation_text = ", ".join(f"{v['iteration']}: {v['score']:.4f}" for v in validations)
    lines = [f"RPO Train (native MODEL) in ComfyUI {r['comfyui']}, on R0 Tiny World (native MODEL/CLIP/VAE), fp32 on "
             f"the CPU: subject {SUBJECT} ({TOKEN} {CLASS}), the tiny subjects' eight prompts, {STEPS} steps, "
             f"validation every {VALIDATE_EVERY}, β {BETA}, lr {LR:g}, rank 8, all layers, R0 Sigmas 4 steps at CFG 2 "
             f"for negatives and validation, λ-Harmonic encoder tiny CLIP. Run inside ComfyUI: `cd <ComfyUI> && "
             f"<ComfyUI's python> <pack>/scripts/comfy_native_rpo.py`. All checks "
             f"{'pass' if ok else 'do NOT all pass'}.", "",
             "| check | result |", "|---|---|",
             f"| iteration 1 vs the pipeline RPO trainer on the same settings: L_sim, L_pref, mean label | "
             f"{first['l_sim']:.5f} vs {parity['first']['l_sim']:.5f}; {first['l_pref']:.5f} vs "
             f"{parity['first']['l_pref']:.5f}; {first['labels']:.3f} vs {parity['first']['labels']:.3f} |",
             f"| λ_val validations (iteration: score) | "
             f"{validation_text} |",
             f"| LoRA file | {r['lora_keys']} tensors, ComfyUI key format: {keys_ok} |",
             f"| LoraLoader warnings \"lora key not loaded\" | {len(not_loaded)} |",
             f"| images: returned MODEL vs LoraLoader(MODEL, file), max difference | "
             f"{r['node_model_vs_loraloader']:.1e} |",
             f"| images: returned MODEL vs the MODEL before training, max difference | {r['lora_changes_images']:.3f} |",
             f"| images: given MODEL after vs before training | {r['given_model_unchanged']:.1e} |",
             f"| Cancel at progress {CANCEL_AT} of {STEPS} | {cancel_error}, {len(cancel_calls)} progress calls, "
             f"partial LoRA saved: {partial_exists} |",
             f"| queued again | resumed at {r['resume']['first_progress']}, LoRA equal bit for bit to the "
             f"uninterrupted run's: {same_lora} |"]
    paths = protocol.write_results("comfy_native_rpo", results, "\n".join(lines),
                                   out=os.path.join(PACK, "benchmarks", "results"),
                                   argv=[os.path.join(PACK, "scripts", "comfy_native_rpo.py")])
    print("\n".join(lines) + f"\nwrote {', '.join(paths)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
