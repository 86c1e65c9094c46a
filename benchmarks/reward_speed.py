"""Speed of each reward family's scorer against the model calls it cannot avoid, as ratios measured in one run:
`PYTHONPATH=. python benchmarks/reward_speed.py`.

Every family is loaded with `load_reward` from tiny random weights of its real architecture, written in its
official file layout to a temporary folder (tests/reward_weights.py), and scores --batch random images in 0..1 of
--size x --size pixels (not the models' own size, so resizing runs), with one prompt per image.

  floor    = the bare model calls on inputs already made: pixel tensors at the model's resolution and normalised,
             token ids already made (CLIP-likes: image + text features; ImageReward: ViT + text encoder with
             cross-attention + MLP; aesthetic: image features + head; ALIGN: image + text features; DINO: the ViT
             on the images and on the references)
  batched  = scorer(images, prompts[, references]) on the whole batch in one call
  single   = --batch calls of scorer(one image, its prompt[, references])
  ratios   = batched / floor (all the scorer's own work: checks, resizing, tokenising, normalising; target <= 1.1)
             and batched / single
All under torch.no_grad, after --warmup runs. Times are medians of --repeats interleaved runs; each ratio is the
median of the ratios of runs made side by side. On a CPU with one torch thread (OMP_NUM_THREADS=1) the clock is
this process's CPU time, which other work on a shared machine does not inflate; otherwise wall time.
--width makes every tower that wide, to see how the fixed per-call costs weigh as the models grow; given several
values (`--width tests 512`: the tests' sizes, then 512), it measures each configuration in turn.
Writes benchmarks/results/reward_speed.json and .md (--results for another folder).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r0_core.rewards import FAMILIES, load_reward  # noqa: E402
from r0_core.rewards.align import AlignScore  # noqa: E402
from r0_core.rewards.base import OPENAI_MEAN, OPENAI_STD, preprocess  # noqa: E402
from r0_core.rewards.clip_score import features  # noqa: E402
from r0_core.rewards.hps import letterbox  # noqa: E402
from r0_core.rewards.image_reward import MAX_TOKENS  # noqa: E402
from r0_core.tiny.evaluate import eval_prompts  # noqa: E402
from r0_core.tiny.protocol import write_results  # noqa: E402
from tests.reward_weights import FAMILY_BUILDERS  # noqa: E402


# ---- floors: each family's unavoidable model calls, on inputs made beforehand ----

def clip_pixels(clip, images):
    return preprocess(images.float(), clip.size, clip.mean, clip.std, clip.crop).to(clip.model.dtype)


def clip_ids(clip, prompts):
    return clip.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                          max_length=clip.model.config.text_config.max_position_embeddings
                          ).input_ids.to(clip.model.device)


def clip_like_floor(scorer, images, prompts, references, pixels=clip_pixels):
    model, pixels, ids = scorer.model, pixels(scorer, images), clip_ids(scorer, prompts)
    return lambda: (model.get_image_features(pixel_values=pixels), model.get_text_features(input_ids=ids))


def hps_floor(scorer, images, prompts, references):
    def pixels(hps, images):
        return preprocess(letterbox(images.float(), hps.size), (hps.size, hps.size), hps.mean, hps.std
                          ).to(hps.model.dtype)
    return clip_like_floor(scorer, images, prompts, references, pixels)


def aesthetic_floor(scorer, images, prompts, references):
    model, head, pixels = scorer.clip.model, scorer.head, clip_pixels(scorer.clip, images)
    return lambda: head(features(model.get_image_features(pixel_values=pixels)))


def image_reward_floor(scorer, images, prompts, references):
    pixels = preprocess(images.float(), scorer.size, OPENAI_MEAN, OPENAI_STD, scorer.size).to(scorer.vision.dtype)
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(images.device)

    def run():
        image_tokens = scorer.vision(pixel_values=pixels).last_hidden_state
        hidden = scorer.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                             encoder_hidden_states=image_tokens, is_decoder=False).last_hidden_state
        return scorer.mlp(hidden[:, 0])
    return run


def align_floor(scorer: AlignScore, images, prompts, references):
    model, pixels = scorer.model, scorer.pixels(images).to(scorer.model.dtype)
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=scorer.max_length,
                              return_tensors="pt").to(images.device)
    return lambda: (model.get_image_features(pixel_values=pixels),
                    model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                            token_type_ids=tokens.token_type_ids))


def dino_floor(scorer, images, prompts, references):
    def pixels(x):
        return preprocess(x.float(), scorer.size, scorer.mean, scorer.std, scorer.crop).to(scorer.model.dtype)
    model, image_pixels, reference_pixels = scorer.model, pixels(images), pixels(references)
    return lambda: (model(pixel_values=image_pixels), model(pixel_values=reference_pixels))


FLOORS = {"clip": clip_like_floor, "hpsv2": hps_floor, "pickscore": clip_like_floor,
          "image_reward": image_reward_floor, "aesthetic": aesthetic_floor, "align": align_floor, "dino": dino_floor}


# ---- timing ----

def timer(device: torch.device):
    """Seconds one call takes. On a CPU with one torch thread, this process's CPU time, which other processes on a
    shared machine do not inflate; otherwise wall time (after the GPU's queue is drained)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        clock = time.process_time
    else:
        clock = time.perf_counter

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start
    timed.clock = clock.__name__
    return timed


def measure(family: str, folder: str, width, args, device, timed) -> dict:
    # width: every tower that wide (ImageReward's text encoder too); None: the tests' sizes
    sizes = {} if width is None else {"width": width}
    if width is not None and family == "image_reward":
        sizes["text_width"] = width
    path, support = FAMILY_BUILDERS[family](folder, **sizes)
    scorer = load_reward(family, path, support, device=device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=generator).to(device)
    references = (torch.rand(args.references, 3, args.size, args.size, generator=generator).to(device)
                  if FAMILIES[family].references else None)
    prompts = eval_prompts("pair", args.batch)

    with torch.no_grad():
        runs = {"floor": FLOORS[family](scorer, images, prompts, references),
                "batched": lambda: scorer(images, prompts, references),
                "single": lambda: [scorer(images[i:i + 1], prompts[i:i + 1], references) for i in range(len(images))]}
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so a noisy moment hits all three alike
            for name, fn in runs.items():
                times[name].append(timed(fn))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    # ratios: the median of the ratios of runs side by side in time, steadier than the ratio of the medians
    ratio = {other: statistics.median(b / o for b, o in zip(times["batched"], times[other]))
             for other in ("floor", "single")}
    return {"floor_ms": round(ms["floor"], 3), "batched_ms": round(ms["batched"], 3),
            "single_ms": round(ms["single"], 3), "batched_over_floor": round(ratio["floor"], 3),
            "batched_over_single": round(ratio["single"], 3)}


def width_arg(text: str):
    """'tests' (the tests' tiny sizes) or a tower width, a positive multiple of 64."""
    if text == "tests":
        return None
    if not text.isdigit() or int(text) <= 0 or int(text) % 64:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'tests' nor a positive multiple of 64")
    return int(text)


def markdown(report: dict) -> str:
    lines = [f"Time of each reward family's scorer (tiny random weights of its real architecture, loaded by "
             f"`load_reward`) on a batch of {report['batch']} random {report['size']}x{report['size']} images with "
             f"one prompt each ({report['references']} reference images for the families that use them), against "
             f"the floor of its bare model calls on inputs already resized, normalised and tokenised. batched/floor "
             f"is the scorer's own overhead (target <= 1.1); batched/single compares one call on the batch with "
             f"{report['batch']} calls of one image. Times are medians of {report['repeats']} interleaved runs after "
             f"{report['warmup']} warm-up runs, each ratio the median of the ratios of runs made side by side; "
             f"device {report['device']}, {report['threads']} torch threads ({report['cpu_count']} CPUs), clock "
             f"`{report['clock']}`, torch {report['torch']}."]
    for config in report["configurations"]:
        width = config["width"]
        title = ("The tests' tiny sizes (towers 32 to 128 wide), `--width tests`" if width is None
                 else f"Towers {width} wide, `--width {width}`")
        lines += ["", f"**{title}:**", "",
                  "| family | floor ms | batched ms | single ms | batched/floor | batched/single |",
                  "|---|---|---|---|---|---|"]
        for family, r in config["families"].items():
            lines.append(f"| {family} | {r['floor_ms']:.2f} | {r['batched_ms']:.2f} | {r['single_ms']:.2f} | "
                         f"{r['batched_over_floor']:.3f} | {r['batched_over_single']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="input images are size x size pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=width_arg, nargs="+", default=[None], metavar="WIDTH",
                        help="every tower this wide (a multiple of 64), or 'tests' for the tests' tiny sizes (32 to "
                             "128), the default; several values measure each in turn")
    parser.add_argument("--references", type=int, default=4, help="reference images, for the families that use them")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: load_reward's choice (CUDA where there is one)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--results", default="benchmarks/results", help="folder for reward_speed.json and .md")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # the builders' processor notices
    transformers.logging.disable_progress_bar()  # and save/load bars

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timed = timer(device)
    report = {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "clock": timed.clock, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "batch": args.batch, "size": args.size,
              "references": args.references, "repeats": args.repeats, "warmup": args.warmup, "configurations": []}
    print(f"batch {args.batch} of {args.size}x{args.size} images on {device} ({report['threads']} threads), "
          f"median of {args.repeats} ({timed.clock})")
    for width in args.width:
        config = {"width": width, "families": {}}
        report["configurations"].append(config)
        print(f"\nwidth {'tests' if width is None else width}\n{'family':<13}{'floor ms':>10}{'batched ms':>12}"
              f"{'single ms':>11}{'batched/floor':>15}{'batched/single':>16}")
        with tempfile.TemporaryDirectory() as tmp:
            for family in args.families:
                r = config["families"][family] = measure(family, os.path.join(tmp, family), width, args, device,
                                                         timed)
                print(f"{family:<13}{r['floor_ms']:>10.2f}{r['batched_ms']:>12.2f}{r['single_ms']:>11.2f}"
                      f"{r['batched_over_floor']:>15.3f}{r['batched_over_single']:>16.3f}", flush=True)
    paths = write_results("reward_speed", report, markdown(report), args.results)
    print(f"wrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
