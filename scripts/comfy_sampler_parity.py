"""The R0 Sampler node's function against ComfyUI's own samplers, inside a ComfyUI checkout (not part of CI):
at η = 0 it must give what ComfyUI's `euler` gives and at η = 1 what its `lcm` gives, on the same sigmas and
noise, for an ε model (ModelSamplingDiscrete) and a rectified-flow model (ModelSamplingDiscreteFlow, SD3's shift 3).

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/comfy_sampler_parity.py

The denoiser is a small random conv net of (x, σ); the samplers see it as ComfyUI's KSAMPLER hands a model over
(a callable whose inner_model carries the model patcher and the model's model_sampling).
"""
import os
import sys
from types import SimpleNamespace

import torch

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())
sys.argv[1:] = ["--cpu"]   # ComfyUI parses its command line when imported, if told to
import comfy.options  # noqa: E402
comfy.options.enable_args_parsing()

import comfy.model_sampling as ms  # noqa: E402
from comfy.k_diffusion import sampling  # noqa: E402

import importlib.util  # noqa: E402

# the pack is imported as ComfyUI imports a custom node (a package; ComfyUI's own `nodes` module stays first)
spec = importlib.util.spec_from_file_location("r0_pack", os.path.join(PACK, "__init__.py"),
                                              submodule_search_locations=[PACK])
sys.modules["r0_pack"] = pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)
from r0_pack.nodes.r0_nodes import comfy_sample_r0, flow_model_sigmas  # noqa: E402
from r0_core.schedule import r0_sigmas  # noqa: E402


def model_sampling(kind):
    """ComfyUI's own model_sampling classes, combined as its model_base does."""
    if kind == "flow":
        class Sampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass
        out = Sampling()
        out.set_parameters(shift=3.0)
        return out

    class Sampling(ms.ModelSamplingDiscrete, ms.EPS):
        pass
    return Sampling()


def as_ksampler_model(denoise, sampling):
    patcher = SimpleNamespace(get_model_object=lambda name: {"model_sampling": sampling}[name])
    guider = SimpleNamespace(model_patcher=patcher, inner_model=SimpleNamespace(model_sampling=sampling))

    class Model:
        inner_model = guider

        def __call__(self, x, sigma, **extra):
            return denoise(x, sigma)
    return Model()


def main():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(5, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, padding=1))

    def denoise(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return net(torch.cat([x, s], 1))

    worst, rows = 0.0, []
    for kind in ("eps", "flow"):
        sampling = model_sampling(kind)
        model = as_ksampler_model(denoise, sampling)
        for steps in (1, 4, 8):
            # what R0 Sigmas gives on such a MODEL
            sigmas = flow_model_sigmas(sampling, steps) if kind == "flow" else r0_sigmas(sampling.sigmas, steps)
            start = sampling.noise_scaling(sigmas[0], torch.randn(2, 4, 16, 16), torch.zeros(2, 4, 16, 16))
            with torch.no_grad():
                for eta, theirs_fn in ((0.0, sampling_fn("euler")), (1.0, sampling_fn("lcm"))):
                    ours = comfy_sample_r0(model, start.clone(), sigmas, {"seed": 5}, disable=True, eta=eta)
                    theirs = theirs_fn(model, start.clone(), sigmas, {"seed": 5}, disable=True)
                    diff = float((ours - theirs).abs().max())
                    worst = max(worst, diff)
                    rows.append({"model": kind, "steps": steps, "eta": eta, "comfy": "euler" if eta == 0 else "lcm",
                                 "max_abs_diff": diff, "sample_std": float(theirs.std())})
    try:
        from comfyui_version import __version__ as comfy_version
    except ImportError:
        comfy_version = "unknown"
    lines = [f"The R0 Sampler node's function against ComfyUI {comfy_version}'s own samplers on the same sigmas "
             f"(R0 Sigmas of each model: uniform timesteps of the ε table, the flow schedule at the flow model's "
             f"shift) and noise (seed 5); a random conv denoiser; batch 2, 4×16×16.", "",
             "| model sampling | K | η | ComfyUI sampler | max abs difference | sample std |", "|---|---|---|---|---|---|"]
    names = {"eps": "ε (ModelSamplingDiscrete, EPS)", "flow": "flow (ModelSamplingDiscreteFlow shift 3, CONST)"}
    lines += [f"| {names[r['model']]} | {r['steps']} | {r['eta']:g} | {r['comfy']} | {r['max_abs_diff']:.1e} | "
              f"{r['sample_std']:.3f} |" for r in rows]
    from r0_core.tiny import protocol
    paths = protocol.write_results("comfy_sampler_parity", {"comfyui": comfy_version, "rows": rows, "worst": worst},
                                   "\n".join(lines), out=os.path.join(PACK, "benchmarks", "results"),
                                   argv=[os.path.join(PACK, "scripts", "comfy_sampler_parity.py")])
    print("\n".join(lines) + f"\nworst {worst:.1e}; wrote {', '.join(paths)}")
    sys.exit(0 if worst < 1e-5 else 1)


def sampling_fn(name):
    return getattr(sampling, f"sample_{name}")


if __name__ == "__main__":
    main()
