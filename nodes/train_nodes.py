"""R0 training nodes: train a few-step LoRA by reward maximization, apply a LoRA file to a pipeline, and refine
one prompt's images at test time. Node ids and the order of their inputs are a public API: append, never
reorder."""
from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch

from r0_core import lora
from r0_core.test_time import refine_noise
from r0_core.train import OtherRun, R0Config, train_r0

from . import bridge
from .r0_nodes import PIPELINE, native_size, size_input
from .reward_nodes import REWARD

LORAS = "loras"

logger = logging.getLogger(__name__)   # ComfyUI shows INFO records in its console


def with_lora(pipeline: dict, name: str, weight: float) -> dict:
    """A new R0_PIPELINE value sharing the cached pipeline, with one more LoRA applied when it generates."""
    return {**pipeline, "loras": [(n, w) for n, w in pipeline.get("loras", []) if n != name] + [(name, weight)]}


def safe_name(text: str, what: str = "save_name") -> str:
    """A LoRA name as given, if it is 1-100 letters, digits, '_' or '-': other text is refused, not mapped, so
    two different names never share a file."""
    name = text.strip() if isinstance(text, str) else ""
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,100}", name):
        suggestion = re.sub(r"[^A-Za-z0-9_\-]", "_", name)[:100].strip("_") or "my_lora"
        raise ValueError(f"{what}={text!r}: expected 1 to 100 letters, digits, '_' or '-' (it names the LoRA file "
                         f"in models/loras), e.g. {suggestion!r}")
    return name


def train_into(node: str, family: str, save_name: str, overwrite: bool, run):
    """Run a trainer node's `run(name, lora_path, out_dir)` under save_name, never replacing what another run
    made: a LoRA file no run of this node made (FileExistsError) or a run with other settings, model, rewards or
    references in the same folder (OtherRun) moves this run to save_name_2, _3, ... and says so, unless overwrite
    (then that file is replaced and that run started over). Returns (name, run's result)."""
    base = safe_name(save_name)
    loras = bridge.folder_roots(LORAS)[0]
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}_{n}"
        lora_path = os.path.join(loras, f"{name}.safetensors")
        out_dir = os.path.join(bridge.output_dir(), f"{family}_train", name)
        try:
            result = run(name, lora_path, out_dir, overwrite and n == 1)
        except (FileExistsError, OtherRun) as taken:
            if overwrite and n == 1 and isinstance(taken, OtherRun):
                os.remove(os.path.join(out_dir, "trainer_state.pt"))
                logger.info(f"[{node}] overwrite: starting {out_dir} over ({taken})")
                return name, run(name, lora_path, out_dir, True)
            continue
        if n > 1:
            logger.warning(f"[{node}] models/loras/{base}.safetensors belongs to another run (or is not a trained "
                           f"run's); this run is saved as {name}.safetensors. Set overwrite to replace {base} instead.")
        elif overwrite:
            logger.info(f"[{node}] overwrite: {lora_path} is replaced by this run")
        return name, result
    raise FileExistsError(f"save_name={save_name!r}: {base} and 998 numbered names are taken; choose another")


def check_sigmas(sigmas) -> None:
    """A native node's SIGMAS: at least one step."""
    if len(sigmas) < 2:
        raise ValueError(f"sigmas has {len(sigmas)} value(s); give at least two (R0 Sigmas with steps >= 1)")


def stop_if_cancelled(node: str, result, steps: int, kept: str = "partial LoRA") -> None:
    """After a trainer node's run: when Cancel stopped it, say what was kept and where, and end the prompt as
    ComfyUI's interrupt does (the node's outputs are not passed on)."""
    if result.cancelled:
        logger.info(f"[{node}] cancelled after {len(result.history)} of {steps} steps; {kept} saved to "
                    f"{result.lora_path}; queue again to resume")
        bridge.interrupt()


def read_png(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)[None]


class R0Train:
    DESCRIPTION = ("Trains a LoRA that makes the pipeline a better few-step generator by maximizing a reward "
                   "(R0), from prompts alone. Saves it in models/loras; Cancel keeps a partial LoRA; re-queueing "
                   "the same settings resumes or reuses the saved run.")
    CATEGORY = "R0/training"
    RETURN_TYPES = (PIPELINE, "STRING", "IMAGE")
    RETURN_NAMES = ("pipeline", "lora_path", "curve")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": (PIPELINE, {"tooltip": "the model from R0 Load Pipeline (with any LoRA from R0 Apply LoRA)"}),
            "reward_model": (REWARD, {"tooltip": "what to maximise: a scorer from Reward Loader or Reward Combine "
                                                 "(several rewards)"}),
            "prompts": ("STRING", {"multiline": True, "default": "a red circle above a blue square\n"
                                                                 "a green triangle left of a yellow circle",
                                   "tooltip": "training prompts, one per line"}),
            "steps": ("INT", {"default": 200, "min": 1, "max": 100000, "tooltip": "optimizer steps"}),
            "lr": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1.0, "step": 1e-5,
                             "tooltip": "learning rate of the LoRA weights"}),
            "lora_rank": ("INT", {"default": 8, "min": 1, "max": 256,
                                  "tooltip": "rank of the trained LoRA: larger learns more and makes a bigger file"}),
            "reg_weight": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 1e-3,
                                     "tooltip": "pull towards the pretrained weights: weight of ‖ΔW‖² (0.1, with "
                                                "the implicit CFG reward at 0.5 and lr 1e-3: the full mix chosen "
                                                "on the built-in model's validation captions)"}),
            "eta_min": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "lowest η drawn per sampler step (0: DDIM-like, deterministic "
                                             "re-noising)"}),
            "eta_max": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "η is drawn from [eta_min, eta_max] for every sampler step"}),
            "mode": (["r0", "r0+"], {"tooltip": "r0+: reward on x̂0 at a random step, earlier steps without grad "
                                                "(less memory)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 63 - 1,
                             "tooltip": "seeds the prompts' order, the noise and η; the same seed gives the same "
                                        "LoRA"}),
            "save_name": ("STRING", {"default": "r0_lora", "tooltip": "models/loras/<save_name>.safetensors"}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 256,
                                   "tooltip": "images generated and scored per step"}),
            "sampler_steps": ("INT", {"default": 4, "min": 1, "max": 50, "tooltip": "K, the generator's steps"}),
            "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                   "tooltip": "CFG inside the generator; 1 = off (one UNet call a step)"}),
            "width": size_input("width"),
            "height": size_input("height"),
        }, "optional": {
            "cfg_reward_weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.05,
                                            "tooltip": "weight of R0's implicit CFG reward: the pretrained model's "
                                                       "guidance direction, so the generator learns CFG and can "
                                                       "run at guidance 1; 0 = off (0.5: the full mix's)"}),
            "eta_per_image": ("BOOLEAN", {"default": False, "tooltip": "draw η per image as well as per step"}),
            "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9999, "step": 0.001,
                                    "tooltip": "save an exponential moving average of the LoRA; 0 = off"}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace models/loras/<save_name> even if "
                                                                   "another run (or no run) made it; off: such a "
                                                                   "run is saved under <save_name>_2, _3, ..."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run: a finished run is found on disk and reused, a stopped one resumes

    def train(self, pipeline, reward_model, prompts, steps, lr, lora_rank, reg_weight, eta_min, eta_max, mode, seed,
              save_name, batch_size, sampler_steps, guidance, width, height, cfg_reward_weight=0.0,
              eta_per_image=False, ema_decay=0.0, overwrite=False):
        config = R0Config(prompts=[p.strip() for p in prompts.splitlines() if p.strip()], iterations=steps, lr=lr,
                          lora_rank=lora_rank, reg_weight=reg_weight, eta_range=(eta_min, eta_max), mode=mode,
                          seed=seed, batch_size=batch_size, steps=sampler_steps, guidance=guidance,
                          width=native_size(width), height=native_size(height), cfg_reward_weight=cfg_reward_weight,
                          eta_per_image=eta_per_image, ema_decay=ema_decay)
        pipe = pipeline["pipe"].to(pipeline["device"])
        lora.use_loras(pipe, pipeline.get("loras", []))   # the graph's LoRAs, so the trainer can say it leaves them
        name, result = train_into("R0 Train", "r0", save_name, overwrite, lambda name, lora_path, out_dir, replace:
                                  train_r0(pipe, reward_model, config, out_dir, lora_path,
                                           bridge.cancellable_progress(steps), adapter=name, overwrite=replace))
        stop_if_cancelled("R0 Train", result, steps)
        return (with_lora(pipeline, name, 1.0), result.lora_path, read_png(result.curve_path))


class R0ApplyLoRA:
    DESCRIPTION = "Applies a LoRA from models/loras (one R0 trained, or any SD LoRA) to an R0 pipeline."
    CATEGORY = "R0"
    RETURN_TYPES = (PIPELINE,)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": (PIPELINE, {"tooltip": "the model from R0 Load Pipeline (with any LoRA from R0 Apply LoRA)"}),
            "lora_name": (bridge.list_files(LORAS), {"tooltip": "a .safetensors LoRA in models/loras"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                   "tooltip": "scale of the LoRA; 0 turns it off, negative inverts it"}),
        }}

    def apply(self, pipeline, lora_name, strength):
        if not isinstance(lora_name, str) or not lora_name.strip():
            raise ValueError(f"lora_name={lora_name!r}: choose a LoRA file from models/loras")
        path = bridge.resolve(LORAS, lora_name)
        adapter = re.sub(r"[^A-Za-z0-9_\-]", "_", os.path.splitext(os.path.basename(lora_name))[0]) or "lora"
        name = lora.load_lora(pipeline["pipe"], path, name=adapter)
        return (with_lora(pipeline, name, strength),)


# the optimisation's inputs, the same on both test-time refine nodes (this one and the native-MODEL one)
REFINE_SETTINGS = {
    "iterations": ("INT", {"default": 20, "min": 1, "max": 1000,
                           "tooltip": "optimisation steps on the start noise; the best iterate per image is returned"}),
    "lr": ("FLOAT", {"default": 5.0, "min": 1e-4, "max": 100.0, "step": 0.1,
                     "tooltip": "step size on the start noise (ReNO's default 5)"}),
}


class R0TestTimeRefine:
    DESCRIPTION = ("Test-time R0: optimizes the start noise of a few-step generation to raise the reward for one "
                   "prompt, with a regularizer that keeps the noise Gaussian. The weights do not change.")
    CATEGORY = "R0"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("refined", "initial")
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": (PIPELINE, {"tooltip": "the model from R0 Load Pipeline (with any LoRA from R0 Apply LoRA)"}),
            "reward_model": (REWARD, {"tooltip": "what the refinement raises: a scorer from Reward Loader or Reward "
                                                 "Combine"}),
            "prompt": ("STRING", {"multiline": True, "default": "a red circle above a blue square",
                                  "tooltip": "one prompt for every image of the batch"}),
            **REFINE_SETTINGS,
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 63 - 1,
                             "tooltip": "image i starts from the noise of seed + i, as R0 Few-Step Generate"}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 50, "tooltip": "sampler steps K"}),
            "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                   "tooltip": "classifier-free guidance of the sampler; 1 = off (one UNet call a "
                                              "step)"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "images refined at once; image i uses seed + i"}),
            "width": size_input("width"),
            "height": size_input("height"),
        }, "optional": {
            "cfg_reward_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.05,
                                            "tooltip": "weight of R0's implicit CFG reward (the model's own "
                                                       "guidance direction) beside the reward; 0 = off"}),
        }}

    def refine(self, pipeline, reward_model, prompt, iterations, lr, seed, steps, guidance, batch_size, width,
               height, cfg_reward_weight=0.0):
        pipe = pipeline["pipe"].to(pipeline["device"])
        lora.use_loras(pipe, pipeline.get("loras", []))
        result = refine_noise(pipe, reward_model, prompt.strip(), iterations=iterations, lr=lr, seed=seed,
                              steps=steps, guidance=guidance, batch_size=batch_size, height=native_size(height),
                              width=native_size(width),
                              cfg_reward_weight=cfg_reward_weight, callback=bridge.cancellable_progress(iterations))
        if result.cancelled:
            logger.info("[R0 Test-time Refine] cancelled; returning the best images reached")
        return (result.images.permute(0, 2, 3, 1).cpu().float(),
                result.initial_images.permute(0, 2, 3, 1).cpu().float())


NODE_CLASS_MAPPINGS = {
    "R0Train": R0Train,
    "R0ApplyLoRA": R0ApplyLoRA,
    "R0TestTimeRefine": R0TestTimeRefine,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "R0Train": "R0 Train (reward LoRA)",
    "R0ApplyLoRA": "R0 Apply LoRA",
    "R0TestTimeRefine": "R0 Test-time Refine",
}
