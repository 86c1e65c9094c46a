"""Test-time R0 on the MODEL, CONDITIONING and VAE an artist already loaded with ComfyUI's own nodes.

The node runs as SamplerCustom does (a CFGGuider over the MODEL, so its LoRAs, ControlNets and patches apply, and
ComfyUI's model management loads it), with a SAMPLER whose `sample` hands the core library what it needs: the
guided σ-convention denoiser ComfyUI gives every sampler, the MODEL's own noise scaling, and a differentiable VAE
decode. r0_core.test_time.refine then moves the start noise. Iteration 0 is what SamplerCustom with the R0 Sampler
and VAEDecode give for the same noise seed, sigmas and cfg.

ComfyUI loads weights inside torch.inference_mode, and gradients cannot pass through such tensors: while refining,
each inference-mode weight is swapped for an ordinary copy (the originals come back after; memory holds both).
ComfyUI is imported inside the functions. Node ids and the order of their inputs are a public API."""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from r0_core.test_time import FrozenGenerator, refine

from . import bridge
from .r0_nodes import renoise_sampler
from .reward_nodes import REWARD
from .train_nodes import REFINE_SETTINGS, check_sigmas

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def thawed(*modules: torch.nn.Module):
    """Inside, every parameter and buffer of `modules` created under torch.inference_mode is an ordinary, frozen
    copy (same values, device and dtype; no gradient of its own), so autograd can save it for the backward pass
    into the noise; after, the original tensors are back in place."""
    swapped = []
    try:
        with torch.inference_mode(False):
            for module in modules:
                for owner in module.modules():
                    for table in (owner._parameters, owner._buffers):
                        for name, value in table.items():
                            if value is not None and value.is_inference():
                                copy = value.clone()
                                table[name] = (torch.nn.Parameter(copy, requires_grad=False)
                                               if isinstance(value, torch.nn.Parameter) else copy)
                                swapped.append((table, name, value))
        yield
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value


def native_generator(denoiser, extra_args: dict, sigmas: torch.Tensor, noise: torch.Tensor, start, noise_scaling,
                     decode, *, eta: float, seed: Optional[int]) -> FrozenGenerator:
    """The FrozenGenerator of a ComfyUI sampler call: `denoiser(x, sigma, **extra_args)` is the guided x̂0 that
    ComfyUI hands its samplers, `start(ε)` and `noise_scaling` the MODEL's own, `decode` the VAE's."""
    return FrozenGenerator(denoiser=denoiser, extra=extra_args, sigmas=sigmas, noise=noise, decode=decode,
                           noise_sampler=renoise_sampler(seed), start=start, noise_scaling=noise_scaling, eta=eta,
                           dtype=noise.dtype, latent_scale=1.0)


def vae_decoder(vae, base):
    """latents (the MODEL's space) -> images [B, 3, H, W] in [0, 1], differentiable: VAEDecode's arithmetic
    without its no-grad tiling fallback."""
    def decode(latents):
        z = base.process_latent_out(latents).to(vae.vae_dtype).to(vae.device)
        return vae.process_output(vae.first_stage_model.decode(z).float())
    return decode


def refine_sampler(vae, reward, prompts: list[str], *, eta: float, iterations: int, lr: float, callback):
    """A ComfyUI SAMPLER that runs test-time R0 where a sampler would sample; `.result` holds the RefineResult."""
    import comfy.model_management
    import comfy.samplers

    class RefineSampler(comfy.samplers.Sampler):
        result = None

        def sample(self, model_wrap, sigmas, extra_args, callback_, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            base = model_wrap.inner_model            # ComfyUI's BaseModel: its model_sampling and latent format
            with torch.inference_mode(False):       # ComfyUI made these in inference mode; autograd saves them
                sigmas, latent_image = sigmas.clone(), latent_image.clone()
            sampling = base.model_sampling
            model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
            model_k.latent_image, model_k.noise = latent_image, noise
            max_denoise = self.max_denoise(model_wrap, sigmas)
            comfy.model_management.load_models_gpu([vae.patcher])

            generator = native_generator(
                model_k, {**extra_args, "denoise_mask": denoise_mask}, sigmas, noise,
                lambda eps: sampling.noise_scaling(sigmas[0], eps, latent_image, max_denoise),
                sampling.noise_scaling, vae_decoder(vae, base), eta=eta, seed=extra_args.get("seed"))
            with thawed(base, vae.first_stage_model):
                self.result = refine(generator, reward, prompts, iterations=iterations, lr=lr, callback=callback)
            return self.result.latents.to(noise)
    return RefineSampler()


class R0TestTimeRefineNative:
    DESCRIPTION = ("Test-time R0 on ComfyUI's own MODEL, conditioning and VAE: samples like SamplerCustom with the "
                   "R0 Sampler, then moves each image's start noise to raise the reward, keeping the best image. "
                   "The weights do not change.")
    CATEGORY = "R0"
    RETURN_TYPES = ("IMAGE", "IMAGE", "LATENT")
    RETURN_NAMES = ("refined", "initial", "refined_latent")
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "any MODEL from ComfyUI's loaders, with its LoRAs and patches"}),
            "positive": ("CONDITIONING", {"tooltip": "the prompt's conditioning (CLIPTextEncode)"}),
            "negative": ("CONDITIONING", {"tooltip": "the negative conditioning; unused at cfg 1"}),
            "vae": ("VAE", {"tooltip": "the VAE whose decode the reward sees"}),
            "sigmas": ("SIGMAS", {"tooltip": "the schedule, e.g. R0 Sigmas (4 steps) or BasicScheduler"}),
            "latent_image": ("LATENT", {"tooltip": "EmptyLatentImage: its size and batch"}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 64 - 1,
                                   "tooltip": "the start noise, as SamplerCustom draws it"}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                              "tooltip": "classifier-free guidance; 1 = one model call a step"}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                              "tooltip": "the R0 Sampler's fresh noise share when re-noising"}),
            "reward_model": (REWARD, {"tooltip": "what the refinement raises: Reward Loader or Reward Combine"}),
            "prompt": ("STRING", {"multiline": True, "default": "a red circle above a blue square",
                                  "tooltip": "the text the reward scores the images against (the positive prompt)"}),
            **REFINE_SETTINGS,
        }}

    def refine(self, model, positive, negative, vae, sigmas, latent_image, noise_seed, cfg, eta, reward_model,
               prompt, iterations, lr):
        import comfy.sample
        import comfy.samplers

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt={prompt!r}: the reward needs the text to score the images against; give the "
                             f"positive prompt")
        check_sigmas(sigmas)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, noise_seed, latent_image.get("batch_index"))
        sampler = refine_sampler(vae, reward_model, [prompt.strip()] * len(latent), eta=eta, iterations=iterations,
                                 lr=lr, callback=bridge.cancellable_progress(iterations))
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        samples = guider.sample(noise, latent, sampler, sigmas, seed=noise_seed)
        result = sampler.result
        if result.cancelled:
            logger.info("[R0 Test-time Refine (native)] cancelled; returning the best images reached")
        images = lambda x: x.permute(0, 2, 3, 1).cpu().float()   # noqa: E731  ComfyUI's IMAGE is [B, H, W, 3]
        return images(result.images), images(result.initial_images), {**latent_image, "samples": samples.cpu()}


NODE_CLASS_MAPPINGS = {"R0TestTimeRefineNative": R0TestTimeRefineNative}
NODE_DISPLAY_NAME_MAPPINGS = {"R0TestTimeRefineNative": "R0 Test-time Refine (native MODEL)"}
