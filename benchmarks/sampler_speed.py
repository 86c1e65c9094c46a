"""Speed of the R0 sampler on the tiny model, as ratios against floors measured in the same run:
`python benchmarks/sampler_speed.py`.

  floor    = K bare UNet calls on the same batch (doubled for CFG) + one VAE decode
  ratio 1  = R0 sampler wall time (noise, K steps, VAE decode) / floor
  ratio 2  = R0 sampler wall time / diffusers' StableDiffusionPipeline with DDIM at the same K steps
All three start from the same encoded prompts (text encoding is outside the sampler).
Each figure is the median of --repeats interleaved runs.
Writes benchmarks/results/sampler_speed.json and .md (--results for another folder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from r0_core.family import decode, encode_prompts
from r0_core.generate import sample_latents
from r0_core.loading import TINY, load_pipeline
from r0_core.schedule import uniform_timesteps
from r0_core.tiny.evaluate import eval_prompts
from r0_core.tiny.protocol import write_results


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def markdown(report: dict) -> str:
    model = "the tiny model" if report["model"] == TINY else f"`{report['model']}`"
    lines = [f"Wall time of the R0 sampler (noise, K steps, VAE decode) on {model} against two references "
             f"measured in the same run from the same encoded prompts: the floor of K bare UNet calls on the same "
             f"batch (doubled for CFG) plus one VAE decode, and diffusers' StableDiffusionPipeline with DDIM at the "
             f"same K. Each time is the median of {report['repeats']} interleaved runs; batch {report['batch']}, "
             f"CFG {report['guidance']:g}, device {report['device']}, {report['torch_threads']} torch threads "
             f"({report['cpu_count']} CPUs).", "",
             "| steps | R0 s | floor s | diffusers s | R0/floor | R0/diffusers |", "|---|---|---|---|---|---|"]
    for steps, r in report["steps"].items():
        lines.append(f"| {steps} | {r['r0_s']:.3f} | {r['floor_s']:.3f} | {r['diffusers_s']:.3f} | "
                     f"{r['r0_over_floor']:.3f} | {r['r0_over_diffusers']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared CPU)")
    parser.add_argument("--results", default="benchmarks/results", help="folder for sampler_speed.json and .md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts("pair", args.batch)
    cond, uncond = encode_prompts(pipe, prompts, args.guidance)
    context = torch.cat([uncond, cond]) if uncond is not None else cond
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, size, size).to(pipe.unet.device,
                                                                                      pipe.unet.dtype)
    unet_in = torch.cat([latents] * (2 if uncond is not None else 1))
    report = {"device": str(pipe.unet.device), "batch": args.batch, "guidance": args.guidance,
              "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "model": args.model, "steps": {}}

    with torch.no_grad():
        for steps in (4, 50):
            timesteps = uniform_timesteps(pipe.scheduler.config.num_train_timesteps, steps)

            def floor():
                for t in timesteps:
                    pipe.unet(unet_in, t, encoder_hidden_states=context)
                pipe.vae.decode(latents / pipe.vae.config.scaling_factor)

            def ours():
                decode(pipe, sample_latents(pipe, cond, uncond, steps=steps, guidance=args.guidance))

            def diffusers_ddim():
                pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                     guidance_scale=args.guidance, output_type="pt")

            runs = {"floor": [], "r0": [], "diffusers": []}
            floor(), ours(), diffusers_ddim()  # warm-up
            for _ in range(args.repeats):
                for name, fn in (("floor", floor), ("r0", ours), ("diffusers", diffusers_ddim)):
                    runs[name].append(timed(fn))
            median = {name: statistics.median(t) for name, t in runs.items()}
            report["steps"][steps] = {**{f"{k}_s": round(v, 4) for k, v in median.items()},
                                      "r0_over_floor": median["r0"] / median["floor"],
                                      "r0_over_diffusers": median["r0"] / median["diffusers"]}
            print(f"{steps:3d} steps: R0 {median['r0']:.3f}s, floor {median['floor']:.3f}s, diffusers "
                  f"{median['diffusers']:.3f}s -> R0/floor {median['r0'] / median['floor']:.3f}, "
                  f"R0/diffusers {median['r0'] / median['diffusers']:.3f}")
    text = markdown(report)
    paths = write_results("sampler_speed", report, text, args.results)
    print(text + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
