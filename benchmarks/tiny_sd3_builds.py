"""The tiny-sd3 builds so far, with the validation figures each was chosen on, and what one training step of the
tiny MMDiT costs with and without the 256 zero rows diffusers' SD3 pipeline appends in T5's place:
`python benchmarks/tiny_sd3_builds.py` -> benchmarks/results/tiny_sd3_builds.{json,md}.

Earlier builds are read from the results file itself (their weights are gone); the shipped one from its
build_info.json. The step is forward and backward on a batch of 32 at the build's sizes, the median of 5 after
one warm-up, on `--threads` torch threads."""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from r0_core.tiny import models, protocol  # noqa: E402
from r0_core.tiny.families import SD3_TRANSFORMER  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
SHIPPED = os.path.join(ROOT, "r0_core", "tiny", "weights", "tiny-sd3", "build_info.json")
T5_ROWS = 256   # diffusers' default max_sequence_length


def step_seconds(context_rows: int, repeats: int = 5) -> float:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD3_TRANSFORMER)
    side = SD3_TRANSFORMER["sample_size"]
    x, t = torch.randn(32, 4, side, side), torch.rand(32) * 1000
    pooled = torch.randn(32, SD3_TRANSFORMER["pooled_projection_dim"])
    context = torch.randn(32, context_rows, SD3_TRANSFORMER["joint_attention_dim"])
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample \
            .square().mean().backward()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = os.path.join(RESULTS, "tiny_sd3_builds.json")
    with open(path) as f:
        earlier = json.load(f)
    with open(SHIPPED) as f:
        shipped = json.load(f)
    builds = [dict(b, name=b["name"].replace(" (shipped)", "")) for b in earlier["builds"]
              if b.get("build_config") != shipped["build_config"]]
    builds.append({"name": f"{shipped['build_config']['steps']:,} steps, lr {shipped['build_config']['lr']:g}, "
                           "shifted σ, no T5 rows (shipped)", **shipped})
    clip_rows = models.TEXT_CONFIG["max_position_embeddings"]
    seconds = {"with_t5_rows": step_seconds(clip_rows + T5_ROWS), "clip_rows_only": step_seconds(clip_rows)}
    results = {"builds": builds, "second_level": earlier["second_level"],
               "share_at_or_above_second_level": earlier["share_at_or_above_second_level"],
               "step_seconds": seconds, "context_rows": {"clip": clip_rows, "t5_zero_rows": T5_ROWS},
               "threads": args.threads}

    def pct(v):
        return f"{100 * v:.1f}%"
    lines = ["The tiny-sd3 builds of `python -m r0_core.tiny.families --family sd3` and the oracle's 4-step accuracy "
             "of each on validation captions as its build_info.json holds it (one object: the 15 colour-shape "
             "captions × 4 seeds = 60 images; positioned and pairs: the validation half × 4 seeds; no intervals: the "
             "protocol's test-half cells have not been run on tiny-sd3). Each build was chosen over the one before "
             "on these validation figures. Build seconds are wall time; every build shared the 2 cores with other "
             "work for some of its time (the first: one thread).", "",
             "| build | one object CFG 2 / none | positioned CFG 2 / none | pairs CFG 2 / none | build s |",
             "|---|---|---|---|---|"]
    for b in builds:
        a = b["oracle_accuracy_validation"]
        cells = [f"{pct(a[f'{kind}, 4 steps, guidance 2'])} / {pct(a[f'{kind}, 4 steps, guidance 1'])}"
                 for kind in ("single", "positioned", "pair")]
        lines.append(f"| {b['name']} | {' | '.join(cells)} | {b['build_seconds']} |")
    lines += ["", f"Why the shift: SD3's 4-step schedule (shift 3) starts at σ = 1 and {earlier['second_level']:.3f}. "
              f"A logit-normal σ without the shift puts {pct(earlier['share_at_or_above_second_level']['unshifted'])}"
              f" of training at σ ≥ {earlier['second_level']:.3f}; through the shift, "
              f"{pct(earlier['share_at_or_above_second_level']['shifted'])} (10⁶ draws, seed 0).", "",
              f"Why no T5 rows: the tiny MMDiT's training step (forward and backward, batch 32, {args.threads} "
              f"threads, median of 5) takes {seconds['with_t5_rows']:.3f} s with the CLIPs' {clip_rows} rows plus "
              f"diffusers' {T5_ROWS} zero rows in T5's place, and {seconds['clip_rows_only']:.3f} s with the CLIPs' "
              f"rows alone ({seconds['with_t5_rows'] / seconds['clip_rows_only']:.1f}× faster), the conditioning "
              f"ComfyUI's SD3 "
              f"CLIP gives without T5 and r0_core now gives (`family.prompt_options`)."]
    paths = protocol.write_results("tiny_sd3_builds", results, "\n".join(lines), out=RESULTS,
                                   argv=["benchmarks/tiny_sd3_builds.py"] + list(argv or sys.argv[1:]))
    print("\n".join(lines) + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
