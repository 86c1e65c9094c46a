"""The shipped tiny-sdxl and tiny-sd3 on the protocol's test half: `python benchmarks/tiny_families_test.py` ->
benchmarks/results/tiny_families_test.{json,md}.

Their builds were chosen on build_info.json's validation figures; this reports them where nothing was chosen:
positioned and two-object captions of the test half × protocol.SEEDS noise seeds, and one object (whose 15
colour-shape captions have no held-out half) on fresh noise seeds (from 5000; the builds' check used 1000+).
The oracle's verdict at 4 steps of the R0 sampler (η = 0), CFG 2 and none, with 95% bootstrap intervals over
captions (protocol.summarize)."""
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from r0_core.loading import load_pipeline  # noqa: E402
from r0_core.tiny import oracle, protocol, world  # noqa: E402
from r0_core.tiny.evaluate import r0_images  # noqa: E402

MODELS = ("tiny-sdxl", "tiny-sd3")
FRESH_SEED = 5000


def cells() -> dict:
    texts = [world.caption(s) for s in world.prompt_split("single")[0]]
    single = ([t for t in texts for _ in range(protocol.SEEDS)], np.repeat(np.arange(len(texts)), protocol.SEEDS))
    return {"single": single, **{kind: protocol.cell(kind, "test") for kind in protocol.KINDS}}


def main():
    torch.set_num_threads(2)
    rows = {}
    for name in MODELS:
        pipe = load_pipeline(name, device="cpu", dtype=torch.float32)
        for kind, (prompts, groups) in cells().items():
            for guidance in (2.0, 1.0):
                images = r0_images(pipe, prompts, steps=4, guidance=guidance, seed=FRESH_SEED, progress=False)
                right = [float(oracle.judge(im, p).correct) for im, p in zip(images, prompts)]
                rows[f"{name}, {kind}, guidance {guidance:g}"] = protocol.summarize(right, groups)
    lines = [f"The shipped tiny family models at 4 steps (R0 sampler, η = 0), judged by the oracle, 95% bootstrap "
             f"intervals over captions. Positioned and pairs: the protocol's test half × {protocol.SEEDS} seeds; one "
             f"object: the 15 colour-shape captions (no held-out half exists) × {protocol.SEEDS} fresh seeds from "
             f"{FRESH_SEED}. Nothing was chosen on these images.", "",
             "| model | one object CFG 2 / none | positioned CFG 2 / none | two objects CFG 2 / none |",
             "|---|---|---|---|"]
    for name in MODELS:
        cells_text = [f"{protocol.fmt(rows[f'{name}, {kind}, guidance 2'])} / "
                      f"{protocol.fmt(rows[f'{name}, {kind}, guidance 1'])}" for kind in ("single",) + protocol.KINDS]
        lines.append(f"| {name} | {' | '.join(cells_text)} |")
    paths = protocol.write_results("tiny_families_test", {"cells": rows, "fresh_seed": FRESH_SEED,
                                                          "seeds": protocol.SEEDS},
                                   "\n".join(lines), out=os.path.join(ROOT, "benchmarks", "results"),
                                   argv=["benchmarks/tiny_families_test.py"])
    print("\n".join(lines) + f"\nwrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
