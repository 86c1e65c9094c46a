"""RPO Train on the MODEL, CLIP and VAE an artist already loaded with ComfyUI's own nodes.

As R0 Train (native MODEL) does (nodes/native_train.py): the LoRA is ComfyUI's own weight wrapper on a clone of the
MODEL, the run happens inside ComfyUI's CFGGuider, and the node hands rpo_core an RPOModel: the diffusion loss of
ComfyUI's denoiser (its own training target recovered from x̂0, r0_core.family.denoiser_diffusion_loss), the
K-step sampler on the given SIGMAS for the negatives and the validation images, the VAE's encode and decode, the
CLIP's encodings and the LoRA's weights. rpo_core.train.fit_rpo is the loop RPO Train runs.

ComfyUI is imported inside the functions. Node ids and the order of their inputs are a public API."""
from __future__ import annotations

import logging

import torch

from r0_core.family import conditional, denoiser_diffusion_loss
from r0_core.sampler import sample_r0, seeded_noise
from r0_core.schedule import flow_shift
from r0_core.train import check_target, make_accelerator, saved_name
from rpo_core.references import image_batch
from rpo_core.train import RPOConfig, RPOModel, check_references, default_prompts, fit_rpo, reference_hash

from . import bridge
from .native_train import (PRECISION, NativeModel, add_native_lora, in_sampler, native_fingerprint, prompt_encoder,
                           save_native_lora, training_precision)
from .train_nodes import check_sigmas, read_png, stop_if_cancelled, train_into

logger = logging.getLogger(__name__)

CHUNK = 8   # images a sampler call denoises at once (negatives, validation)


def prediction(sampling) -> str:
    """The MODEL's training target, from its model_sampling class: what its diffusion loss is measured on."""
    import comfy.model_sampling as ms

    if isinstance(sampling, ms.CONST):
        return "flow"
    if isinstance(sampling, ms.ModelSamplingDiscrete) and not isinstance(sampling, (ms.EDM, ms.X0)):
        return "v_prediction" if isinstance(sampling, ms.V_PREDICTION) else "epsilon"
    raise ValueError(f"this MODEL samples with {type(sampling).__name__}; RPO Train (native MODEL) trains "
                     f"discrete-schedule ε- and v-prediction models and flow models")


def timesteps_of(native: NativeModel):
    """timesteps(n, gen) as the family was trained: uniform over the VP levels (returned as their σ's index),
    logit-normal through the MODEL's shift for a flow MODEL (as t = σ · 1000)."""
    def draw(n, gen):
        if native.flow:
            return flow_shift(torch.sigmoid(torch.randn(n, generator=gen)), float(getattr(native.sampling, "shift",
                                                                                          1.0))) * 1000
        return torch.randint(len(native.sampling.sigmas), (n,), generator=gen)
    return draw


def native_rpo_model(native: NativeModel, vae, weights, shapes, encode, latent_shape, config: RPOConfig) -> RPOModel:
    kind = prediction(native.sampling)
    sampling = native.sampling

    def sigma_of(t):
        return (t.float() / 1000) if native.flow else sampling.sigmas.to(t.device)[t.long()].float()

    def loss(net, latents, c, noise, t):
        return denoiser_diffusion_loss(native.denoiser, latents, c, noise, sigma_of(t).to(latents.device), kind)

    def sample(prompts, seeds, steps, guidance):
        images, latents = [], []
        for i in range(0, len(prompts), CHUNK):
            part = slice(i, i + CHUNK)
            c = encode(prompts[part], False, native.device)
            noise = seeded_noise((len(seeds[part]), *latent_shape), seeds[part]).to(native.device)
            x = sample_r0(native.denoiser, native.start(noise), native.sigmas, {**c, "guidance": guidance},
                          disable=True, noise_scaling=native.noise_scaling)
            latents.append(x)
            images.append(native.decode(x).float())
        return torch.cat(images), torch.cat(latents)

    def encode_images(images):
        pixels = images.permute(0, 2, 3, 1).to(torch.float32)
        return native.base.process_latent_in(vae.encode(pixels).to(native.device)).float()

    return RPOModel(
        trainable=weights, net=None, loss=loss, frozen=weights.switched_off, timesteps=timesteps_of(native),
        sample=sample, encode=encode_images,
        conditioning=lambda texts: conditional(encode(texts, False, native.device)),
        save=lambda out_dir, path, cancelled, metadata: save_native_lora(weights, shapes, saved_name(path, cancelled),
                                                                        metadata))


def rpo_native(model, clip, vae, sigmas, latent: torch.Tensor, encoder, references: torch.Tensor, config: RPOConfig,
               out_dir: str, lora_path: str, overwrite: bool, callback):
    """One RPO run on a clone of `model`: (the clone with the trained LoRA applied, RPOResult)."""
    import comfy.model_management

    check_target(lora_path, out_dir, overwrite)
    patcher = model.clone()
    weights, shapes = add_native_lora(patcher, config, comfy.model_management.get_torch_device())
    texts = [*config.prompts, *config.validation_prompts, config.reference_prompt, f"a {config.class_name}"]
    encode = prompt_encoder(clip, texts, config.guidance)

    def work(native: NativeModel):
        rpo = native_rpo_model(native, vae, weights, shapes, encode, tuple(latent.shape[1:]), config)
        refs = references.to(native.device)
        fingerprint = native_fingerprint(config, native, weights, encoder,
                                         f"{tuple(latent.shape[1:])}{reference_hash(refs)}")
        accelerator = make_accelerator(config.mixed_precision, native.device)
        return fit_rpo(rpo, encoder, refs, config, accelerator, out_dir, lora_path, fingerprint, callback)

    result = in_sampler(patcher, clip, vae, sigmas, latent, config.reference_prompt, config.guidance, config.seed,
                        work)
    for p in weights.params:
        p.requires_grad_(False)
    return patcher, result


class RPOTrainNative:
    DESCRIPTION = ("RPO on ComfyUI's own MODEL, CLIP and VAE: fine-tunes a LoRA on a subject from a few reference "
                   "images (diffusion loss plus a λ-Harmonic preference loss; preference off is DreamBooth), "
                   "keeping the weights that score best in few-step λ_val validation on the given sigmas. Returns "
                   "the MODEL with the LoRA applied and saves it in models/loras in ComfyUI's format; Cancel keeps "
                   "the best so far; re-queueing resumes.")
    CATEGORY = "RPO"
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "lora_path", "curve")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        from .rpo_nodes import RPOTrain

        pipeline_inputs = RPOTrain.INPUT_TYPES()
        same = {k: v for k, v in pipeline_inputs["required"].items() if k not in ("pipeline", "sampler_steps")}
        same["lora_rank"] = ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "rank of the trained LoRA"})
        return {"required": {
            "model": ("MODEL", {"tooltip": "any MODEL from ComfyUI's loaders, with its LoRAs and patches"}),
            "clip": ("CLIP", {"tooltip": "the CLIP that encodes the prompts"}),
            "vae": ("VAE", {"tooltip": "encodes the references, decodes the negatives and validation images"}),
            "sigmas": ("SIGMAS", {"tooltip": "the few-step schedule of the negatives and validation, e.g. R0 "
                                             "Sigmas (4 steps)"}),
            "latent_image": ("LATENT", {"tooltip": "EmptyLatentImage: the training size (the references are "
                                                   "fitted to it)"}),
            **same,
        }, "optional": {
            **pipeline_inputs["optional"],
            "lora_targets": (["all", "attention"], {"tooltip": "all: every matrix and kernel (RPO's default); "
                                                               "attention: the attention blocks' matrices"}),
            PRECISION[0]: PRECISION[1],
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run: a finished run is found on disk and reused, a stopped one resumes

    def train(self, model, clip, vae, sigmas, latent_image, references, encoder, token, class_name, prompts, steps,
              lambda_val, beta, tau, lr, lora_rank, validate_every, seed, save_name, preference, guidance,
              overwrite=False, lora_targets="all", mixed_precision="auto"):
        import comfy.sample

        check_sigmas(sigmas)
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        tiny = getattr(model.model, "r0_world", None) is not None
        lines = lines or default_prompts(token.strip(), class_name.strip(), tiny=tiny)
        config = RPOConfig(token=token.strip(), class_name=class_name.strip(), prompts=lines, iterations=steps,
                           lambda_val=lambda_val, beta=beta, tau=tau, lr=lr, lora_rank=lora_rank,
                           lora_targets=lora_targets, validate_every=validate_every, seed=seed, preference=preference,
                           sampler_steps=len(sigmas) - 1, guidance=guidance,
                           mixed_precision=training_precision(mixed_precision))
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        side = latent.shape[-1] * vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else None
        refs = image_batch(references, side)
        check_references(refs, side)
        name, (patched, result) = train_into(
            "RPO Train (native MODEL)", "rpo_native", save_name, overwrite,
            lambda name, lora_path, out_dir, replace: rpo_native(
                model, clip, vae, sigmas, latent, encoder, refs, config, out_dir, lora_path, replace,
                bridge.cancellable_progress(steps)))
        stop_if_cancelled("RPO Train (native MODEL)", result, steps,
                          f"the best LoRA so far (step {result.best_iteration})")
        logger.info(f"[RPO Train (native MODEL)] best λ_val={lambda_val} validation {result.best_score:.4f} at step "
                    f"{result.best_iteration}; LoRA {result.lora_path}")
        return (patched, result.lora_path, read_png(result.curve_path))


NODE_CLASS_MAPPINGS = {"RPOTrainNative": RPOTrainNative}
NODE_DISPLAY_NAME_MAPPINGS = {"RPOTrainNative": "RPO Train (subject, native MODEL)"}
