"""RPO nodes: load a subject's reference images, and fine-tune a pipeline on the subject with RPO (or DreamBooth).
Node ids and the order of their inputs are a public API: append, never reorder."""
from __future__ import annotations

import logging

import torch

from r0_core import family, lora
from r0_core.loading import TINY_NAMES
from r0_core.tiny import subjects
from rpo_core.references import image_batch, load_references
from rpo_core.train import RPOConfig, default_prompts, train_rpo

from . import bridge
from .r0_nodes import PIPELINE
from .reward_nodes import REWARD
from .train_nodes import read_png, stop_if_cancelled, train_into, with_lora

logger = logging.getLogger(__name__)   # ComfyUI shows INFO records in its console
TINY_PREFIX = "tiny/"   # the built-in tiny world's subjects, listed beside the input folder's sub-folders


def reference_sources() -> list[str]:
    return [TINY_PREFIX + s.name for s in subjects.SUBJECTS] + [
        d for d in bridge.list_input_folders() if not d.startswith(".")]


class RPOLoadReferences:
    DESCRIPTION = ("Loads a subject's reference photos (3–6 are typical) from a sub-folder of ComfyUI's input "
                   "folder, or a built-in tiny-world subject, as one IMAGE batch fitted to `size`: any size, "
                   "aspect or mode (RGBA on white, grayscale, EXIF-rotated JPEG).")
    CATEGORY = "RPO"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("references",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": (reference_sources(), {"tooltip": "input/<folder> of the subject's images, or tiny/<subject> "
                                                        "(tokens: " + ", ".join(f"{s.name}={s.token} {s.shape}"
                                                                                 for s in subjects.SUBJECTS) + ")"}),
            "size": ("INT", {"default": 512, "min": 8, "max": 4096, "step": 8,
                             "tooltip": "resize the short side and centre-crop to size×size (the model's size)"}),
        }}

    def load(self, source, size):
        if source.startswith(TINY_PREFIX):
            names = {s.name: s for s in subjects.SUBJECTS}
            name = source[len(TINY_PREFIX):]
            if name not in names:
                raise ValueError(f"source {source!r}: no built-in subject {name!r}; choose one of {sorted(names)}")
            refs = image_batch(torch.from_numpy(subjects.references(names[name])), size)
        else:
            refs = load_references(bridge.resolve_input(source), size)
        return (refs.permute(0, 2, 3, 1).contiguous(),)


class RPOTrain:
    DESCRIPTION = ("Fine-tunes the pipeline on a subject from a few reference images with RPO: a diffusion loss on "
                   "the references plus a preference loss labelled by the λ-Harmonic reward, keeping the weights "
                   "that score best in few-step λ_val validation. β = 0 with preference off is DreamBooth. Saves "
                   "the LoRA in models/loras; Cancel keeps the best so far; re-queueing resumes.")
    CATEGORY = "RPO"
    RETURN_TYPES = (PIPELINE, "STRING", "IMAGE")
    RETURN_NAMES = ("pipeline", "lora_path", "curve")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": (PIPELINE, {"tooltip": "the model from R0 Load Pipeline"}),
            "references": ("IMAGE", {"tooltip": "the subject's photos (RPO Load References or Load Image)"}),
            "encoder": (REWARD, {"tooltip": "λ-Harmonic encoder: a CLIP, PickScore, HPSv2 or ALIGN reward model"}),
            "token": ("STRING", {"default": "sks", "tooltip": "the rare token that will name the subject"}),
            "class_name": ("STRING", {"default": "dog", "tooltip": "the subject's class noun"}),
            "prompts": ("STRING", {"multiline": True, "default": "",
                                   "tooltip": "training prompts with the token, one per line; empty: the paper's "
                                              "eight (on the built-in tiny model, the tiny subjects' eight, which "
                                              "its tokenizer can read)"}),
            "steps": ("INT", {"tooltip": "training iterations", "default": 400, "min": 1, "max": 100000}),
            "lambda_val": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                     "tooltip": "λ of the validation reward: 1 subject only, 0 prompt only"}),
            "beta": ("FLOAT", {"default": RPOConfig.beta, "min": 0.0, "max": 1e6, "step": 0.5,
                                "tooltip": "scale of the preference loss's Δ; too large and it swamps the "
                                           "diffusion loss (watch L_sim in the curve)"}),
            "tau": ("FLOAT", {"default": RPOConfig.tau, "min": 1e-4, "max": 10.0, "step": 0.005,
                              "tooltip": "temperature of the preference labels σ((r_ref − r_gen)/τ); 1 is the "
                                         "official rule"}),
            "lr": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                             "tooltip": "learning rate (LoRA); the full UNet wants far less, e.g. 5e-6"}),
            "lora_rank": ("INT", {"default": 8, "min": 0, "max": 256, "tooltip": "0 trains the full UNet"}),
            "validate_every": ("INT", {"default": 40, "min": 1, "max": 100000,
                                       "tooltip": "iterations between λ_val validations; the best validated weights "
                                                  "are kept"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 63 - 1,
                             "tooltip": "seeds the pairs, noise and labels; the same seed gives the same LoRA"}),
            "save_name": ("STRING", {"default": "rpo_subject", "tooltip": "models/loras/<save_name>.safetensors"}),
            "preference": ("BOOLEAN", {"default": True, "tooltip": "off: DreamBooth (diffusion loss only)"}),
            "sampler_steps": ("INT", {"default": 4, "min": 1, "max": 50,
                                      "tooltip": "K for the negatives and validation samples"}),
            "guidance": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                   "tooltip": "CFG of the sampler for negatives and validation images"}),
        }, "optional": {
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace models/loras/<save_name> even if "
                                                                   "another run (or no run) made it; off: such a "
                                                                   "run is saved under <save_name>_2, _3, ..."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run: a finished run is found on disk and reused, a stopped one resumes

    def train(self, pipeline, references, encoder, token, class_name, prompts, steps, lambda_val, beta, tau, lr,
              lora_rank, validate_every, seed, save_name, preference, sampler_steps, guidance, overwrite=False):
        pipe = pipeline["pipe"].to(pipeline["device"])
        size = family.backbone(pipe).config.sample_size * pipe.vae_scale_factor
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        tiny = pipeline["path"] in TINY_NAMES
        lines = lines or default_prompts(token.strip(), class_name.strip(), tiny=tiny)
        config = RPOConfig(token=token.strip(), class_name=class_name.strip(), prompts=lines,
                           iterations=steps, lambda_val=lambda_val, beta=beta, tau=tau, lr=lr, lora_rank=lora_rank,
                           validate_every=validate_every, seed=seed, preference=preference,
                           sampler_steps=sampler_steps, guidance=guidance)
        refs = image_batch(references, size)
        lora.use_loras(pipe, pipeline.get("loras", []))
        name, result = train_into("RPO Train", "rpo", save_name, overwrite, lambda name, lora_path, out_dir, replace:
                                  train_rpo(pipe, encoder, refs, config, out_dir, lora_path,
                                            bridge.cancellable_progress(steps), adapter=name, overwrite=replace))
        stop_if_cancelled("RPO Train", result, steps, f"the best LoRA so far (step {result.best_iteration})")
        logger.info(f"[RPO Train] best λ_val={lambda_val} validation {result.best_score:.4f} at step "
                    f"{result.best_iteration}; LoRA {result.lora_path}")
        return (with_lora(pipeline, name, 1.0), result.lora_path or "", read_png(result.curve_path))


NODE_CLASS_MAPPINGS = {
    "RPOLoadReferences": RPOLoadReferences,
    "RPOTrain": RPOTrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RPOLoadReferences": "RPO Load References",
    "RPOTrain": "RPO Train (subject)",
}
