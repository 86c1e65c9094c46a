"""Speed of the R0 sampler for every family, as ratios against floors measured in the same run:
`python benchmarks/sampler_speed.py [--families tiny,sdxl,sd3]`.

  floor    = K bare backbone calls on the same batch (doubled for CFG) + one VAE decode
  ratio 1  = R0 sampler wall time (noise, K steps, VAE decode) / floor
  ratio 2  = R0 sampler wall time / diffusers' own pipeline of the family at the same K steps (DDIM for the UNet
             families, FlowMatchEuler for SD3)
  same-call ratios: the time inside the backbone's calls is also clocked during each R0 and diffusers call (forward
             hooks), so "R0 / its own backbone calls + decode" and the two callers' overheads divided are measured
             within one call: the machine's drift between calls, which spreads the ratios above by several per
             cent on a shared CPU, cancels.
Families: the tiny world's models of each architecture (tiny, tiny-sdxl, tiny-sd3: the real block structure at
small widths). All three timings start from the
same encoded prompts (text encoding is outside the sampler). Each figure is the median of --repeats interleaved
runs, with the spread of the per-repeat ratios.
Writes benchmarks/results/sampler_speed.json and .md (--results for another folder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from r0_core.family import backbone, conditioning, decode, is_flow, latent_shape, sampler_sigmas
from r0_core.generate import sample_latents
from r0_core.loading import TINY, load_pipeline
from r0_core.tiny.evaluate import eval_prompts
from r0_core.tiny.protocol import write_results


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def markdown(report: dict) -> str:
    lines = [f"Wall time of the R0 sampler (noise, K steps, VAE decode) against two references measured in the same "
             f"run from the same encoded prompts: the floor of K bare backbone calls on the same batch (doubled for "
             f"CFG) plus one VAE decode, and the family's own diffusers pipeline at the same K. Each time is the "
             f"median of {report['repeats']} interleaved runs, the ratios' spread over the repeats in brackets; "
             f"batch {report['batch']}, CFG {report['guidance']:g}, device {report['device']}, "
             f"{report['torch_threads']} torch threads ({report['cpu_count']} CPUs). The world's tiny model of each "
             f"family (tiny, tiny-sdxl, tiny-sd3). 1-minute load average {report['load_average_start']} at the "
             f"start and {report['load_average_end']} at the end (near 0 before the run: idle cores).", "",
             "| family | steps | R0 s | floor s | diffusers s | R0/floor | R0/diffusers | R0/own floor, same call "
             "| diffusers/own floor | R0/diffusers, same call |", "|---|---|---|---|---|---|---|---|---|---|"]
    span = lambda r, k: f"{r[k]:.3f} [{r[k + '_range'][0]:.3f}, {r[k + '_range'][1]:.3f}]"  # noqa: E731
    for family, rows in report["families"].items():
        for steps, r in rows.items():
            lines.append(f"| {family} | {steps} | {r['r0_s']:.3f} | {r['floor_s']:.3f} | {r['diffusers_s']:.3f} | "
                         f"{span(r, 'r0_over_floor')} | {span(r, 'r0_over_diffusers')} | "
                         f"{span(r, 'r0_over_own_floor')} | {r['diffusers_over_own_floor']:.3f} | "
                         f"{span(r, 'r0_over_diffusers_same_call')} |")
    lines += ["", "Same call: each R0 or diffusers call's wall time over the seconds it spent inside the backbone's "
              "and the VAE decoder's forward calls (clocked by hooks during that call), the median over the repeats "
              "with its range; R0/diffusers, same call = the ratio of the two callers' overheads. The drift of a "
              "shared machine between calls cancels in these."]
    return "\n".join(lines)


def family_pipeline(family: str):
    return load_pipeline(TINY if family == "tiny" else f"tiny-{family}", device="cpu", dtype=torch.float32)


def floor_call(pipe, c: dict, latents: torch.Tensor, sigmas: torch.Tensor, guided: bool):
    """K bare backbone calls on the batch (both halves with CFG) and one VAE decode: no sampler arithmetic."""
    net = backbone(pipe)
    both = lambda a, b: torch.cat([b, a]) if guided else a  # noqa: E731
    x = both(latents, latents)
    context = both(c["cond"], c["uncond"])
    added = None if c.get("added_cond") is None else {
        k: both(v, c["uncond_added_cond"][k]) for k, v in c["added_cond"].items()}
    timesteps = sigmas[:-1] * pipe.scheduler.config.num_train_timesteps if is_flow(pipe) else \
        torch.linspace(pipe.scheduler.config.num_train_timesteps - 1, 0, len(sigmas) - 1).round()

    def run():
        for t in timesteps:
            t = t.expand(len(x))
            if is_flow(pipe):
                net(hidden_states=x, timestep=t, encoder_hidden_states=context, **added)
            else:
                net(x, t, encoder_hidden_states=context, added_cond_kwargs=added)
        decode(pipe, latents)
    return run


def diffusers_call(pipe, c: dict, steps: int, guidance: float):
    """The family's own pipeline from the same embeddings."""
    kwargs = {"prompt_embeds": c["cond"], "negative_prompt_embeds": c["uncond"]}
    if c.get("added_cond") is not None:
        pooled = "pooled_projections" if is_flow(pipe) else "text_embeds"
        kwargs.update(pooled_prompt_embeds=c["added_cond"][pooled],
                      negative_pooled_prompt_embeds=(c.get("uncond_added_cond") or {}).get(pooled))
    return lambda: pipe(num_inference_steps=steps, guidance_scale=guidance, output_type="pt", **kwargs)


class Clock:
    """Seconds spent inside a module's forward calls (hooks): what a call spends in the backbone and the decoder."""

    def __init__(self, module):
        self.seconds, self._start = 0.0, 0.0
        self.handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._leave)]

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _leave(self, *_):
        self.seconds += time.perf_counter() - self._start

    def close(self):
        for handle in self.handles:
            handle.remove()


def own_ratio(call, clocks) -> float:
    """A call's wall time over the seconds its clocked modules spent inside it (its own floor)."""
    for clock in clocks:
        clock.seconds = 0.0
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) / sum(clock.seconds for clock in clocks)


def measure(pipe, prompts, steps: int, guidance: float, repeats: int) -> dict:
    c = conditioning(pipe, prompts, guidance)
    sigmas = sampler_sigmas(pipe, steps)
    latents = torch.randn(latent_shape(pipe, len(prompts))).to(backbone(pipe).device, backbone(pipe).dtype)
    calls = {"floor": floor_call(pipe, c, latents, sigmas, c["uncond"] is not None),
             "r0": lambda: decode(pipe, sample_latents(pipe, **c, steps=steps, guidance=guidance)),
             "diffusers": diffusers_call(pipe, c, steps, guidance)}
    for fn in calls.values():
        fn()   # warm-up
    runs = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            runs[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in runs.items()}
    ratio = lambda ref: [r / f for r, f in zip(runs["r0"], runs[ref])]  # noqa: E731
    own = same_call_ratios(pipe, c, steps, guidance, repeats)
    return {**{f"{k}_s": round(v, 4) for k, v in median.items()}, **own,
            "r0_over_floor": median["r0"] / median["floor"], "r0_over_diffusers": median["r0"] / median["diffusers"],
            "r0_over_floor_range": [min(ratio("floor")), max(ratio("floor"))],
            "r0_over_diffusers_range": [min(ratio("diffusers")), max(ratio("diffusers"))]}


def same_call_ratios(pipe, c: dict, steps: int, guidance: float, repeats: int) -> dict:
    """R0's and diffusers' wall time over their own backbone and VAE-decoder seconds, each within one call."""
    clocks = [Clock(backbone(pipe)), Clock(pipe.vae.decoder)]
    r0 = lambda: decode(pipe, sample_latents(pipe, **c, steps=steps, guidance=guidance))  # noqa: E731
    theirs = diffusers_call(pipe, c, steps, guidance)
    r0_own, diffusers_own = [], []
    for _ in range(repeats):
        r0_own.append(own_ratio(r0, clocks))
        diffusers_own.append(own_ratio(theirs, clocks))
    for clock in clocks:
        clock.close()
    over = [a / b for a, b in zip(r0_own, diffusers_own)]
    return {"r0_over_own_floor": statistics.median(r0_own), "r0_over_own_floor_range": [min(r0_own), max(r0_own)],
            "diffusers_over_own_floor": statistics.median(diffusers_own),
            "r0_over_diffusers_same_call": statistics.median(over),
            "r0_over_diffusers_same_call_range": [min(over), max(over)]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="tiny,sdxl,sd3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared CPU)")
    parser.add_argument("--results", default="benchmarks/results", help="folder for sampler_speed.json and .md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    prompts = eval_prompts("pair", args.batch)
    report = {"device": "cpu", "batch": args.batch, "guidance": args.guidance, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_start": round(os.getloadavg()[0], 2), "families": {}}
    with torch.no_grad():
        for family in args.families.split(","):
            pipe = family_pipeline(family)
            report["device"] = str(backbone(pipe).device)
            report["families"][family] = {}
            for steps in (4, 50):
                r = measure(pipe, prompts, steps, args.guidance, args.repeats)
                report["families"][family][steps] = r
                print(f"{family} {steps:3d} steps: R0/floor {r['r0_over_floor']:.3f}, "
                      f"R0/diffusers {r['r0_over_diffusers']:.3f}", flush=True)
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    text = markdown(report)
    paths = write_results("sampler_speed", report, text, args.results)
    print(text + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
