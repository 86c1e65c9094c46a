"""Test-time R0: regularized reward maximization for one prompt at inference, over the start noise (ReNO-style).

The generator is frozen: the pipeline's UNet run through the few-step R0 sampler (`r0_core.generate`'s path),
then the VAE decoder. Only the start noise ε (standard normal scale, fp32) moves. Per image, each iteration
takes a step on

    L(ε) = −r(D(g(ε, c)), c) + λ (½‖ε‖² − (d − 1) log ‖ε‖)

where the regulariser is −log of the density of ‖ε‖ when ε ~ N(0, I_d) (a χ distribution with d degrees of
freedom, d the latent size): its minimum at ‖ε‖ = sqrt(d − 1) keeps the noise on the shell where Gaussian noise
lives, so the generator only sees inputs like those it was trained on. The reward's image gradient is
normalised per image (R0's normalisation, per reward for a WeightedReward), so lr, the clip and λ mean the same
whatever the reward's units. Gradients flow from the reward through the decoder and all K sampler steps into ε;
each UNet call is recomputed in the backward pass (gradient checkpointing), so memory does not grow with K.
The optimiser is ReNO's: SGD with Nesterov momentum 0.9, the gradient norm clipped per image, and the best
iterate (highest reward) kept per image.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import checks, memory
from .family import (backbone, conditioning, decode, denoiser, is_flow, latent_shape, noise_scaling, sampler_sigmas,
                     start_latents)
from .generate import checkpointed
from .rewards.base import RewardModel
from .rewards.composite import WeightedReward
from .rewards.implicit_cfg import ImplicitCFG
from .sampler import Cancelled, sample_r0, seeded_noise, seeded_noise_sampler

MOMENTUM = 0.9  # ReNO's SGD momentum (Nesterov)

# The built-in tiny world (32x32 images, d = 1024): the reward levels off after about 20 iterations at lr 5
TINY_WORLD = {"iterations": 20, "lr": 5.0}


@dataclass
class RefineResult:
    images: torch.Tensor           # [B, 3, H, W] in 0..1: the best iterate of each image
    latents: torch.Tensor          # [B, C, h, w] their latents, raw VAE space (unscaled), as `generate` returns
    initial_images: torch.Tensor   # [B, 3, H, W] iteration 0: the plain few-step images of the same seeds
    rewards: torch.Tensor          # [N + 1, B] reward of every iterate evaluated (row 0: the initial images)
    best_iteration: torch.Tensor   # [B] the row of `rewards` each returned image comes from
    noise: torch.Tensor            # [B, C, h, w] fp32 start noise (standard normal scale) of the returned images
    cancelled: bool = False        # the callback raised Cancelled: this is the best reached before the stop

    @property
    def initial_reward(self) -> torch.Tensor:
        return self.rewards[0]

    @property
    def best_reward(self) -> torch.Tensor:
        return self.rewards.gather(0, self.best_iteration[None]).squeeze(0)


def chi_shell_penalty(noise: torch.Tensor) -> torch.Tensor:
    """½‖ε‖² − (d − 1) log ‖ε‖ per image: −log p(‖ε‖) for Gaussian noise up to a constant, least at sqrt(d − 1)."""
    norm = noise.flatten(1).norm(dim=1)
    return 0.5 * norm ** 2 - (noise[0].numel() - 1) * norm.log()


@dataclass
class FrozenGenerator:
    """A frozen few-step generator as test-time R0 optimises through it, whoever built it: `frozen_generator`
    builds one from a diffusers pipeline; the ComfyUI node builds one from a native MODEL and VAE."""
    denoiser: Callable               # (x, sigma [B], **extra) -> x̂0 in the σ convention, differentiable in x
    extra: dict                      # keyword arguments of every denoiser call (conditioning, guidance)
    sigmas: torch.Tensor             # the sampler's schedule, ending at 0
    noise: torch.Tensor              # [B, C, h, w] fp32 standard-normal start noise: the leaf that moves
    decode: Callable                 # latents at σ = 0 -> images [B, 3, H, W] in 0..1, differentiable
    noise_sampler: Callable          # x -> sample_r0's ξ sampler; a fresh one per render draws the same ξ again
    start: Callable                  # start noise ε -> x at sigmas[0]
    noise_scaling: Callable          # (σ, ε, x0) -> x at level σ: vp_noise_scaling, flow_noise_scaling, a MODEL's
    eta: float = 0.0                 # the sampler's fresh-noise share
    dtype: torch.dtype = torch.float32   # of the latents the denoiser takes
    modules: Sequence[torch.nn.Module] = ()   # weights held frozen while refining (restored after)
    latent_scale: float = 1.0        # returned latents = sampled latents / latent_scale
    guided: Optional[Callable] = None   # (latents, it, normalize) -> the implicit CFG reward's surrogate


def refine_noise(pipe, reward: RewardModel, prompt: str | Sequence[str], *, iterations: int = 50,
                 lr: float = 5.0, seed: int = 0, steps: int = 4, eta: float = 0.0, guidance: float = 1.0,
                 batch_size: int = 1, height: Optional[int] = None, width: Optional[int] = None,
                 reg_weight: float = 0.01, grad_clip: Optional[float] = 0.1, normalize_gradients: bool = True,
                 cfg_reward_weight: float = 0.0, cfg_reward_t_range: tuple[float, float] = (0.02, 0.98),
                 callback: Optional[Callable[[dict], None]] = None) -> RefineResult:
    """Optimise the start noise of `batch_size` images (image i seeded `seed + i`, as `generate` seeds it) so
    the frozen few-step generator's images score higher under `reward`; returns the best iterate per image.

    Defaults are ReNO's (lr 5, 50 iterations, gradient-norm clip 0.1, regulariser weight 0.01); the tiny world
    needs fewer iterations (`TINY_WORLD`). Iteration 0 is exactly `generate(pipe, prompts, seeds=[seed + i])`.
    prompt: one prompt for every image, or one per image.
    cfg_reward_weight: > 0 adds R0's implicit CFG reward (r0_core.rewards.implicit_cfg): the pipeline's own
        guidance direction at a re-noising of the latents, one more normalised, weighted push (it has no value,
        so the best iterate is still chosen by `reward`).
    The other arguments are `refine`'s. Works inside torch.inference_mode() (as ComfyUI runs nodes).
    """
    prompts = _check(reward, prompt, iterations, lr, batch_size, reg_weight, grad_clip)
    checks.number("guidance", guidance)
    _check_trainable(("pipeline's backbone", backbone(pipe)), ("pipeline's VAE", pipe.vae))
    memory.images_per_chunk(pipe, batch_size, height, width, cfg=guidance != 1, training=True,
                            what="test-time refinement")
    cfg = ImplicitCFG(cfg_reward_weight, cfg_reward_t_range) if cfg_reward_weight else None
    with torch.inference_mode(False):
        generator = frozen_generator(pipe, prompts, seed=seed, steps=steps, eta=eta, guidance=guidance,
                                     height=height, width=width, cfg=cfg)
        return refine(generator, reward, prompts, iterations=iterations, lr=lr, reg_weight=reg_weight,
                      grad_clip=grad_clip, normalize_gradients=normalize_gradients, callback=callback)


def refine(generator: FrozenGenerator, reward: RewardModel, prompts: Sequence[str], *, iterations: int = 50,
           lr: float = 5.0, reg_weight: float = 0.01, grad_clip: Optional[float] = 0.1,
           normalize_gradients: bool = True, callback: Optional[Callable[[dict], None]] = None) -> RefineResult:
    """Test-time R0's loop over any frozen generator: one SGD step on the start noise per iteration.

    reward: any RewardModel, scoring the images against `prompts` (one per image). With normalize_gradients its
        image gradient is scaled to unit norm per image (a WeightedReward whose own `normalize_gradients` is set:
        each reward's, then weighted, its `r0_surrogate`); without, the raw gradient of the reward, as ReNO.
    callback({"i", "total", "reward", "best_reward", "images", "noise_norm"}) after each step, i = 0..total-1;
        raise r0_core.sampler.Cancelled there to stop: the best images reached so far come back with
        `cancelled=True` (any other exception propagates).
    The generator's weights are never changed.
    """
    prompts = _check(reward, list(prompts), iterations, lr, len(generator.noise), reg_weight, grad_clip)
    _check_trainable(("reward", reward))
    with torch.inference_mode(False), torch.enable_grad(), _frozen(*generator.modules, reward):
        noise = generator.noise.detach().float().clone().requires_grad_(True)
        objective = _objective(_renderer(generator), reward, prompts, normalize_gradients, reg_weight,
                               generator.guided)
        optimizer = torch.optim.SGD([noise], lr=lr, momentum=MOMENTUM, nesterov=True)
        history, best, cancelled = [], None, False
        for it in range(iterations + 1):                     # iterate 0 is the plain sample; N steps follow
            # 1. render ε through the sampler and decoder, score it (with the loss to step on, but at the end)
            images, latents, value, loss = objective(noise, it, differentiate=it < iterations)
            history.append(value)
            # 2. keep each image's best iterate; report step it - 1 done
            if best is None:
                best = _Best(images, latents, noise.detach().clone(), value)
            else:
                best.update(it, images, latents, noise.detach(), value)
                try:
                    if callback is not None:
                        callback({"i": it - 1, "total": iterations, "reward": value.tolist(),
                                  "best_reward": best.value.tolist(), "images": images,
                                  "noise_norm": noise.detach().flatten(1).norm(dim=1).tolist()})
                except Cancelled:
                    cancelled = True
                    break
            if loss is None:
                break
            # 3. ∇_ε L through decoder and all K steps, ‖∇‖ clipped per image (ReNO runs one image at a time)
            (grad,) = torch.autograd.grad(loss, noise)
            if grad_clip is not None:
                norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1))
                grad = grad * (grad_clip / (norm + 1e-6)).clamp(max=1.0)
            noise.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return RefineResult(images=best.images, latents=best.latents / generator.latent_scale,
                        initial_images=best.initial_images, rewards=torch.stack(history),
                        best_iteration=best.iteration, noise=best.noise, cancelled=cancelled)


# ----------------------------------------------------------------------------------------------- pieces

def _check(reward, prompt, iterations, lr, batch_size, reg_weight, grad_clip) -> list[str]:
    """Validate the arguments; returns one prompt per image."""
    if not isinstance(reward, RewardModel):
        raise ValueError(f"reward is a {type(reward).__name__}; expected an r0_core RewardModel "
                         f"(r0_core.rewards.load_reward, or a WeightedReward of several)")
    checks.whole("iterations", iterations, 0)   # 0 gives the plain sample
    checks.whole("batch_size", batch_size, 1)
    checks.number("lr", lr, 0, low_open=True)
    checks.number("reg_weight", reg_weight, 0)
    if grad_clip is not None:
        checks.number("grad_clip", grad_clip, 0, low_open=True)   # None: no clipping
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = prompts * batch_size if len(prompts) == 1 else prompts
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for batch_size={batch_size}; pass one, or one per image")
    return prompts


def _check_trainable(*named_modules) -> None:
    """Gradients must pass through every module: none may hold inference-mode weights."""
    for name, module in named_modules:
        if any(p.is_inference() for p in module.parameters()):
            raise ValueError(f"the {name} weights were created under torch.inference_mode, so no gradient can "
                             f"pass through them; load it outside inference mode (r0_core.loading.load_pipeline "
                             f"and r0_core.rewards.load_reward called by the R0 nodes do)")


@contextlib.contextmanager
def _frozen(*modules):
    """requires_grad off for every parameter of `modules` while inside, restored after (the pipeline may be
    shared with a trainer whose LoRA must stay trainable)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def frozen_generator(pipe, prompts, *, seed, steps, eta, guidance, height, width, cfg=None) -> FrozenGenerator:
    """`generate`'s few-step sampler and decoder for a diffusers pipeline, from the seeded start noise (image i:
    seed + i). The re-noising ξ (η > 0) comes from the same seeds at every render, so only ε moves. With `cfg`
    (an ImplicitCFG) the generator also carries the implicit CFG reward's surrogate."""
    with torch.no_grad():
        c = conditioning(pipe, prompts, guidance, height, width, with_uncond=cfg is not None)
    cond = c["cond"]
    seeds = [seed + i for i in range(len(prompts))]
    shape = latent_shape(pipe, len(prompts), height, width)
    model = denoiser(pipe)
    sigmas = sampler_sigmas(pipe, steps).to(cond.device)

    def guided(latents, it, normalize):
        gen = torch.Generator("cpu").manual_seed(seed * 1_000_003 + it)
        direction = cfg.direction(checkpointed(model), latents, c,
                                  None if is_flow(pipe) else pipe.scheduler.alphas_cumprod, gen)
        return cfg.surrogate(direction, latents, normalize)
    return FrozenGenerator(
        denoiser=model, extra={**c, "guidance": guidance}, sigmas=sigmas,
        noise=seeded_noise(shape, seeds, cond.device, torch.float32), decode=lambda latents: decode(pipe, latents),
        noise_sampler=lambda x: seeded_noise_sampler(x, seeds), noise_scaling=noise_scaling(pipe),
        start=lambda noise: start_latents(noise, sigmas, is_flow(pipe)), eta=eta, dtype=cond.dtype,
        modules=(backbone(pipe), pipe.vae), latent_scale=pipe.vae.config.scaling_factor,
        guided=guided if cfg is not None else None)


def _renderer(generator: FrozenGenerator) -> Callable:
    """render(noise) -> (images [B, 3, H, W] in 0..1, latents): the K sampler steps from the start noise, then
    the decoder, each call recomputed in the backward pass so memory does not grow with K."""
    model, decoder = checkpointed(generator.denoiser), checkpointed(generator.decode)

    def render(noise):
        x = generator.start(noise.to(generator.dtype))
        latents = sample_r0(model, x, generator.sigmas, generator.extra, disable=True, eta=generator.eta,
                            noise_sampler=generator.noise_sampler(x), noise_scaling=generator.noise_scaling)
        return decoder(latents), latents
    return render


def _objective(render, reward, prompts, normalize_gradients, reg_weight, guided=None):
    """objective(noise, it, differentiate) -> (images, scaled latents, reward [B] on the CPU, loss or None)."""
    if normalize_gradients:   # R0's normalised direction: per reward where a WeightedReward asks for it
        combined = isinstance(reward, WeightedReward) and reward.normalize_gradients
        surrogate_of = reward if combined else WeightedReward([reward])
        weights = torch.tensor(surrogate_of.weights, dtype=torch.float32)
    device = next(reward.parameters(), torch.empty(0)).device

    def objective(noise, it, differentiate):
        with torch.set_grad_enabled(differentiate):
            images, latents = render(noise)
            scored = images.to(device)
            if not differentiate:
                value, loss = reward(scored, prompts).detach().float().cpu(), None
            elif normalize_gradients:
                surrogate, scores = surrogate_of.r0_surrogate(scored, prompts)
                value = weights @ scores.float().cpu()
            else:
                value = reward(scored, prompts).float()
                surrogate = -value.sum()
            if differentiate:
                loss = surrogate.to(noise.device) + reg_weight * chi_shell_penalty(noise).sum()
                if guided is not None:
                    loss = loss + guided(latents, it, normalize_gradients).to(noise.device)
        return images.detach(), latents.detach(), value.detach().cpu(), loss
    return objective


class _Best:
    """The best iterate of each image so far: the highest reward, the earliest on ties."""

    def __init__(self, images, latents, noise, value):
        self.initial_images = images
        self.images, self.latents, self.noise, self.value = images, latents, noise, value
        self.iteration = torch.zeros(len(value), dtype=torch.long)

    def update(self, it, images, latents, noise, value):
        better = value > self.value

        def pick(new, old):
            return torch.where(better.to(old.device).view(-1, *[1] * (old.ndim - 1)), new, old)
        self.images, self.latents, self.noise = pick(images, self.images), pick(latents, self.latents), \
            pick(noise, self.noise)
        self.value = torch.where(better, value, self.value)
        self.iteration = torch.where(better, it, self.iteration)
