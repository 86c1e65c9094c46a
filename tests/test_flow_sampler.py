"""The R0 sampler on rectified-flow models (SD3 family): at η = 0 it is diffusers' FlowMatchEulerDiscreteScheduler,
at η = 1 that scheduler's stochastic sampling (x̂0, then fresh noise), on the same shifted sigmas, with a tiny
random SD3 transformer."""
import pytest
import torch

from r0_core.denoisers import FlowDenoiser
from r0_core.sampler import flow_noise_scaling, sample_r0
from r0_core.schedule import flow_shift, flow_sigmas


@pytest.fixture(scope="module")
def transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16).eval()


def scheduler(shift, stochastic=False):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic)


@pytest.mark.parametrize("steps, shift", [(4, 3.0), (8, 1.0), (1, 3.0)])
def test_flow_sigmas_equal_diffusers(steps, shift):
    theirs = scheduler(shift)
    theirs.set_timesteps(steps)
    assert torch.allclose(flow_sigmas(steps, shift), theirs.sigmas, atol=1e-6)


class ComfyFlowSampling:
    """The interface of ComfyUI's flow model_sampling (ModelSamplingDiscreteFlow): σ(t) = shift(t / 1000) over
    1000 levels, t(σ) = 1000 σ."""

    def __init__(self, shift):
        self.shift = shift
        self.sigmas = self.sigma(torch.arange(1, 1001, dtype=torch.float64)).float()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def sigma(self, timestep):
        return flow_shift(timestep / 1000, self.shift)

    def timestep(self, sigma):
        return sigma * 1000


@pytest.mark.parametrize("steps, shift", [(4, 3.0), (8, 1.0), (1, 3.0)])
def test_r0_sigmas_node_on_a_flow_model_follows_the_pipelines_schedule(steps, shift):
    from nodes.r0_nodes import flow_model_sigmas

    theirs = scheduler(shift)
    theirs.set_timesteps(steps)
    assert torch.allclose(flow_model_sigmas(ComfyFlowSampling(shift), steps), theirs.sigmas, atol=1e-6)


@pytest.mark.parametrize("eta, guidance", [(0.0, 1.0), (1.0, 1.0), (0.0, 3.0), (1.0, 3.0)])
def test_r0_sampler_equals_flow_match_euler(transformer, eta, guidance):
    steps, shift = 4, 3.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    uncond, uncond_pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)

    theirs = scheduler(shift, stochastic=eta == 1.0)
    theirs.set_timesteps(steps)
    sample, noise = x.clone(), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in theirs.timesteps:   # as diffusers' SD3 pipeline runs its loop
            if guidance == 1.0:
                v = transformer(hidden_states=sample, timestep=t.expand(2), encoder_hidden_states=cond,
                                pooled_projections=pooled).sample
            else:
                v_uncond, v_cond = transformer(hidden_states=torch.cat([sample, sample]), timestep=t.expand(4),
                                               encoder_hidden_states=torch.cat([uncond, cond]),
                                               pooled_projections=torch.cat([uncond_pooled, pooled])).sample.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            sample = theirs.step(v, t, sample, generator=noise).prev_sample

    ours_noise = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ours = sample_r0(FlowDenoiser(transformer), x.clone(), flow_sigmas(steps, shift), disable=True, eta=eta,
                         noise_scaling=flow_noise_scaling,
                         extra_args={"cond": cond, "added_cond": {"pooled_projections": pooled}, "uncond": uncond,
                                     "uncond_added_cond": {"pooled_projections": uncond_pooled},
                                     "guidance": guidance},
                         noise_sampler=lambda s, s_next: torch.randn(x.shape, generator=ours_noise))
    assert torch.allclose(ours, sample, atol=1e-4), (ours - sample).abs().max()
    assert (sample - x).abs().mean() > 0.1   # the chain moved


def test_eta_between_mixes_the_two(transformer):
    """η in (0, 1) is neither: it keeps part of the predicted noise."""
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    pooled = torch.randn(1, 8, generator=g)
    run = {}
    for eta in (0.0, 0.5, 1.0):
        noise = torch.Generator().manual_seed(3)
        with torch.no_grad():
            run[eta] = sample_r0(FlowDenoiser(transformer), x, flow_sigmas(4, 3.0), disable=True, eta=eta,
                                 noise_scaling=flow_noise_scaling, extra_args={"cond": cond, "added_cond": {"pooled_projections": pooled}},
                                 noise_sampler=lambda s, s_next: torch.randn(x.shape, generator=noise))
    assert not torch.allclose(run[0.5], run[0.0], atol=1e-3) and not torch.allclose(run[0.5], run[1.0], atol=1e-3)
