"""Our LoRA files in ComfyUI's LoraLoader, per model family, inside a ComfyUI checkout (not part of CI):
every key is mapped (no "lora key not loaded"), and every patched weight is W + alpha/r · up·down.

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_lora_keys.py

Each family is a diffusers backbone with the family's own block structure (SD 1.5: four levels, one transformer
per attention; SDXL: three levels, 0/2/10 transformers, linear projections, text-time embedding; SD3: an MMDiT of
two joint blocks) at small widths: LoRA key names depend on the structure alone, and the widths only make it fit
in memory. The LoRA adapts every supported target (a UNet's lora.ALL + lora.EXTRA, the transformer's attention
and feed-forward layers) with random factors, is saved by lora.save_lora (kohya keys for UNets, diffusers
`transformer.*` keys for SD3), and goes through
ComfyUI's own `comfy.sd.load_lora_for_models` (what LoraLoader runs) on the same structure built as ComfyUI's
model (`comfy.supported_models`). Writes benchmarks/results/comfy_lora_keys.json and .md.
"""
import json
import os
import subprocess
import tempfile

from in_comfyui import PACK, Messages  # noqa: I001  (first: it imports ComfyUI as its server does)
import torch

import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from r0_core import lora  # noqa: E402

WIDTH = 32   # channels of the first level (GroupNorm needs multiples of 32)

FAMILIES = {
    "SD 1.5": dict(
        diffusers=dict(block_out_channels=(WIDTH, 2 * WIDTH, 4 * WIDTH, 4 * WIDTH), layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
                       attention_head_dim=4, sample_size=8),
        comfy=("SD15", dict(context_dim=32, model_channels=WIDTH, use_linear_in_transformer=False,
                            adm_in_channels=None, use_temporal_attention=False, num_res_blocks=[2] * 4,
                            channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                            transformer_depth_middle=1, num_heads=4, in_channels=4, out_channels=4,
                            image_size=8, use_spatial_transformer=True, legacy=False, use_checkpoint=False,
                            use_temporal_resblock=False))),
    "SDXL": dict(
        diffusers=dict(block_out_channels=(WIDTH, 2 * WIDTH, 4 * WIDTH), layers_per_block=2,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4),
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                       projection_class_embeddings_input_dim=6 * 256 + 32, cross_attention_dim=32,
                       sample_size=8),
        comfy=("SDXL", dict(model_channels=WIDTH, use_linear_in_transformer=True, context_dim=32,
                            adm_in_channels=6 * 256 + 32, use_temporal_attention=False, num_res_blocks=[2, 2, 2],
                            channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                            transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                            num_head_channels=WIDTH, num_classes="sequential", in_channels=4, out_channels=4,
                            image_size=8, use_spatial_transformer=True, legacy=False, use_checkpoint=False,
                            use_temporal_resblock=False))),
    # ComfyUI's MMDiT is 64 channels per block of depth: depth 2 = hidden 128 (2 heads of 64)
    "SD3": dict(
        diffusers=dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                       attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                       caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=16),
        comfy=("SD3", dict(in_channels=4, out_channels=4, patch_size=2, depth=2, input_size=None,
                           adm_in_channels=64, pos_embed_max_size=16, num_patches=256, qk_norm=None,
                           x_block_self_attn_layers=[], pos_embed_scaling_factor=None,
                           context_embedder_config={"target": "torch.nn.Linear",
                                                    "params": {"in_features": 64, "out_features": 128}}))),
}


def our_lora(family: str, settings: dict, path: str) -> int:
    """A diffusers backbone of the family with a LoRA on every supported target (a UNet's ALL + EXTRA, a
    transformer's attention and feed-forward), random factors, saved to path; returns the adapted modules."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    if family == "SD3":
        model = SD3Transformer2DModel(**settings)
        targets = lora.targets_for(model, "all")
    else:
        model, targets = UNet2DConditionModel(**settings), lora.ALL + lora.EXTRA
    lora.add_lora(model, rank=4, targets=targets, name="r0")
    with torch.no_grad():
        for p in lora.lora_parameters(model, "r0"):
            p.normal_(0, 0.1)   # B starts at 0; random B makes every ΔW visible
    lora.save_lora(model, path, "r0")
    return len(lora.lora_parameters(model, "r0")) // 2


def comfy_model(name: str, unet_config: dict):
    config = getattr(comfy.supported_models, name)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def check(family: str, settings: dict) -> dict:
    name, unet_config = settings["comfy"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lora.safetensors")
        modules = our_lora(family, settings["diffusers"], path)
        file = comfy.utils.load_torch_file(path, safe_load=True)
    patcher = comfy_model(name, unet_config)
    with Messages() as messages:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, file, 1.0, 0.0)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    patched.patch_model()
    after = patched.model.state_dict()
    expected, compared = {}, 0
    for key in {k.rsplit(".", 2)[0] for k in file}:
        target = key_map.get(key)
        if target is None:
            continue
        kohya = f"{key}.lora_down.weight" in file
        down = file[f"{key}.lora_down.weight" if kohya else f"{key}.lora_A.weight"].float()
        up = file[f"{key}.lora_up.weight" if kohya else f"{key}.lora_B.weight"].float()
        scale = float(file[f"{key}.alpha"]) / down.shape[0] if kohya else 1.0
        # ComfyUI maps some layers onto a slice of a fused weight (SD3's q, k, v in one qkv): (key, (dim, at, n))
        name, where = (target, None) if isinstance(target, str) else target
        weight = expected.setdefault(name, before[name].clone())
        part = weight if where is None else weight.narrow(*where)
        part += (up.flatten(1) @ down.flatten(1)).reshape(part.shape) * scale
        compared += 1
    worst = max(float((after[name] - weight).abs().max()) for name, weight in expected.items())
    patched.unpatch_model()
    not_loaded = messages.not_loaded()
    return {"family": family, "lora_modules": modules, "mapped": compared, "patched": len(patched.patches),
            "not_loaded": not_loaded, "max_weight_error": worst}


def main():
    rows = [check(family, settings) for family, settings in FAMILIES.items()]
    commit = subprocess.run(["git", "-C", PACK, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    import comfyui_version
    report = {"comfyui": comfyui_version.__version__, "commit": commit, "rows": rows,
              "command": "cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_lora_keys.py"}
    out = os.path.join(PACK, "benchmarks", "results", "comfy_lora_keys")
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# Our LoRA files in ComfyUI {report['comfyui']}'s LoraLoader (`comfy.sd.load_lora_for_models`)", "",
             f"Command: `{report['command']}` (commit {commit}).", "",
             "Every supported target (UNets: lora.ALL + lora.EXTRA; SD3: attention and feed-forward), rank 4, "
             "random factors; each family's block structure at small widths.", "",
             "| family | LoRA modules in the file | mapped by ComfyUI | patched weights (SD3: q, k, v share one) | "
             "\"not loaded\" messages | "
             "max abs(patched − (W + α/r·up·down)) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['lora_modules']} | {r['mapped']} | {r['patched']} | "
                     f"{len(r['not_loaded'])} | {r['max_weight_error']:.1e} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in rows:
        # SD3's q, k and v patch one fused qkv weight, so a file can patch fewer weights than it adapts modules
        assert r["mapped"] == r["lora_modules"] and 0 < r["patched"] <= r["mapped"] and not r["not_loaded"], r
        assert r["max_weight_error"] < 1e-5, r


if __name__ == "__main__":
    main()
