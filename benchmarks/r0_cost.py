"""What an R0 step costs: `python benchmarks/r0_cost.py` (parts: --parts ratio,memory,dry-run).

1. ratio: one R0 and one R0+ training step (r0_core.train.train_r0, tiny model, K = --steps, batch
   --batch-size, tiny CLIP reward, gradient checkpointing on) against the floor of the same bare work measured
   in the same process: the K UNet calls forward + backward (R0+: the k calls before its step without grad, then
   one with), the VAE decode forward + backward and the reward forward + backward, with the same checkpointing.
   Blocks of steps and of floors alternate (--repeats each), so drifts in machine speed hit both; reported: the
   median of the per-block ratios and their range. Target: <= 1.15.
2. memory: peak memory of R0 and R0+ steps for K = 1, 2, 4, 8 with gradient checkpointing, each in a fresh
   process (on a CPU the resident set size sampled every millisecond, minus the one before the steps; on CUDA
   max_memory_allocated minus the allocation before). R0+ should stay flat in K.
3. dry-run: one R0 step, one R0+ step, one test-time R0 step and one RPO step (with its negatives, labels and
   a validation) on a full-size, randomly initialised SD 1.5 architecture (UNet 860M, VAE, CLIP ViT-L text
   tower) at --dry-run-size px, batch 1, fp32 on the CPU, peak memory each, in fresh processes (--dry-runs picks
   some); from them an estimate for 512 px in bf16 on a GPU (see `estimate`).
Writes benchmarks/results/<--name, default r0_cost>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from r0_core.tiny import protocol

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak memory a block of work adds to what was allocated before it (CUDA allocator, or sampled RSS)."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self.done = cuda, 0, threading.Event()

    def __enter__(self):
        self.base = torch.cuda.memory_allocated() if self.cuda else rss_bytes()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.done.set()
            self.thread.join()
        self.mb = (self.peak - self.base) / 2 ** 20


# ----------------------------------------------------------------------------------------------- 1. ratio

def floor_step(pipe, reward, config, cond, shape, sigmas, k: int):
    """The bare work of one step: UNet calls (the first k without grad), decode, reward, backward."""
    from r0_core.denoisers import DiffusersDenoiser
    from r0_core.family import decode
    from r0_core.generate import checkpointed

    model = checkpointed(DiffusersDenoiser.from_pipeline(pipe))
    x = torch.randn(shape)
    with torch.no_grad():
        for i in range(k):
            x = model(x, sigmas[i] * x.new_ones(len(x)), cond=cond)
    for i in range(k, config.steps):
        x = model(x, sigmas[i] * x.new_ones(len(x)), cond=cond)
    images = checkpointed(decode)(pipe, x)
    reward(images, ["a red circle"] * len(images)).sum().backward()


def ratio(args) -> dict:
    from r0_core import lora
    from r0_core.family import encode_prompts, latent_shape
    from r0_core.loading import TINY, load_pipeline
    from r0_core.rewards import load_reward
    from r0_core.schedule import scheduler_sigmas
    from r0_core.tiny import world
    from r0_core.train import R0Config, train_r0
    from rpo_core.train import RPOConfig, train_rpo

    reward = load_reward("clip", TINY)
    out = {}
    for mode in ("r0", "r0+"):
        # R0+ at its costliest step, k = K - 1, in both the step and the floor
        plus = tuple(float(i == args.steps - 1) for i in range(args.steps)) if mode == "r0+" else None
        config = R0Config(prompts=world.training_captions(), batch_size=args.batch_size, steps=args.steps, mode=mode,
                          plus_step_weights=plus, checkpoint_every=10 ** 9, iterations=args.block)
        pipe = load_pipeline(TINY)
        step_pipe = load_pipeline(TINY)
        lora.add_lora(pipe.unet, rank=config.lora_rank)   # as the trainer: only the LoRA takes gradients
        for module in (pipe.vae, pipe.text_encoder, reward):
            module.requires_grad_(False)
        with torch.no_grad():
            cond, _ = encode_prompts(pipe, ["a red circle"] * args.batch_size, 1.0)
        shape = latent_shape(pipe, args.batch_size)
        sigmas = scheduler_sigmas(pipe.scheduler, args.steps)
        blocks = []
        for _ in range(args.repeats):
            ticks = [time.perf_counter()]
            with tempfile.TemporaryDirectory() as folder:
                train_r0(step_pipe, reward, config, folder, callback=lambda info: ticks.append(time.perf_counter()))
            step = statistics.median(b - a for a, b in zip(ticks[1:], ticks[2:]))   # the first step left out
            times = []
            for _ in range(args.block):
                started = time.perf_counter()
                floor_step(pipe, reward, config, cond, shape, sigmas, args.steps - 1 if mode == "r0+" else 0)
                times.append(time.perf_counter() - started)
            floor = statistics.median(times[1:])
            blocks.append({"step_s": step, "floor_s": floor, "ratio": step / floor})
            print(f"{mode}: step {step:.3f} s, floor {floor:.3f} s, ratio {step / floor:.3f}", flush=True)
        ratios = [b["ratio"] for b in blocks]
        out[mode] = {"blocks": blocks, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


# ----------------------------------------------------------------------------------------------- 2. memory

def memory_child(mode: str, steps: int, batch_size: int) -> dict:
    from r0_core.loading import TINY, load_pipeline
    from r0_core.rewards import load_reward
    from r0_core.tiny import world
    from r0_core.train import R0Config, train_r0
    from rpo_core.train import RPOConfig, train_rpo

    pipe, reward = load_pipeline(TINY), load_reward("clip", TINY)
    config = R0Config(prompts=world.training_captions(), iterations=3, batch_size=batch_size, steps=steps, mode=mode,
                      plus_step_weights=tuple(float(i == steps - 1) for i in range(steps)) if mode == "r0+" else None,
                      checkpoint_every=10 ** 9)
    with tempfile.TemporaryDirectory() as folder, Peak(pipe.unet.device.type == "cuda") as peak:
        train_r0(pipe, reward, config, folder)
    return {"mode": mode, "steps": steps, "peak_mb": peak.mb}


# ----------------------------------------------------------------------------------------------- 3. dry run

def sd15_pipeline(size: int):
    """A full-size SD 1.5 architecture, randomly initialised (seeded), with the tiny tokenizer (a text tower of
    its vocabulary size; the tower is ViT-L's otherwise)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from r0_core.loading import TINY_PIPELINE_DIR

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(TINY_PIPELINE_DIR, "tokenizer"))
    unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768)      # SD 1.5's: 860M parameters
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def dry_run_child(what: str, size: int) -> dict:
    from r0_core.loading import TINY
    from r0_core.rewards import load_reward
    from r0_core.test_time import refine_noise
    from r0_core.train import R0Config, train_r0
    from rpo_core.train import RPOConfig, train_rpo

    pipe, reward = sd15_pipeline(size), load_reward("clip", TINY)
    weights_mb = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                     for p in m.parameters()) / 2 ** 20
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    started = time.time()
    with tempfile.TemporaryDirectory() as folder, Peak(False) as peak:
        if what == "test-time":
            refine_noise(pipe, reward, "a red circle", iterations=1, steps=4, height=size, width=size)
        elif what == "rpo":   # one pair per step, one negative, one validation image: RPO's smallest real step
            references = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            train_rpo(pipe, reward, references, RPOConfig(token="sks", class_name="dog", prompts=["a sks dog"],
                                                          iterations=1, batch_size=1, negatives_per_prompt=1,
                                                          validation_images=1), folder)
        else:
            train_r0(pipe, reward, R0Config(prompts=["a red circle"], iterations=1, batch_size=1, mode=what,
                                            height=size, width=size), folder)
    return {"what": what, "size": size, "peak_mb": peak.mb, "weights_mb": weights_mb, "unet_params": unet_params,
            "seconds": time.time() - started}


def estimate(dry: list[dict], size: int) -> dict:
    """512 px bf16 on a GPU from the CPU fp32 dry run at `size` px: the step's activations (its peak above the
    loaded weights) grow with the pixel count, (512 / size)², and halve in bf16; the weights halve in bf16. So
    per image: activations(512, bf16) = peak · (512 / size)² / 2; resident: the weights / 2. The batch that fits
    in G GB is (G − weights / 2 − 1 GB of CUDA context and optimizer state) / activations per image."""
    out = {}
    for row in dry:
        per_image = row["peak_mb"] * (512 / size) ** 2 / 2 / 1024
        weights = row["weights_mb"] / 2 / 1024
        out[row["what"]] = {"activations_gb_per_image": per_image, "weights_gb": weights,
                            **{f"batch_in_{g}gb": max(0, int((g - weights - 1) / per_image)) for g in (24, 80)}}
    return out


# ----------------------------------------------------------------------------------------------- report

def child_json(*argv: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    s, lines = report["settings"], []
    if "ratio" in report:
        lines += [f"**Step ÷ floor** (tiny model, K = {s['steps']}, batch {s['batch_size']}, {s['repeats']} "
                  f"alternating blocks of {s['block']} steps; target ≤ 1.15):", "",
                  "| step | median ratio | range | step s | floor s |", "|---|---|---|---|---|"]
        for mode, r in report["ratio"].items():
            lines.append(f"| {mode.upper()} | {r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} | "
                         f"{statistics.median(b['step_s'] for b in r['blocks']):.3f} | "
                         f"{statistics.median(b['floor_s'] for b in r['blocks']):.3f} |")
    if "memory" in report:
        lines += ["", f"**Peak memory with gradient checkpointing** (tiny model, batch {s['batch_size']}, MB added "
                      f"by the steps):", "", "| K | R0 | R0+ | R0+ / R0 |", "|---|---|---|---|"]
        by = {(r["mode"], r["steps"]): r["peak_mb"] for r in report["memory"]}
        for k in sorted({r["steps"] for r in report["memory"]}):
            lines.append(f"| {k} | {by['r0', k]:.0f} | {by['r0+', k]:.0f} | {by['r0+', k] / by['r0', k]:.2f} |")
    if "dry_run" in report:
        size = s["dry_run_size"]
        lines += ["", f"**Real-size dry run** (SD 1.5 architecture, random weights, {size} px, batch 1, fp32, CPU; "
                      f"UNet {report['dry_run'][0]['unet_params'] / 1e6:.0f}M parameters):", "",
                  "| step | peak MB above the loaded weights | weights MB | seconds | 512 px bf16: GB per image | "
                  "batch in 24 GB | batch in 80 GB |", "|---|---|---|---|---|---|---|"]
        for row in report["dry_run"]:
            e = report["estimate"][row["what"]]
            lines.append(f"| {row['what']} | {row['peak_mb']:.0f} | {row['weights_mb']:.0f} | {row['seconds']:.0f} | "
                         f"{e['activations_gb_per_image']:.1f} | {e['batch_in_24gb']} | {e['batch_in_80gb']} |")
        lines += ["", estimate.__doc__.split("\n", 1)[0] + " " + " ".join(
            line.strip() for line in estimate.__doc__.split("\n")[1:])]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ratio,memory,dry-run")
    parser.add_argument("--steps", type=int, default=4, help="K for the ratio")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="alternating blocks of steps and floors")
    parser.add_argument("--block", type=int, default=6, help="steps per block (the first is left out)")
    parser.add_argument("--memory-steps", default="1,2,4,8")
    parser.add_argument("--dry-run-size", type=int, default=256)
    parser.add_argument("--dry-runs", default="r0,r0+,test-time,rpo", help="which real-size steps to run")
    parser.add_argument("--name", default="r0_cost", help="results file name")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        kind, *rest = args.child
        result = (memory_child(rest[0], int(rest[1]), args.batch_size) if kind == "memory"
                  else dry_run_child(rest[0], args.dry_run_size))
        print(json.dumps(result))
        return
    parts = args.parts.split(",")
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "results", "name")}}
    if "ratio" in parts:
        report["ratio"] = ratio(args)
    common = ["--batch-size", str(args.batch_size), "--threads", str(args.threads),
              "--dry-run-size", str(args.dry_run_size)]
    if "memory" in parts:
        report["memory"] = [child_json(*common, "--child", "memory", mode, k)
                            for k in args.memory_steps.split(",") for mode in ("r0", "r0+")]
        print(report["memory"], flush=True)
    if "dry-run" in parts:
        report["dry_run"] = [child_json(*common, "--child", "dry-run", what) for what in args.dry_runs.split(",")]
        report["estimate"] = estimate(report["dry_run"], args.dry_run_size)
    text = markdown(report)
    paths = protocol.write_results(args.name, report, text, out=args.results)
    print(text + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
