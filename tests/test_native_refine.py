"""R0 Test-time Refine (native MODEL)'s adapter code without ComfyUI: on the tiny world's real UNet and VAE loaded
under torch.inference_mode (as ComfyUI loads every model), the node's FrozenGenerator refines the start noise,
its iteration 0 is the plain few-step sample, and the weights are the original inference tensors afterwards.
(scripts/comfy_native_refine.py runs the node itself in a real ComfyUI.)"""
import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS
from nodes.native_refine import R0TestTimeRefineNative, native_generator, thawed
from nodes.r0_nodes import renoise_sampler
from r0_core import family
from r0_core.generate import generate
from r0_core.loading import TINY, load_pipeline
from r0_core.rewards import load_reward
from r0_core.sampler import seeded_noise, vp_noise_scaling
from r0_core.test_time import refine

PROMPTS = ["a red circle above a blue square"] * 2


@pytest.fixture(scope="module")
def frozen_pipe():
    with torch.inference_mode():
        pipe = load_pipeline(TINY, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_node_is_registered_with_comfyui_types():
    assert NODE_CLASS_MAPPINGS["R0TestTimeRefineNative"] is R0TestTimeRefineNative
    inputs = R0TestTimeRefineNative.INPUT_TYPES()["required"]
    assert [inputs[k][0] for k in ("model", "positive", "negative", "vae", "sigmas", "latent_image")] == [
        "MODEL", "CONDITIONING", "CONDITIONING", "VAE", "SIGMAS", "LATENT"]
    assert R0TestTimeRefineNative.RETURN_TYPES == ("IMAGE", "IMAGE", "LATENT")


def test_thawed_swaps_inference_weights_for_copies_and_back(frozen_pipe):
    unet = frozen_pipe.unet
    originals = {n: p for n, p in unet.named_parameters()}
    assert all(p.is_inference() for p in originals.values())
    with thawed(unet):
        inside = dict(unet.named_parameters())
        assert not any(p.is_inference() for p in inside.values())
        assert all(torch.equal(inside[n], originals[n]) and inside[n] is not originals[n] for n in originals)
    assert all(p is originals[n] for n, p in unet.named_parameters())


def test_native_generator_refines_through_inference_mode_weights(frozen_pipe):
    pipe = frozen_pipe
    reward = load_reward("clip", TINY, device="cpu")
    with torch.inference_mode():   # ComfyUI's conditioning, sigmas and noise are inference tensors too
        c = family.conditioning(pipe, PROMPTS, 1.0)
        sigmas = family.sampler_sigmas(pipe, 4)
        noise = seeded_noise(family.latent_shape(pipe, 2), [0, 1])
    with thawed(pipe.unet, pipe.vae), torch.inference_mode(False):
        sigmas = sigmas.clone()
        generator = native_generator(family.denoiser(pipe), {**c, "guidance": 1.0}, sigmas, noise,
                                     lambda eps: family.start_latents(eps, sigmas), vp_noise_scaling,
                                     lambda latents: family.decode(pipe, latents), eta=0.0, seed=0)
        result = refine(generator, reward, PROMPTS, iterations=3, lr=5.0)
    assert all(p.is_inference() for p in pipe.unet.parameters())   # the originals are back
    plain, _ = generate(pipe, PROMPTS, steps=4, seeds=[0, 1])
    torch.testing.assert_close(result.initial_images, plain, atol=1e-5, rtol=0)
    assert (result.best_reward >= result.initial_reward).all()
    assert result.best_reward.mean() > result.initial_reward.mean() + 1.0   # tiny CLIP's scale: ~80 to ~95
    assert (result.images - result.initial_images).abs().max() > 1 / 255


def test_renoise_sampler_draws_the_same_noise_at_every_render():
    x = torch.zeros(2, 4, 8, 8)
    first, second = renoise_sampler(7)(x), renoise_sampler(7)(x)
    a, b = first(1.0, 0.5), first(0.5, 0.1)
    assert torch.equal(a, second(1.0, 0.5)) and torch.equal(b, second(0.5, 0.1)) and not torch.equal(a, b)
