"""The one parity check every family's tests run: the R0 sampler at η = 0, through r0_core.family, equals the
family's own diffusers pipeline (DDIM for the UNet families, FlowMatchEuler for SD3) on the same start noise."""
import torch

from r0_core.family import conditioning, denoiser, is_flow, noise_scaling, sampler_sigmas, start_latents
from r0_core.sampler import sample_r0

PROMPTS = ["a red circle on the left", "a blue square above a yellow triangle"]


def check_eta_0_is_diffusers(pipe, guidance: float, latent_side: int, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both 4-step samples from the same noise [2, 4, latent_side, latent_side], the pipeline told `pixels` as its
    size; asserts they agree to 1e-4 and returns (diffusers' sample, the noise), for the caller's other checks."""
    z = torch.randn(len(PROMPTS), 4, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, latents=z.clone(), height=pixels,
                  width=pixels, output_type="latent").images
    sigmas = sampler_sigmas(pipe, 4)
    with torch.no_grad():
        extra = {**conditioning(pipe, PROMPTS, guidance, pixels, pixels), "guidance": guidance}
        ours = sample_r0(denoiser(pipe), start_latents(z, sigmas, is_flow(pipe)), sigmas, extra, disable=True,
                         eta=0.0, noise_scaling=noise_scaling(pipe))
    assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()
    return theirs, z
