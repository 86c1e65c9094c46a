"""R0 Test-time Refine (native MODEL) inside a ComfyUI checkout (not part of CI), on the tiny world's native
MODEL/CLIP/VAE and the tiny CLIP reward:

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_native_refine.py

Checked, with and without the pack's R0 LoRA applied through ComfyUI's LoraLoader:
- iteration 0 ("initial") equals SamplerCustom with the R0 Sampler and VAEDecode for the same seed, sigmas, cfg;
- the refined images score higher under the reward than the initial ones, and each never lower;
- the MODEL's weights are unchanged afterwards and still inference-mode tensors (the node's copies are dropped);
- Cancel: ComfyUI's interrupt during the refinement returns the best images reached, without an error.
Writes benchmarks/results/comfy_native_refine.json and .md; exits 1 if a check fails.
"""
import os
import sys

import in_comfyui as harness  # noqa: I001  (first: it imports ComfyUI as its server does)
import torch

import comfy_extras.nodes_custom_sampler as custom  # noqa: E402
import nodes  # noqa: E402

from r0_core.tiny import oracle  # noqa: E402

PACK, NODES, run = harness.PACK, harness.NODES, harness.run
LORA = "tiny-r0-lora.safetensors"
PROMPT = "a red circle above a blue square"
SEED, CFG, ITERATIONS, BATCH = 3, 2.0, 8, 4


def sampler_custom(model, positive, negative, vae, sigmas, latent):
    sampler = run("R0Sampler", 0.0)[0]
    with torch.inference_mode():
        out = custom.SamplerCustom().sample(model, True, SEED, CFG, positive, negative, sampler, sigmas, latent)
        out = out[0] if isinstance(out, tuple) else out.result[0]
        return nodes.VAEDecode().decode(vae, out)[0]


def case(label, model, clip, vae, reward):
    positive = run("CLIPTextEncode", clip, PROMPT)[0]
    negative = run("CLIPTextEncode", clip, "")[0]
    latent = run("EmptyLatentImage", 128, 128, BATCH)[0]   # the tiny VAE halves once: 32x32 images
    sigmas = run("R0Sigmas", model, 4, "")[0]
    reference = sampler_custom(model, positive, negative, vae, sigmas, latent)   # loads (and patches) the MODEL
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    refined, initial, refined_latent = run("R0TestTimeRefineNative", model, positive, negative, vae, sigmas, latent,
                                           SEED, CFG, 0.0, reward, PROMPT, ITERATIONS, 5.0)
    prompts = [PROMPT] * BATCH
    with torch.no_grad():
        r0 = reward(initial.permute(0, 3, 1, 2), prompts).float()
        r1 = reward(refined.permute(0, 3, 1, 2), prompts).float()
        decoded = nodes.VAEDecode().decode(vae, refined_latent)[0]
    after = model.model.diffusion_model.state_dict()
    right = [sum(oracle.judge(im.numpy(), PROMPT).correct for im in images) for images in (initial, refined)]
    return {"lora": label, "initial_vs_sampler_custom": float((initial - reference).abs().max()),
            "refined_latent_decodes_to_refined": float((decoded - refined).abs().max()),
            "reward_initial": r0.mean().item(), "reward_refined": r1.mean().item(),
            "oracle_right_initial": right[0], "oracle_right_refined": right[1],
            "images_lower": int((r1 < r0 - 1e-6).sum()), "images_changed": int(
                ((refined - initial).abs().flatten(1).amax(1) > 1 / 255).sum()),
            "weights_unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "weights_still_inference": all(v.is_inference() for v in after.values()),
            "images": (initial, refined)}, (positive, negative, latent, sigmas)


def cancel_case(model, vae, reward, inputs):
    """Interrupt after the third iteration, as the Cancel button does: the node returns its best so far."""
    positive, negative, latent, sigmas = inputs
    out, error, calls = harness.queued("R0TestTimeRefineNative", model, positive, negative, vae, sigmas, latent,
                                       SEED, CFG, 0.0, reward, PROMPT, ITERATIONS, 5.0, hook=harness.cancel_at(3))
    refined = None if out is None else out[0]
    return {"progress_calls": len(calls), "error": error, "returned_images": None if error else list(refined.shape)}


def save_picture(pairs) -> str:
    """Initial and refined rows of each case, as one PNG beside the results."""
    import numpy as np
    from PIL import Image

    rows = [torch.cat(list(images), dim=1) for pair in pairs for images in pair]   # [H, B*W, 3] each
    grid = (torch.cat(rows, dim=0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    path = os.path.join(PACK, "benchmarks", "results", "comfy_native_refine.png")
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)
    return path


def main():
    import comfyui_version
    from r0_core.tiny import protocol

    model, clip, vae = run("R0TinyNativeLoader", "tiny", "fp32", "cpu")
    beside = NODES["RewardLoader"].INPUT_TYPES()["required"]["support"][0][0]   # companion files beside it
    reward = run("RewardLoader", "clip", "tiny", beside, "cpu", "fp32")[0]
    os.makedirs(os.path.join(os.getcwd(), "models", "loras"), exist_ok=True)
    link = os.path.join(os.getcwd(), "models", "loras", LORA)
    if not os.path.exists(link):
        os.symlink(os.path.join(PACK, "r0_core", "tiny", "weights", LORA), link)
    lora_model, lora_clip = run("LoraLoader", model, clip, LORA, 1.0, 1.0)
    plain, inputs = case("none", model, clip, vae, reward)
    with_lora, _ = case("R0 LoRA (LoraLoader)", lora_model, lora_clip, vae, reward)
    cancelled = cancel_case(model, vae, reward, inputs)
    rows = [plain, with_lora]
    picture = save_picture([r.pop("images") for r in rows])
    ok = all(r["initial_vs_sampler_custom"] <= 1e-5 and r["refined_latent_decodes_to_refined"] <= 1e-5
             and r["reward_refined"] > r["reward_initial"] and r["images_lower"] == 0 and r["weights_unchanged"]
             and r["weights_still_inference"] for r in rows) and cancelled["error"] is None \
        and cancelled["progress_calls"] == 3
    lines = [f"R0 Test-time Refine (native MODEL) in ComfyUI {comfyui_version.__version__}, on R0 Tiny World "
             f"(native MODEL/CLIP/VAE), fp32 on the CPU: prompt {PROMPT!r}, batch {BATCH}, seed {SEED}, cfg "
             f"{CFG:g}, R0 Sigmas 4 steps, η 0, {ITERATIONS} iterations at lr 5, reward tiny CLIP. Run inside "
             f"ComfyUI: `cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_native_refine.py`. "
             f"All checks {'pass' if ok else 'do NOT all pass'}.", "",
             "| LoRA | initial vs SamplerCustom + R0 Sampler + VAEDecode | refined latent decoded vs refined | "
             "reward initial → refined (mean) | oracle: right initial → refined | images scored lower | images changed | MODEL weights unchanged, "
             "still inference tensors |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['lora']} | {r['initial_vs_sampler_custom']:.1e} | {r['refined_latent_decodes_to_refined']:.1e}"
              f" | {r['reward_initial']:.4f} → {r['reward_refined']:.4f} | {r['oracle_right_initial']} → "
              f"{r['oracle_right_refined']} of {BATCH} | {r['images_lower']} | "
              f"{r['images_changed']} of {BATCH} | {r['weights_unchanged']}, {r['weights_still_inference']} |"
              for r in rows]
    lines += ["", f"Cancel (ComfyUI's interrupt raised at progress 3 of {ITERATIONS}): progress calls "
              f"{cancelled['progress_calls']}, error {cancelled['error']}, returned images "
              f"{cancelled['returned_images']}."]
    lines += ["", f"![initial and refined]({os.path.basename(picture)}) Rows: without LoRA initial, refined; with "
              f"the R0 LoRA initial, refined (4 seeds each, 32×32 shown at 4×). {BATCH} images a case decide "
              f"nothing about accuracy (mini Table 1's test-time R0 row does, over the test captions); this "
              f"checks the node's plumbing on a native MODEL."]
    results = {"comfyui": comfyui_version.__version__, "ok": ok, "rows": rows, "cancel": cancelled}
    paths = protocol.write_results("comfy_native_refine", results, "\n".join(lines),
                                   out=os.path.join(PACK, "benchmarks", "results"),
                                   argv=[os.path.join(PACK, "scripts", "comfy_native_refine.py")])
    print("\n".join(lines) + f"\nwrote {', '.join(paths)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
