"""The checks every family's tests run: the R0 sampler at η = 0, through r0_core.family, equals the family's own
diffusers pipeline (DDIM for the UNet families, FlowMatchEuler for SD3) on the same start noise; and the family's
shipped tiny model draws the world."""
import numpy as np
import torch

from r0_core.family import (conditioning, denoiser, is_flow, noise_scaling, prompt_options, sampler_sigmas,
                             start_latents)
from r0_core.sampler import sample_r0

PROMPTS = ["a red circle on the left", "a blue square above a yellow triangle"]


def check_eta_0_is_diffusers(pipe, guidance: float, latent_side: int, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both 4-step samples from the same noise [2, 4, latent_side, latent_side], the pipeline told `pixels` as its
    size; asserts they agree to 1e-4 and returns (diffusers' sample, the noise), for the caller's other checks."""
    z = torch.randn(len(PROMPTS), 4, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    scheduler = pipe.scheduler
    if not is_flow(pipe):   # DDIM's last step then lands on σ = 0, as the R0 sampler's does (test_sampler covers ᾱ_0)
        from diffusers import DDIMScheduler
        pipe.scheduler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True)
    try:
        theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, latents=z.clone(), height=pixels,
                      width=pixels, output_type="latent", **prompt_options(pipe)).images
    finally:
        pipe.scheduler = scheduler
    sigmas = sampler_sigmas(pipe, 4)
    with torch.no_grad():
        extra = {**conditioning(pipe, PROMPTS, guidance, pixels, pixels), "guidance": guidance}
        ours = sample_r0(denoiser(pipe), start_latents(z, sigmas, is_flow(pipe)), sigmas, extra, disable=True,
                         eta=0.0, noise_scaling=noise_scaling(pipe))
    assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()
    return theirs, z


def one_object_accuracy(pipe, steps: int = 4, guidance: float = 2.0) -> float:
    """The oracle's accuracy on every colour-shape caption ("a red circle"), one image each at `steps` steps."""
    from r0_core.tiny import oracle, world
    from r0_core.tiny.evaluate import r0_images

    prompts = [world.caption(s) for s in world.prompt_split("single")[0]]
    images = r0_images(pipe, prompts, steps=steps, guidance=guidance, seed=0, progress=False)
    return float(np.mean([oracle.judge(image, p).correct for image, p in zip(images, prompts)]))
