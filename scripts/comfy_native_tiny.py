"""The tiny world through ComfyUI's own nodes, inside a ComfyUI checkout (not part of CI): R0 Tiny World (native
MODEL/CLIP/VAE) against our diffusers pipeline, on the same prompts, σ and start noise.

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_native_tiny.py

The pack is imported by ComfyUI's own custom-node loader. Compared: CLIPTextEncode's conditioning with what our
pipeline feeds its UNet; the MODEL's denoiser (BaseModel.apply_model) with r0_core's DiffusersDenoiser at
training-grid σ; ComfyUI's euler (SamplerCustom's path, and KSampler's with the `simple` scheduler, whose σ are
the same trailing grid) with our R0 sampler at η = 0, through to VAEDecode's images; and the pack's R0 LoRA
through `comfy.sd.load_lora_for_models` (what LoraLoader runs) against the same LoRA on our pipeline.
Writes benchmarks/results/comfy_native_tiny.json and .md; exits 1 if a difference is over its tolerance.
"""
import os
import sys

import in_comfyui as harness  # noqa: I001  (first: it imports ComfyUI as its server does)
import torch

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import nodes  # noqa: E402

from r0_core import family, lora  # noqa: E402
from r0_core.generate import generate  # noqa: E402
from r0_core.loading import load_pipeline  # noqa: E402
from r0_core.sampler import sample_r0, seeded_noise  # noqa: E402
from r0_core.schedule import r0_sigmas  # noqa: E402

PACK = harness.PACK
LORA = os.path.join(PACK, "r0_core", "tiny", "weights", "tiny-r0-lora.safetensors")
PROMPTS = ["a red circle on the left", "a blue square above a green triangle", "a yellow triangle at the bottom",
           "a purple circle right of a red square"]
TOLERANCE = {"conditioning": 1e-5, "denoiser": 1e-5, "latents": 1e-4, "images": 1e-4,
             # ComfyUI's own fp32 euler (see sampling_rows): bounds on its rounding, not on a mismatch
             "latents_fp32": 5e-2, "images_fp32": 1e-2}


def diff(a, b) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def encode(clip, text):
    """CLIPTextEncode's conditioning [[cond, {...}]] -> the cond tensor."""
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def conditioning_rows(pipe, clip):
    rows = []
    for text in PROMPTS + [""]:
        c = family.conditioning(pipe, [text or PROMPTS[0]], 2.0)
        ours = c["uncond"] if text == "" else c["cond"]   # "" is what our pipeline encodes as the uncond
        theirs = encode(clip, text)[0][0]
        rows.append({"prompt": text, "shape": list(theirs.shape), "max_abs_diff": diff(ours, theirs)})
    return rows


def denoiser_rows(pipe, model, cond, label):
    """apply_model (ComfyUI's σ-convention denoiser, v-prediction) against DiffusersDenoiser at grid σ and one
    σ between grid points (where ComfyUI snaps to the nearest timestep and we interpolate)."""
    comfy.model_management.load_models_gpu([model])   # applies the MODEL's patches (a LoRA) to its weights
    ours = family.denoiser(pipe)
    table = model.get_model_object("model_sampling").sigmas
    grid = r0_sigmas(table, 4)[:-1].tolist() + [float(table[0]), float(table[500])]
    between = float((table[600].log() + table[601].log()).div(2).exp())
    rows = []
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for sigma in grid + [between]:
            s = torch.full((2,), sigma)
            x = x0 + sigma * eps
            theirs = model.model.apply_model(x, s, c_crossattn=cond.expand(2, -1, -1))
            mine = ours(x, s, cond=cond.expand(2, -1, -1))
            rows.append({"lora": label, "sigma": sigma, "on_grid": sigma != between,
                         "max_abs_diff": diff(mine, theirs), "denoised_std": float(theirs.std())})
    return rows


def ours_sample(pipe, noise, sigmas, cond, uncond, guidance):
    """Our R0 sampler at η = 0 from the same start (noise · sqrt(1 + σ0²), as ComfyUI's max_denoise start):
    raw VAE latents and images [B, H, W, 3]."""
    x = family.start_latents(noise, sigmas)
    extra = {"cond": cond, "uncond": uncond, "guidance": guidance}
    with torch.no_grad():
        latents = sample_r0(family.denoiser(pipe), x, sigmas, extra, disable=True, eta=0.0)
        images = family.decode(pipe, latents)
    return latents / pipe.vae.config.scaling_factor, images.permute(0, 2, 3, 1)


def sampling_rows(pipe, model, clip, vae, label):
    """Each ComfyUI path twice: with its sampler arithmetic in float64 (float64 start noise, latent and σ; the
    networks still run in fp32), where it must equal ours, and as shipped in fp32, where its euler step
    x + d·(σ' − σ) cancels at the tiny world's σ_max ≈ 2·10⁴ and loses about 1e-3 (our step x̂0 + σ' ε̂ does not).
    KSampler makes its σ as float32 tensors itself, so its rows stay in the fp32 tier (tier: "exact", "fp32",
    or "none" for `normal`, whose σ lie off the training grid)."""
    rows, images_out = [], {}
    positive = [encode(clip, p) for p in PROMPTS]
    negative = encode(clip, "")
    batch = len(PROMPTS)
    # ComfyUI's conditioning is one prompt per list entry; a batch of prompts is one cond of that batch
    pos = [[torch.cat([p[0][0] for p in positive]), positive[0][0][1]]]
    neg = [[negative[0][0].expand(batch, -1, -1), negative[0][1]]]
    cond, uncond = pos[0][0], neg[0][0]
    sampling = model.get_model_object("model_sampling")
    seeds = list(range(batch))
    for steps, guidance in ((4, 1.0), (4, 2.0), (8, 2.0)):
        mine_img, mine_raw = generate(pipe, PROMPTS, steps=steps, guidance=guidance, seeds=seeds)
        for precision, dtype in (("fp64", torch.float64), ("fp32", torch.float32)):
            empty = torch.zeros(batch, 4, 16, 16, dtype=dtype)
            # 1. SamplerCustom's path: euler on the R0 grid from seeded noise; ours: r0_core.generate itself
            noise = seeded_noise(empty.shape, seeds).to(dtype)
            with torch.no_grad():
                raw = comfy.sample.sample_custom(model, noise, guidance, comfy.samplers.sampler_object("euler"),
                                                 r0_sigmas(sampling.sigmas, steps).to(dtype), pos, neg, empty,
                                                 disable_pbar=True, seed=0)
                theirs_img = nodes.VAEDecode().decode(vae, {"samples": raw.float()})[0]
            row = {"lora": label, "steps": steps, "cfg": guidance, "precision": precision}
            tier = "exact" if precision == "fp64" else "fp32"
            rows.append({**row, "path": "sample_custom euler, R0 grid", "tier": tier,
                         "latents": diff(mine_raw, raw), "images": diff(mine_img.permute(0, 2, 3, 1), theirs_img)})
            if precision == "fp32":
                images_out[(steps, guidance)] = theirs_img
            # 2. KSampler's own function (noise from its seed): `simple` is the R0 grid, `normal` is not
            for scheduler in ("simple", "normal"):
                with torch.no_grad():
                    out = nodes.common_ksampler(model, 7, steps, guidance, "euler", scheduler, pos, neg,
                                                {"samples": empty})[0]["samples"]
                    theirs_img = nodes.VAEDecode().decode(vae, {"samples": out.float()})[0]
                sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps)
                ours_raw, ours_img = ours_sample(pipe, comfy.sample.prepare_noise(empty, 7).float(), sigmas, cond,
                                                 uncond, guidance)
                tier = "fp32" if scheduler == "simple" else "none"
                rows.append({**row, "path": f"KSampler euler/{scheduler}", "tier": tier,
                             "latents": diff(ours_raw, out), "images": diff(ours_img, theirs_img)})
    return rows, images_out


def load_lora(model, clip):
    with harness.Messages() as messages:
        file = comfy.utils.load_torch_file(LORA, safe_load=True)
        patched, patched_clip = comfy.sd.load_lora_for_models(model, clip, file, 1.0, 1.0)
    modules = len({k.rsplit(".", 2)[0] for k in file})
    not_loaded = messages.not_loaded()
    return patched, patched_clip, {"lora_modules": modules, "patched_weights": len(patched.patches),
                                   "not_loaded": not_loaded}


def main():
    loader = nodes.NODE_CLASS_MAPPINGS["R0TinyNativeLoader"]()
    model, clip, vae = loader.load("tiny", "fp32", "cpu")
    pipe = load_pipeline("tiny", device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cond_rows = conditioning_rows(pipe, clip)
    first = family.conditioning(pipe, [PROMPTS[0]], 1.0)["cond"]
    den_rows = denoiser_rows(pipe, model, first, "none")
    samp_rows, base_images = sampling_rows(pipe, model, clip, vae, "none")
    patched, patched_clip, lora_info = load_lora(model, clip)
    lora.load_lora(pipe, LORA, "r0", 1.0)   # the same file on our pipeline, through diffusers/peft
    den_rows += denoiser_rows(pipe, patched, first, "r0")
    lora_rows, lora_images = sampling_rows(pipe, patched, patched_clip, vae, "r0")
    samp_rows += lora_rows
    lora_info["image_change"] = {f"{k[0]} steps, cfg {k[1]:g}": diff(base_images[k], lora_images[k])
                                 for k in base_images}
    report(cond_rows, den_rows, samp_rows, lora_info)


def report(cond_rows, den_rows, samp_rows, lora_info):
    import comfyui_version

    worst = {"conditioning": max(r["max_abs_diff"] for r in cond_rows),
             "denoiser": max(r["max_abs_diff"] for r in den_rows if r["on_grid"]),
             **{f"{k}{'' if tier == 'exact' else '_fp32'}": max(r[k] for r in samp_rows if r["tier"] == tier)
                for k in ("latents", "images") for tier in ("exact", "fp32")}}
    ok = all(worst[k] <= TOLERANCE[k] for k in worst) and not lora_info["not_loaded"] \
        and lora_info["patched_weights"] == lora_info["lora_modules"] > 0 \
        and min(lora_info["image_change"].values()) > 100 * TOLERANCE["images"]
    lines = [f"R0 Tiny World (native MODEL/CLIP/VAE) in ComfyUI {comfyui_version.__version__} against our diffusers "
             f"pipeline (r0_core), fp32 on the CPU, same prompts, σ and start noise; batch {len(PROMPTS)}, "
             f"32×32 images (16×16 latents). Run inside ComfyUI: `cd <ComfyUI> && <ComfyUI's python> "
             f"<pack>/scripts/comfy_native_tiny.py`.", "",
             f"Worst differences: conditioning {worst['conditioning']:.1e}, denoiser {worst['denoiser']:.1e} "
             f"(grid σ), latents {worst['latents']:.1e}, images {worst['images']:.1e} (SamplerCustom's path "
             f"with fp64 sampler arithmetic; ComfyUI's fp32 arithmetic: {worst['latents_fp32']:.1e}, "
             f"{worst['images_fp32']:.1e}) "
             f"(tolerances {', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items())}): "
             f"{'all within' if ok else 'NOT all within'}.", "",
             "## CLIPTextEncode vs our pipeline's prompt embeddings", "",
             "| prompt | shape | max abs difference |", "|---|---|---|"]
    lines += [f"| {r['prompt']!r} | {r['shape']} | {r['max_abs_diff']:.1e} |" for r in cond_rows]
    lines += ["", "## MODEL denoiser (BaseModel.apply_model) vs DiffusersDenoiser, x = x0 + σ ε, batch 2", "",
              "Off the grid ComfyUI snaps σ to the nearest training timestep while we interpolate, so that row "
              "differs by design.", "",
              "| LoRA | σ | on the training grid | max abs difference | denoised std |", "|---|---|---|---|---|"]
    lines += [f"| {r['lora']} | {r['sigma']:.4g} | {'yes' if r['on_grid'] else 'no'} | {r['max_abs_diff']:.1e} | "
              f"{r['denoised_std']:.3f} |" for r in den_rows]
    lines += ["", "## Sampling and VAEDecode vs our R0 sampler at η = 0 (r0_core.generate / sample_r0)", "",
              "Tiers: *exact*: SamplerCustom's path with its sampler arithmetic in fp64 (fp64 start noise, latent "
              "and σ; the networks run in fp32), tolerance latents 1e-4, images 1e-4. *fp32*: ComfyUI's "
              "arithmetic in fp32, where its euler step x + d·(σ′ − σ) cancels at the tiny world's σ_max ≈ 2·10⁴ "
              "(the squaredcos_cap_v2 schedule's last level) and rounds off about 1e-3 (our step x̂0 + σ′ ε̂ does "
              "not); KSampler makes its σ as float32 tensors itself, so its rows are in this tier even with an "
              "fp64 latent; tolerance latents 5e-2, images 1e-2 (an 8-bit image step is 3.9e-3). *none*: "
              "`normal` spaces timesteps evenly from 999 to 0, off the training grid (see the denoiser rows): "
              "not gated.", "",
              "| LoRA | ComfyUI path | latent dtype | tier | steps | cfg | latents max abs diff | "
              "images max abs diff |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['lora']} | {r['path']} | {r['precision']} | {r['tier']} | "
              f"{r['steps']} | {r['cfg']:g} | {r['latents']:.1e} | {r['images']:.1e} |" for r in samp_rows]
    lines += ["", "## The pack's R0 LoRA (tiny-r0-lora.safetensors, kohya) through comfy.sd.load_lora_for_models",
              "", f"LoRA modules in the file: {lora_info['lora_modules']}; weights ComfyUI patched: "
              f"{lora_info['patched_weights']}; \"not loaded\" messages: {len(lora_info['not_loaded'])}.", "",
              "Largest image change the LoRA makes (ComfyUI, sample_custom path): " + ", ".join(
                  f"{k}: {v:.3f}" for k, v in lora_info["image_change"].items()) + "."]
    from r0_core.tiny import protocol
    results = {"comfyui": comfyui_version.__version__, "worst": worst, "tolerance": TOLERANCE, "ok": ok,
               "conditioning": cond_rows, "denoiser": den_rows, "sampling": samp_rows, "lora": lora_info}
    paths = protocol.write_results("comfy_native_tiny", results, "\n".join(lines),
                                   out=os.path.join(PACK, "benchmarks", "results"),
                                   argv=[os.path.join(PACK, "scripts", "comfy_native_tiny.py")])
    print("\n".join(lines) + f"\nwrote {', '.join(paths)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
