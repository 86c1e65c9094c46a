"""Our LoRA files in ComfyUI's LoraLoader, per UNet family, inside a ComfyUI checkout (not part of CI):
every key is mapped (no "lora key not loaded"), and every patched weight is W + alpha/r · up·down.

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_lora_keys.py

Each family is a diffusers UNet with the family's own block structure (SD 1.5: four levels, one transformer per
attention; SDXL: three levels, 0/2/10 transformers, linear projections, text-time embedding) at small widths:
LoRA key names depend on the structure alone, and the widths only make it fit in memory. The LoRA adapts every
supported target (lora.ALL + lora.EXTRA) with random factors, is saved by lora.save_lora, and goes through
ComfyUI's own `comfy.sd.load_lora_for_models` (what LoraLoader runs) on the same structure built as ComfyUI's
model (`comfy.supported_models`). Writes benchmarks/results/comfy_lora_keys.json and .md.
"""
import json
import logging
import os
import subprocess
import sys
import tempfile

import torch

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())
sys.path.insert(1, PACK)
sys.argv[1:] = ["--cpu"]   # ComfyUI parses its command line when imported, if told to
import comfy.options  # noqa: E402
comfy.options.enable_args_parsing()

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
}


def our_lora(settings: dict, path: str) -> tuple[UNet2DConditionModel, int]:
    """A diffusers UNet of the family with a LoRA on every supported target, random factors, saved to path."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**settings)
    lora.add_lora(unet, rank=4, targets=lora.ALL + lora.EXTRA, name="r0")
    with torch.no_grad():
        for p in lora.lora_parameters(unet, "r0"):
            p.normal_(0, 0.1)   # B starts at 0; random B makes every ΔW visible
    lora.save_lora(unet, path, "r0")
    return unet, len(lora.kohya_state_dict(unet, "r0")) // 3


def comfy_model(name: str, unet_config: dict):
    config = getattr(comfy.supported_models, name)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def check(family: str, settings: dict) -> dict:
    name, unet_config = settings["comfy"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lora.safetensors")
        _, modules = our_lora(settings["diffusers"], path)
        file = comfy.utils.load_torch_file(path, safe_load=True)
    patcher = comfy_model(name, unet_config)
    messages = Messages()
    logging.getLogger().addHandler(messages)
    try:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, file, 1.0, 0.0)
    finally:
        logging.getLogger().removeHandler(messages)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    patched.patch_model()
    after = patched.model.state_dict()
    worst, compared = 0.0, 0
    for key in {k.rsplit(".", 2)[0] for k in file}:
        target = key_map.get(key)
        if target is None:
            continue
        down, up = file[f"{key}.lora_down.weight"].float(), file[f"{key}.lora_up.weight"].float()
        alpha = float(file[f"{key}.alpha"])
        delta = (up.flatten(1) @ down.flatten(1)).reshape(before[target].shape) * alpha / down.shape[0]
        worst = max(worst, float((after[target] - before[target] - delta).abs().max()))
        compared += 1
    patched.unpatch_model()
    not_loaded = [m for m in messages.lines if "not loaded" in m.lower()]
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
             "Every supported target (lora.ALL + lora.EXTRA), rank 4, random factors; each family's UNet block "
             "structure at small widths.", "",
             "| family | LoRA modules in the file | mapped by ComfyUI | patched weights | \"not loaded\" messages | "
             "max abs(patched − (W + α/r·up·down)) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['lora_modules']} | {r['mapped']} | {r['patched']} | "
                     f"{len(r['not_loaded'])} | {r['max_weight_error']:.1e} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in rows:
        assert r["mapped"] == r["patched"] == r["lora_modules"] and not r["not_loaded"], r
        assert r["max_weight_error"] < 1e-5, r


if __name__ == "__main__":
    main()
