"""The R0 sampler against diffusers' own schedulers on the tiny model, in fp32."""
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from r0_core.denoisers import DiffusersDenoiser
from r0_core.family import encode_prompts
from r0_core.generate import generate
from r0_core.loading import TINY, load_pipeline
from r0_core.sampler import Cancelled, sample_r0
from r0_core.schedule import sigmas_for_timesteps, sigmas_from_alphas_cumprod, uniform_timesteps

PROMPTS = ["a red circle on the left", "a blue square above a yellow triangle"]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _start(pipe, seed=0):
    return torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps, guidance, alpha_to_one", [(4, 2.0, True), (50, 2.0, False), (4, 1.0, False)])
def test_eta_0_is_diffusers_ddim(pipe, steps, guidance, alpha_to_one):
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=alpha_to_one)
    pipe.scheduler = ddim
    z = _start(pipe)
    theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=z.clone(),
                  output_type="latent").images
    # DDIM's last step lands on ᾱ_final (1, or ᾱ_0 when set_alpha_to_one is off), so end there too
    final = 0.0 if alpha_to_one else float(((1 - ddim.alphas_cumprod[0]) / ddim.alphas_cumprod[0]).sqrt())
    sigmas = sigmas_for_timesteps(sigmas_from_alphas_cumprod(ddim.alphas_cumprod), ddim.timesteps.tolist(),
                                  final_sigma=final)
    assert ddim.timesteps.tolist() == uniform_timesteps(1000, steps)
    cond, uncond = encode_prompts(pipe, PROMPTS, guidance)
    x = sample_r0(DiffusersDenoiser.from_pipeline(pipe), z * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                  {"cond": cond, "uncond": uncond, "guidance": guidance}, disable=True, eta=0.0)
    ours = x / (1 + sigmas[-1] ** 2).sqrt()               # back to the VP latent DDIM returns
    assert (ours - theirs).abs().max() <= 1e-4


def test_eta_1_is_the_lcm_update_given_the_same_noise(pipe):
    timesteps = [999, 749, 499, 249]
    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    lcm.set_timesteps(timesteps=timesteps)
    cond, uncond = encode_prompts(pipe, PROMPTS, 2.0)
    model = DiffusersDenoiser.from_pipeline(pipe)
    z = _start(pipe, seed=1)

    latents, generator = z.clone(), torch.Generator().manual_seed(7)
    for t in lcm.timesteps:
        out = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        out_uncond, out_cond = out.chunk(2)
        latents, theirs = lcm.step(out_uncond + 2.0 * (out_cond - out_uncond), t, latents, generator=generator,
                                   return_dict=False)

    sigmas = sigmas_for_timesteps(sigmas_from_alphas_cumprod(lcm.alphas_cumprod), timesteps)
    replay = torch.Generator().manual_seed(7)
    ours = sample_r0(model, z * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                     {"cond": cond, "uncond": uncond, "guidance": 2.0}, disable=True, eta=1.0,
                     noise_sampler=lambda s, s_next: torch.randn(z.shape, generator=replay))
    assert (ours - theirs).abs().max() <= 1e-4


def test_same_seed_same_image_whatever_the_batch(pipe):
    images, _ = generate(pipe, PROMPTS, steps=4, eta=0.5, guidance=2.0, seeds=[3, 4])
    again, _ = generate(pipe, PROMPTS, steps=4, eta=0.5, guidance=2.0, seeds=[3, 4])
    alone, _ = generate(pipe, PROMPTS[1:], steps=4, eta=0.5, guidance=2.0, seeds=[4])
    assert torch.equal(images, again)
    assert torch.allclose(images[1], alone[0], atol=1e-5)
    other, _ = generate(pipe, PROMPTS, steps=4, eta=0.5, guidance=2.0, seeds=[5, 6])
    assert not torch.allclose(images, other)
    # plain tensors, even with the pipeline's weights trainable (as the README's snippet uses them)
    assert not images.requires_grad and images.numpy().shape == (2, 3, 32, 32)


def test_callback_sees_every_step_and_can_cancel(pipe):
    seen = []
    generate(pipe, PROMPTS, steps=4, callback=lambda info: seen.append(info["i"]))
    assert seen == [0, 1, 2, 3]

    def cancel(info):
        if info["i"] == 1:
            raise Cancelled
    with pytest.raises(Cancelled):
        generate(pipe, PROMPTS, steps=4, callback=cancel)


def test_bad_input_is_named(pipe):
    with pytest.raises(ValueError, match="prompts"):
        generate(pipe, ["a red circle", ""], steps=4)
    with pytest.raises(ValueError, match="eta"):
        generate(pipe, PROMPTS, steps=4, eta=1.5)
    with pytest.raises(ValueError, match="descending"):
        generate(pipe, PROMPTS, timesteps=[249, 999])
    with pytest.raises(ValueError, match="height=33; expected a positive whole multiple of 2"):
        generate(pipe, PROMPTS, height=33)
