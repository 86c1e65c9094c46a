"""Speed of the R0 sampler on the tiny model, as ratios against floors measured in the same run:
`python benchmarks/sampler_speed.py`.

  floor    = K bare UNet calls on the same batch (doubled for CFG) + one VAE decode
  ratio 1  = R0 sampler wall time (noise, K steps, VAE decode) / floor
  ratio 2  = R0 sampler wall time / diffusers' StableDiffusionPipeline with DDIM at the same K steps
All three start from the same encoded prompts (text encoding is outside the sampler).
Each figure is the median of --repeats interleaved runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from r0_core.generate import decode, encode_prompts, sample_latents
from r0_core.loading import TINY, load_pipeline
from r0_core.schedule import uniform_timesteps
from r0_core.tiny.evaluate import eval_prompts


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="out/benchmarks/sampler_speed.json")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts("pair", args.batch)
    cond, uncond = encode_prompts(pipe, prompts, args.guidance)
    context = torch.cat([uncond, cond]) if uncond is not None else cond
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, size, size)
    unet_in = torch.cat([latents] * (2 if uncond is not None else 1))
    report = {"device": str(pipe.unet.device), "batch": args.batch, "guidance": args.guidance, "steps": {}}

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
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
