"""R0 generation nodes: load a pipeline, generate in a few steps, and a native SAMPLER + SIGMAS pair for
ComfyUI's SamplerCustom. Node ids and the order of their inputs are a public API: append, never reorder."""
from __future__ import annotations

from typing import Optional

import torch

from r0_core import lora
from r0_core.generate import generate
from r0_core import family
from r0_core.caching import ModelCache
from r0_core.loading import TINY_NAMES, load_pipeline
from r0_core.sampler import sample_r0, vp_noise_scaling
from r0_core.schedule import r0_sigmas

from . import bridge

PIPELINE = "R0_PIPELINE"
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (path, dtype, device, config folder) -> loaded pipeline, kept between runs: at most R0_MAX_PIPELINES (default 2),
# the least recently used dropped first (the pack's pipelines live outside ComfyUI's model management)
_CACHE = ModelCache("R0_MAX_PIPELINES", 2, on_drop=bridge.free_memory)


def model_choices() -> list[str]:
    folders = bridge.list_model_folders("diffusers", "model_index.json")
    return (list(TINY_NAMES) + [f"diffusers/{name}" for name in folders]
            + [f"checkpoints/{name}" for name in bridge.list_files("checkpoints")])


def resolve_model(choice: str) -> str:
    if choice in TINY_NAMES:
        return choice
    folder, _, name = choice.partition("/")
    if folder not in ("diffusers", "checkpoints") or not name:
        raise ValueError(f"model {choice!r}: expected one of {', '.join(TINY_NAMES)}, 'diffusers/<folder>' or "
                         f"'checkpoints/<file>'")
    return bridge.resolve(folder, name)


NO_CONFIG = "(none)"


def get_pipeline(choice: str, dtype: str = "auto", device: str = "auto", config_folder: str = NO_CONFIG) -> dict:
    """A cached pipeline (loaded once per path, dtype, device and config folder), as the R0_PIPELINE value."""
    path = resolve_model(choice)
    config_dir = None if config_folder == NO_CONFIG else bridge.resolve("diffusers", config_folder)
    key = (path, dtype, device, config_dir)

    def load():
        # load outside inference mode: the cached modules must stay trainable for the R0 and RPO trainers
        with torch.inference_mode(False):
            pipe = load_pipeline(path, device=None if device == "auto" else device, dtype=DTYPES[dtype],
                                 tokenizer_dir=bridge.sd_tokenizer_dir(), config_dir=config_dir)
        pipe.set_progress_bar_config(disable=True)
        return {"pipe": pipe, "path": path, "device": family.backbone(pipe).device, "loras": []}
    return _CACHE.get_or_load(key, load)


def size_input(side: str) -> tuple:
    """A width or height widget whose default, 0, is the model's own size (32 px for the tiny model, 512 for
    SD 1.5): a fixed 512 is slow and meaningless on the tiny model."""
    return ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                    "tooltip": f"image {side} in pixels, a multiple of 8; 0: the model's own size (32 for the tiny "
                               f"model, 512 for SD 1.5)"})


def native_size(value: int):
    """0 (the widget's 'model size') -> None, which the cores read as the model's own size."""
    return value or None


class R0LoadPipeline:
    DESCRIPTION = "Loads a Stable Diffusion pipeline (or the built-in tiny model) for R0 generation."
    CATEGORY = "R0"
    RETURN_TYPES = (PIPELINE,)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (model_choices(), {"tooltip": "tiny (the built-in world; tiny-sdxl and tiny-sd3 draw it with "
                                                   "those architectures), a diffusers folder in models/diffusers, "
                                                   "or a single-file checkpoint in models/checkpoints"}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: fp32 on CPU, bf16/fp16 on GPU"}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto",
                                                 "tooltip": "auto: the GPU if there is one, else the CPU"}),
        }, "optional": {
            "config_folder": ([NO_CONFIG] + bridge.list_model_folders("diffusers", "model_index.json"),
                              {"default": NO_CONFIG,
                               "tooltip": "for an SD3 single file (or an SDXL one not of SDXL base's size): a "
                                          "diffusers folder in models/diffusers of the same family whose configs "
                                          "describe it; its weights are not read"}),
        }}

    def load(self, model, dtype, device, config_folder=NO_CONFIG):
        return (get_pipeline(model, dtype, device, config_folder),)


class R0FewStepGenerate:
    DESCRIPTION = ("Generates images in a few steps with the R0 sampler: predict x̂0, then re-noise with η "
                   "(0 = DDIM, 1 = LCM-style).")
    CATEGORY = "R0"
    RETURN_TYPES = ("IMAGE", "LATENT")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": (PIPELINE, {"tooltip": "the model from R0 Load Pipeline (with any LoRA from R0 Apply LoRA)"}),
            "prompt": ("STRING", {"multiline": True, "default": "a red circle left of a blue square",
                                  "tooltip": "one prompt for the whole batch"}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 100, "tooltip": "sampler steps K"}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                              "tooltip": "fresh noise share when re-noising: 0 DDIM, 1 LCM-style"}),
            "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                   "tooltip": "classifier-free guidance; 1 turns it off (one UNet call a step)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 63 - 1, "tooltip": "image i uses seed + i"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "images made at once; image i uses seed + i"}),
            "width": size_input("width"),
            "height": size_input("height"),
            "offload": ("BOOLEAN", {"default": False, "tooltip": "move the pipeline to the CPU afterwards"}),
        }}

    def generate(self, pipeline, prompt, steps, eta, guidance, seed, batch_size, width, height, offload):
        pipe = pipeline["pipe"].to(pipeline["device"])
        lora.use_loras(pipe, pipeline.get("loras", []))  # one cached pipeline serves every branch of the graph
        images, latents = generate(pipe, [prompt] * batch_size, steps=steps, eta=eta, guidance=guidance,
                                   seeds=[seed + i for i in range(batch_size)], height=native_size(height),
                                   width=native_size(width),
                                   callback=bridge.progress_callback(steps))
        if offload:
            pipe.to("cpu")
        return (images.permute(0, 2, 3, 1).cpu().float(), {"samples": latents.cpu().float()})


def native_noise_scaling(model):
    """The MODEL's own `noise_scaling` (x0 + σ ε for ε/v models, (1 - σ) x0 + σ ε for flow models), found where
    ComfyUI's lcm sampler finds it; a bare σ-convention denoiser has none and is VP."""
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    return patcher.get_model_object("model_sampling").noise_scaling if patcher is not None else vp_noise_scaling


def renoise_sampler(seed):
    """x -> sample_r0's ξ sampler, the R0 Sampler node's rule: one CPU generator seeded with the prompt's seed
    (None: unseeded), so a run repeats; a fresh one re-noises with the same ξ again."""
    def make(x):
        generator = torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None
        return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator).to(x)
    return make


def comfy_sample_r0(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0):
    """sample_r0 as ComfyUI's KSAMPLER calls it, re-noising through the model's own noise scaling; fresh noise
    comes from the prompt's seed, so a run repeats."""
    noise = renoise_sampler((extra_args or {}).get("seed"))(x)
    return sample_r0(model, x, sigmas, extra_args, callback, disable, eta=eta, noise_sampler=noise,
                     noise_scaling=native_noise_scaling(model))


class R0Sampler:
    DESCRIPTION = "The R0 few-step sampler as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."
    CATEGORY = "R0"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                               "tooltip": "fresh noise share when re-noising: 0 DDIM, 1 LCM-style"})}}

    def get_sampler(self, eta):
        import comfy.samplers  # built lazily: the function above is what tests exercise
        return (comfy.samplers.KSAMPLER(comfy_sample_r0, extra_options={"eta": eta}),)


def parse_timesteps(text: str) -> Optional[list[int]]:
    """'999, 749, 499, 249' -> [999, 749, 499, 249]; empty -> None (uniform)."""
    if not text.strip():
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"timesteps={text!r}; expected comma-separated integers such as 999,749,499,249")


class R0Sigmas:
    DESCRIPTION = ("SIGMAS for the R0 sampler: K uniform timesteps from the last, or an explicit list, then 0; on a "
                   "flow MODEL (SD3, Flux) K steps as the pipelines' flow scheduler spaces them.")
    CATEGORY = "R0"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the native MODEL whose noise schedule the sigmas follow"}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 1000,
                              "tooltip": "sampler steps K (ignored when timesteps is set)"}),
            "timesteps": ("STRING", {"default": "", "tooltip": "optional, e.g. 999,749,499,249; overrides steps"}),
        }}

    def get_sigmas(self, model, steps, timesteps):
        import comfy.model_sampling

        sampling = model.get_model_object("model_sampling")
        explicit = parse_timesteps(timesteps)
        if isinstance(sampling, comfy.model_sampling.CONST) and explicit is None:
            return (flow_model_sigmas(sampling, steps),)
        return (r0_sigmas(sampling.sigmas, steps, explicit),)


def flow_model_sigmas(sampling, steps: int) -> torch.Tensor:
    """K levels of a flow MODEL as diffusers' FlowMatchEulerDiscreteScheduler spaces them (r0_core's
    flow_sigmas, the pipelines' schedule): timesteps evenly spaced between those of its largest and smallest σ,
    each taken through the MODEL's own shift (sampling.sigma: SD3's, Flux's), then 0."""
    ends = sampling.timestep(torch.stack([sampling.sigma_max, sampling.sigma_min]).double())
    sigmas = sampling.sigma(torch.linspace(float(ends[0]), float(ends[1]), steps, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


NODE_CLASS_MAPPINGS = {
    "R0LoadPipeline": R0LoadPipeline,
    "R0FewStepGenerate": R0FewStepGenerate,
    "R0Sampler": R0Sampler,
    "R0Sigmas": R0Sigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "R0LoadPipeline": "R0 Load Pipeline",
    "R0FewStepGenerate": "R0 Few-Step Generate",
    "R0Sampler": "R0 Sampler",
    "R0Sigmas": "R0 Sigmas",
}
