"""R0 Train on the MODEL, CLIP and VAE an artist already loaded with ComfyUI's own nodes.

The LoRA is ComfyUI's own kind: a weight wrapper per adapted layer (`ModelPatcher.add_weight_wrapper`, as
ComfyUI's Train LoRA node does), so the MODEL's other LoRAs and patches stay applied and ComfyUI's model
management loads, moves and frees it. The run happens where a sampler would sample (a CFGGuider over the MODEL
with a SAMPLER whose `sample` trains), and the node hands r0_core what it needs: the guided σ-convention denoiser
(ComfyUI's sampling_function, for any prompts in the batch), the CLIP's encodings, a differentiable VAE decode,
the MODEL's noise scaling and the LoRA's weights (r0_core.train.LowRankWeights); r0_core.train.fit_r0 is the
same loop the pipeline trainer runs. The file is written in ComfyUI's key format
(`diffusion_model.<layer>.lora_up.weight`, `.lora_down.weight`, `.alpha`), which LoraLoader reads.

ComfyUI is imported inside the functions. Node ids and the order of their inputs are a public API."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import torch

from r0_core.files import atomic_write
from r0_core.train import (LowRankWeights, R0Config, R0Generator, check_target, fit_r0, make_accelerator,
                           resolve_precision, run_fingerprint, saved_name)

from . import bridge
from .native_refine import thawed, vae_decoder
from .train_nodes import check_sigmas, read_png, stop_if_cancelled, train_into

TARGETS = ("attention", "all")
PRECISION = ("mixed_precision", (["auto", "no", "bf16"], {
    "default": "auto", "tooltip": "autocast of the training computation: auto = bf16 on a CUDA GPU that has it, "
                                  "else none (the MODEL's own dtype); the LoRA's own weights stay fp32"}))


def training_precision(choice: str) -> str:
    """The trainers' one "auto" rule (r0_core.train.resolve_precision) on ComfyUI's torch device."""
    import comfy.model_management

    return resolve_precision(choice, comfy.model_management.get_torch_device().type)


def adapted_layers(model: torch.nn.Module, targets: str) -> dict[str, torch.nn.Module]:
    """The diffusion model's layers the LoRA adapts, by their name in ComfyUI's BaseModel: "attention", every
    matrix layer inside an attention block (a UNet's to_q/to_k/to_v/to_out, an MMDiT's qkv/proj); "all", every
    layer with a matrix or kernel (norms and biases take none)."""
    if targets not in TARGETS:
        raise ValueError(f"lora_targets={targets!r}; expected one of {', '.join(TARGETS)}")
    layers = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not name.startswith("diffusion_model.") or not hasattr(module, "weight_function") \
                or weight is None or weight.ndim < 2:
            continue
        if targets == "all" or (weight.ndim == 2 and "attn" in name):
            layers[name] = module
    return layers


class SwitchedLoRA(torch.nn.Module):
    """A ComfyUI weight wrapper: W -> W + scale · up·down while the LowRankWeights it belongs to is on."""

    def __init__(self, weights: LowRankWeights, name: str, shape: torch.Size):
        super().__init__()
        self.weights, self.name, self.shape = weights, name, tuple(shape)
        up, down = weights.pairs[name]
        self.up, self.down = up, down    # registered, so ModelPatcher's move_to moves them with the model

    def forward(self, weight: torch.Tensor) -> torch.Tensor:   # ComfyUI calls it as f(weight)
        if not self.weights.on:
            return weight
        return (weight + self.weights.delta(self.name).reshape(self.shape).to(weight)).to(weight.dtype)

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


def add_native_lora(patcher, config: R0Config, device) -> tuple[LowRankWeights, dict[str, tuple]]:
    """A rank-r LoRA on `patcher` (a clone of the MODEL) as weight wrappers: down ~ N(0, 1/r²) seeded by
    config.seed, up = 0 (so the MODEL starts unchanged), scale alpha / r = 1 as the pipeline trainer's."""
    layers = adapted_layers(patcher.model, config.lora_targets)
    if not layers:
        raise ValueError(f"lora_targets={config.lora_targets!r} matches no layer of this MODEL; try 'all'")
    gen = torch.Generator("cpu").manual_seed(config.seed)
    rank, pairs, shapes = config.lora_rank, {}, {}
    with torch.inference_mode(False):
        for name, module in layers.items():
            shape = module.weight.shape
            down = torch.randn(rank, shape[1:].numel(), generator=gen) / rank
            pairs[name] = (torch.nn.Parameter(torch.zeros(shape[0], rank, device=device)),
                           torch.nn.Parameter(down.to(device)))
            shapes[name] = shape
        weights = LowRankWeights(pairs, scale=1.0)
        for name, shape in shapes.items():
            patcher.add_weight_wrapper(f"{name}.weight", SwitchedLoRA(weights, name, shape))
    return weights, shapes


def save_native_lora(weights: LowRankWeights, shapes: dict, path: str, metadata: dict) -> str:
    """The LoRA in ComfyUI's key format, atomically: per layer lora_up [out, r(, 1, 1)], lora_down
    [r, in(, k, k)] in float32 and alpha = r · scale."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (up, down) in weights.pairs.items():
        shape, rank = shapes[name], up.shape[1]
        tensors[f"{name}.lora_up.weight"] = up.detach().float().cpu().reshape(shape[0], rank, *[1] * (len(shape) - 2))
        tensors[f"{name}.lora_down.weight"] = down.detach().float().cpu().reshape(rank, *shape[1:]).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank * weights.scale))
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.update(r0_lora_format="comfyui", r0_lora_rank=str(next(iter(weights.pairs.values()))[0].shape[1]),
                r0_lora_modules=str(len(weights.pairs)))
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def prompt_encoder(clip, prompts: list[str], guidance: float):
    """encode(prompts, with_uncond) over the CLIP's encodings of the training prompts and of "" (made once):
    the cross-attention tokens as `cond`, a pooled embedding (SDXL, SD3, Flux) as added_cond["pooled_output"]."""
    table = {}
    for text in dict.fromkeys([*prompts, ""]):
        cond, extra = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]
        with torch.inference_mode(False):   # ordinary tensors: autograd may keep them for the backward pass
            pooled = extra.get("pooled_output")
            table[text] = (cond.clone(), None if pooled is None else pooled.clone())
    lengths = {text: row[0].shape[1] for text, row in table.items()}
    if len(set(lengths.values())) > 1:
        longest = max(lengths, key=lengths.get)
        raise ValueError(f"prompts: {longest!r} encodes to {lengths[longest]} tokens and others to "
                         f"{min(lengths.values())}; the trainer batches prompts of one length: keep each prompt "
                         f"within one 75-token chunk")

    def rows(texts, device):
        cond = torch.cat([table[t][0] for t in texts]).to(device, torch.float32)
        pooled = [table[t][1] for t in texts]
        return cond, None if pooled[0] is None else {"pooled_output": torch.cat(pooled).to(device, torch.float32)}

    def encode(texts, with_uncond, device):
        cond, added = rows(texts, device)
        c = {"cond": cond, "uncond": None, "added_cond": added}
        if guidance != 1.0 or with_uncond:
            c["uncond"], c["uncond_added_cond"] = rows([""] * len(texts), device)
        return c
    return encode


def native_denoiser(base_model, model_options: dict, seed):
    """The guided x̂0 of ComfyUI's sampling_function for per-image conditioning: each call turns the batch's
    rows into ComfyUI conds (the model's extra_conds, e.g. SDXL's size embedding) and lets ComfyUI batch them."""
    import comfy.sampler_helpers
    import comfy.samplers

    def conds(cross_attn, added, x, kind):
        cond = comfy.sampler_helpers.convert_cond([[cross_attn, dict(added or {})]])
        return comfy.samplers.encode_model_conds(base_model.extra_conds, cond, x, x.device, kind)

    def model(x, sigma, cond, uncond=None, added_cond=None, uncond_added_cond=None, guidance=1.0):
        # at guidance 1 ComfyUI asks no unconditional prediction (the implicit CFG reward joins it into `cond`)
        negative = conds(uncond, uncond_added_cond, x, "negative") if guidance != 1.0 else None
        return comfy.samplers.sampling_function(base_model, x, sigma, negative, conds(cond, added_cond, x, "positive"),
                                                guidance, model_options, seed=seed)
    return model


@dataclass
class NativeModel:
    """What a trainer gets from ComfyUI inside a sampler call (`in_sampler`)."""
    base: object                  # ComfyUI's BaseModel, loaded, with the MODEL's other LoRAs patched in
    denoiser: Callable            # native_denoiser: the guided x̂0 for per-image conditioning
    decode: Callable              # latents -> images [B, 3, H, W] in 0..1, differentiable
    sigmas: torch.Tensor          # the SIGMAS given to the node
    start: Callable               # ε -> the start latents at sigmas[0], as ComfyUI's samplers start
    noise_scaling: Callable       # (σ, ε, x0) -> x at level σ, the MODEL's own
    sampling: object              # the MODEL's model_sampling
    flow: bool                    # a rectified-flow MODEL (ComfyUI's CONST sampling)
    device: torch.device


def in_sampler(patcher, clip, vae, sigmas, latent: torch.Tensor, prompt: str, guidance: float, seed: int, work):
    """work(NativeModel) run where a sampler would sample: inside ComfyUI's CFGGuider over `patcher`, so ComfyUI's
    model management loads it (fully: it trains) with its patches, and with every inference-mode weight of the
    MODEL and VAE swapped for an ordinary copy (thawed). Returns what work returns."""
    import comfy.model_management
    import comfy.model_sampling
    import comfy.samplers

    class HostSampler(comfy.samplers.Sampler):
        result = None

        def sample(self, model_wrap, sigmas, extra_args, callback_, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            base = model_wrap.inner_model
            sampling = base.model_sampling
            with torch.inference_mode(False):
                sigmas = sigmas.clone().float().to(noise.device)
            max_denoise = self.max_denoise(model_wrap, sigmas)
            comfy.model_management.load_models_gpu([vae.patcher])
            native = NativeModel(
                base=base, denoiser=native_denoiser(base, model_wrap.model_options, extra_args.get("seed")),
                decode=vae_decoder(vae, base), sigmas=sigmas,
                start=lambda eps: sampling.noise_scaling(sigmas[0], eps, torch.zeros_like(eps), max_denoise),
                noise_scaling=lambda sigma, eps, x0: sampling.noise_scaling(sigma, eps, x0), sampling=sampling,
                flow=isinstance(sampling, comfy.model_sampling.CONST), device=noise.device)
            with thawed(base, vae.first_stage_model), torch.inference_mode(False), torch.enable_grad():
                self.result = work(native)
            return torch.zeros_like(noise)

    sampler = HostSampler()
    guider = comfy.samplers.CFGGuider(patcher)   # its conds load the MODEL; every batch brings its own prompts'
    guider.set_conds(*(clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in (prompt, "")))
    guider.set_cfg(guidance)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    empty = torch.zeros(1, *latent.shape[1:])
    guider.sample(empty, empty, sampler, sigmas, seed=seed)
    return sampler.result


def native_fingerprint(config, native: NativeModel, weights: LowRankWeights, scorer, extra: str = "") -> str:
    """What names a native run: the settings, the MODEL as loaded (its other LoRAs patched in), the scorer, the
    schedule and the adapted layers (and `extra`, e.g. the references)."""
    return run_fingerprint(config, native.base.diffusion_model, scorer, extra=hashlib.sha256(
        f"{native.sigmas.tolist()}{sorted(weights.pairs)}{extra}".encode()).hexdigest())


def train_native(model, clip, vae, sigmas, latent: torch.Tensor, reward, config: R0Config, out_dir: str,
                 lora_path: str, overwrite: bool, callback):
    """One R0 run on a clone of `model`: (the clone with the trained LoRA applied, TrainResult)."""
    import comfy.model_management

    check_target(lora_path, out_dir, overwrite)
    patcher = model.clone()
    weights, shapes = add_native_lora(patcher, config, comfy.model_management.get_torch_device())
    encode = prompt_encoder(clip, config.prompts, config.guidance)

    def work(native: NativeModel):
        generator = R0Generator(
            trainable=weights, denoiser=native.denoiser, base=native.denoiser if config.cfg_reward_weight else None,
            encode=lambda prompts, with_uncond: encode(prompts, with_uncond, native.device), decode=native.decode,
            sigmas=native.sigmas, latent_shape=(config.batch_size, *latent.shape[1:]), start=native.start,
            noise_scaling=native.noise_scaling,
            alphas_cumprod=None if native.flow else 1 / (1 + native.sampling.sigmas.detach().double() ** 2),
            save=lambda out_dir_, path, cancelled, metadata: save_native_lora(weights, shapes,
                                                                             saved_name(path, cancelled), metadata))
        accelerator = make_accelerator(config.mixed_precision, native.device)
        return fit_r0(generator, reward, config, accelerator, out_dir, lora_path,
                      native_fingerprint(config, native, weights, reward, str(tuple(latent.shape[1:]))), callback)

    result = in_sampler(patcher, clip, vae, sigmas, latent, config.prompts[0], config.guidance, config.seed, work)
    for p in weights.params:
        p.requires_grad_(False)
    return patcher, result


class R0TrainNative:
    DESCRIPTION = ("R0 on ComfyUI's own MODEL, CLIP and VAE: trains a LoRA that makes the MODEL a better few-step "
                   "generator for the given sigmas by maximizing a reward, from prompts alone. Returns the MODEL "
                   "with the LoRA applied and saves it in models/loras in ComfyUI's format (LoraLoader reads it); "
                   "Cancel keeps a partial LoRA; re-queueing the same settings resumes or reuses the saved run.")
    CATEGORY = "R0/training"
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "lora_path", "curve")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        from .train_nodes import R0Train

        pipeline_inputs = R0Train.INPUT_TYPES()
        same = {k: v for k, v in pipeline_inputs["required"].items()
                if k in ("reward_model", "prompts", "steps", "lr", "lora_rank", "reg_weight", "eta_min", "eta_max",
                         "mode", "seed", "save_name", "batch_size", "guidance")}
        return {"required": {
            "model": ("MODEL", {"tooltip": "any MODEL from ComfyUI's loaders, with its LoRAs and patches"}),
            "clip": ("CLIP", {"tooltip": "the CLIP that encodes the training prompts"}),
            "vae": ("VAE", {"tooltip": "the VAE whose decode the reward sees"}),
            "sigmas": ("SIGMAS", {"tooltip": "the generator's schedule, e.g. R0 Sigmas (4 steps): sample with the "
                                             "same sigmas afterwards"}),
            "latent_image": ("LATENT", {"tooltip": "EmptyLatentImage: the training image size (its batch is "
                                                   "unused; batch_size sets it)"}),
            **same,
        }, "optional": {
            **{k: v for k, v in pipeline_inputs["optional"].items()
               if k in ("cfg_reward_weight", "eta_per_image", "ema_decay", "overwrite")},
            "lora_targets": (list(TARGETS), {"tooltip": "attention: the attention blocks' matrices; all: every "
                                                        "matrix and kernel (a bigger file)"}),
            PRECISION[0]: PRECISION[1],
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run: a finished run is found on disk and reused, a stopped one resumes

    def train(self, model, clip, vae, sigmas, latent_image, reward_model, prompts, steps, lr, lora_rank, reg_weight,
              eta_min, eta_max, mode, seed, save_name, batch_size, guidance, cfg_reward_weight=0.0,
              eta_per_image=False, ema_decay=0.0, overwrite=False, lora_targets="attention", mixed_precision="auto"):
        import comfy.sample

        check_sigmas(sigmas)
        config = R0Config(prompts=[p.strip() for p in prompts.splitlines() if p.strip()], iterations=steps, lr=lr,
                          lora_rank=lora_rank, lora_targets=lora_targets, reg_weight=reg_weight,
                          eta_range=(eta_min, eta_max), mode=mode, seed=seed, batch_size=batch_size,
                          steps=len(sigmas) - 1, guidance=guidance, cfg_reward_weight=cfg_reward_weight,
                          eta_per_image=eta_per_image, ema_decay=ema_decay,
                          mixed_precision=training_precision(mixed_precision))
        if reward_model is None and not cfg_reward_weight:
            raise ValueError("reward_model is empty and cfg_reward_weight is 0: nothing to maximise; connect a "
                             "Reward Loader (or Reward Combine), or set cfg_reward_weight > 0")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        name, (patched, result) = train_into(
            "R0 Train (native MODEL)", "r0_native", save_name, overwrite,
            lambda name, lora_path, out_dir, replace: train_native(
                model, clip, vae, sigmas, latent, reward_model, config, out_dir, lora_path, replace,
                bridge.cancellable_progress(steps)))
        stop_if_cancelled("R0 Train (native MODEL)", result, steps)
        return (patched, result.lora_path, read_png(result.curve_path))


NODE_CLASS_MAPPINGS = {"R0TrainNative": R0TrainNative}
NODE_DISPLAY_NAME_MAPPINGS = {"R0TrainNative": "R0 Train (native MODEL)"}
