"""Peak memory and step time of R0 and R0+ training steps at K = 4 on the tiny model: `python benchmarks/r0_memory.py`.

Each setting runs in a fresh process: load the tiny pipeline and reward, then time --iterations training steps
(batch --batch-size, LoRA rank 8, tiny CLIP reward). Peak memory is what a step adds on top of the loaded
models: on CUDA torch.cuda.max_memory_allocated minus the allocation before the steps; on a CPU the resident set
size sampled every millisecond during the steps minus the one before them. Printed: R0+ ÷ R0 peak memory
with and without gradient checkpointing (R0+ backpropagates through one sampler step instead of K), and the
step times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, checkpointing: bool, batch_size: int, iterations: int) -> dict:
    import tempfile

    import torch

    from r0_core.loading import TINY, load_pipeline
    from r0_core.rewards import load_reward
    from r0_core.tiny import world
    from r0_core.train import R0Config, train_r0

    torch.set_num_threads(1)
    pipe, reward = load_pipeline(TINY), load_reward("clip", TINY)
    cuda = pipe.unet.device.type == "cuda"
    config = R0Config(prompts=world.training_captions(), iterations=iterations, batch_size=batch_size, mode=mode,
                      gradient_checkpointing=checkpointing, checkpoint_every=10 ** 9)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    ticks = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as out:
        result = train_r0(pipe, reward, config, out, callback=lambda info: ticks.append(time.perf_counter()))
    seconds = sorted(b - a for a, b in zip(ticks[1:], ticks[2:]))[(iterations - 1) // 2]  # median, first step out
    done.set()
    thread.join()
    used = (torch.cuda.max_memory_allocated() if cuda else peak[0]) - base
    return {"mode": mode, "checkpointing": checkpointing, "peak_mb": used / 2 ** 20, "seconds_per_step": seconds,
            "device": str(pipe.unet.device), "steps": len(result.history)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="out/benchmarks/r0_memory.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.batch_size, args.iterations)))
        return
    rows = []
    for checkpointing in (False, True):
        for mode in ("r0", "r0+"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(int(checkpointing)),
                                  "--batch-size", str(args.batch_size), "--iterations", str(args.iterations)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": "."})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["mode"], r["checkpointing"]): r for r in rows}
    print(f"\nK = 4, batch {args.batch_size}, {rows[0]['device']}")
    print("| gradient checkpointing | R0 peak MB | R0+ peak MB | R0+ / R0 | R0 s/step | R0+ s/step |")
    print("|---|---|---|---|---|---|")
    for c in (False, True):
        a, b = by["r0", c], by["r0+", c]
        print(f"| {'on' if c else 'off'} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | "
              f"{b['peak_mb'] / a['peak_mb']:.2f} | {a['seconds_per_step']:.2f} | {b['seconds_per_step']:.2f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
