"""Do the RPO subjects' rare tokens behave as "sks" does in Stable Diffusion? `python benchmarks/rare_tokens.py`.

In SD a rare token barely changes the image ("a sks dog on the beach" still draws a dog on a beach), yet the
UNet can tell it apart, so DreamBooth can give it a meaning. The tiny world's subjects (r0_core/tiny/subjects.py)
rely on the same for "vum", "bip" and "qud". On the base model, for every sampler setting (--steps, --guidance):
  1. accuracy: the half's held-out one-object captions (protocol, "a red circle on the left") with the token
     before the noun ("a red vum circle on the left"), judged by the oracle as the plain caption, against the
     plain captions at the same seeds: ratio with / without (target >= 0.90) and the paired difference [95% CI];
     also the subset whose shape is the subject's class;
  2. distances: the images of each subject prompt (evaluation prompts and training prompts) against the same
     prompt without the token, and without the token with one thing changed (the second object's colour; for
     attribute prompts the named colour; for position prompts, which name no colour, the position): the mean
     absolute pixel difference at the same seeds, and the share of prompts closer to the unchanged one;
  4. DreamBooth (unless --no-dreambooth): a LoRA per subject (rpo_core.train with preference=False, lr and rank
     as benchmarks/rpo_mini_dreambench.py), then the subject oracle on the evaluation prompts, 4 images each,
     against the base model.
And once, independent of the sampler:
  3. the text encoder: relative L2 difference of its last hidden states with and without the token (all
     positions, and the positions after the token, shifted by its pieces), and the cosine of the pooled outputs;
     the UNet must still tell the token apart for fine-tuning to give it a meaning.
Samples and LoRAs are cached under --out/<model fingerprint>, so a rerun resumes and new weights start afresh.
Writes <results>/rare_tokens.json and .md (r0_core.tiny.protocol.write_results).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os

import numpy as np
import torch
from safetensors import safe_open

from r0_core import lora
from r0_core.loading import TINY, TINY_PIPELINE_DIR, load_pipeline
from r0_core.tiny import oracle, protocol, subjects, world
from r0_core.tiny.evaluate import r0_images

TARGET_RATIO = 0.90                 # accuracy with the token / without, for the token to count as ignored
OPPOSITE_POSITION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "middle": "left"}
EVAL_IMAGES_PER_PROMPT = 4          # DreamBench's protocol


# ----------------------------------------------------------------------------------------------- prompts

def insert_token(caption: str, token: str) -> str:
    """The token before the first object's noun: 'a red circle on the left' -> 'a red vum circle on the left'."""
    words = caption.split()
    at = next((i for i, w in enumerate(words) if w in world.SHAPES), None)
    if at is None:
        raise ValueError(f"caption {caption!r} names no shape of {world.SHAPES}; expected a tiny-world caption")
    return " ".join(words[:at] + [token] + words[at:])


def _next_colour(colour: str) -> str:
    names = list(world.COLOURS)
    return names[(names.index(colour) + 1) % len(names)]


def contrast(prompt: str, subject: subjects.Subject) -> tuple[str, str, str]:
    """(kind, the prompt without the token, the same with one thing changed) for a subject prompt."""
    plain = " ".join(w for w in prompt.split() if w != subject.token)
    ask = subjects.parse(prompt, subject)
    if ask.colour is not None:
        return "attribute", plain, plain.replace(ask.colour, _next_colour(ask.colour), 1)
    if ask.relation is not None:
        colour, shape = ask.other
        return "relation", plain, plain[:plain.rindex(colour)] + f"{_next_colour(colour)} {shape}"
    if ask.position is not None:
        changed = plain.replace(world.POSITIONS[ask.position], world.POSITIONS[OPPOSITE_POSITION[ask.position]])
        return "position", plain, changed
    raise ValueError(f"prompt {prompt!r} asks for nothing beyond the subject; nothing to change for a contrast")


def subject_prompts(subject: subjects.Subject) -> list[str]:
    return subjects.evaluation_prompts(subject) + subjects.training_prompts(subject)


# ----------------------------------------------------------------------------------------------- sampling

def model_fingerprint(folder: str = TINY_PIPELINE_DIR) -> str:
    """A short hash of the shipped UNet and text encoder, so caches made with other weights are not reused."""
    digest = hashlib.sha256()
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        with open(os.path.join(folder, part), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


class Sampler:
    """r0_images with a disk cache: one file per (prompts, steps, guidance, seed, adapter)."""

    def __init__(self, pipe, folder: str, steps: int, guidance: float, seed: int):
        self.pipe, self.folder, self.steps, self.guidance, self.seed = pipe, folder, steps, guidance, seed
        os.makedirs(folder, exist_ok=True)

    def __call__(self, prompts: list[str], tag: str = "base") -> np.ndarray:
        key = hashlib.sha256(json.dumps([prompts, self.steps, self.guidance, self.seed, tag]).encode()).hexdigest()
        path = os.path.join(self.folder, f"{tag}_{self.steps}steps_{key[:16]}.npy")
        if os.path.exists(path):
            return np.load(path)
        images = r0_images(self.pipe, prompts, steps=self.steps, guidance=self.guidance, seed=self.seed)
        np.save(path + ".tmp.npy", images)   # written whole, then renamed: a cut run resumes
        os.replace(path + ".tmp.npy", path)
        return images


# ----------------------------------------------------------------------------------------------- 1. accuracy

def accuracy_rows(sample: Sampler, half: str, seeds: int) -> dict:
    prompts, groups = protocol.cell("positioned", half, seeds)
    plain = np.array([oracle.judge(im, p).correct for im, p in zip(sample(prompts), prompts)], dtype=float)
    shapes = np.array([world.parse_caption(p).objects[0].shape for p in prompts])
    rows = {}
    for subject in subjects.SUBJECTS:
        images = sample([insert_token(p, subject.token) for p in prompts])
        token = np.array([oracle.judge(im, p).correct for im, p in zip(images, prompts)], dtype=float)
        rows[subject.token] = {"all": compare(token, plain, groups),
                               "own_class": compare(token[shapes == subject.shape], plain[shapes == subject.shape],
                                                    groups[shapes == subject.shape])}
    return rows


def compare(token: np.ndarray, plain: np.ndarray, groups: np.ndarray) -> dict:
    without, with_token = protocol.summarize(plain, groups), protocol.summarize(token, groups)
    ratio = with_token["mean"] / without["mean"] if without["mean"] > 0 else float("nan")
    return {"without": without, "with": with_token, "ratio": ratio, "paired": protocol.paired(token, plain, groups)}


# ----------------------------------------------------------------------------------------------- 2. distances

def distance_rows(sample: Sampler, seeds: int) -> dict:
    rows = {}
    for subject in subjects.SUBJECTS:
        prompts = subject_prompts(subject)
        kinds, plain, changed = zip(*(contrast(p, subject) for p in prompts))
        expand = lambda texts: [t for t in texts for _ in range(seeds)]  # noqa: E731  caption-major, as cells
        token_images = sample(expand(prompts))
        d_same = np.abs(token_images - sample(expand(plain))).mean((1, 2, 3))
        d_changed = np.abs(token_images - sample(expand(changed))).mean((1, 2, 3))
        groups = np.repeat(np.arange(len(prompts)), seeds)
        per_prompt_same = np.bincount(groups, d_same) / seeds
        per_prompt_changed = np.bincount(groups, d_changed) / seeds
        closer = per_prompt_same < per_prompt_changed
        rows[subject.token] = {
            "same": float(d_same.mean()), "changed": float(d_changed.mean()), "closer_share": float(closer.mean()),
            "paired": protocol.paired(d_same, d_changed, groups), "prompts": len(prompts),
            "closer_by_kind": {k: float(np.mean([c for c, kk in zip(closer, kinds) if kk == k]))
                               for k in sorted(set(kinds))}}
    return rows


# ----------------------------------------------------------------------------------------------- 3. text encoder

def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Last hidden states [B, L, D] (padded as the UNet sees them), pooled outputs [B, D] and the token ids."""
    tokenizer = pipe.tokenizer
    batch = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    lengths = batch.attention_mask.sum(1)
    too_long = [p for p, n in zip(prompts, lengths.tolist()) if n > tokenizer.model_max_length]
    if too_long:
        raise ValueError(f"prompts {too_long} exceed the tokenizer's {tokenizer.model_max_length} tokens")
    with torch.no_grad():
        out = pipe.text_encoder(batch.input_ids.to(pipe.text_encoder.device))
    ids = [row[:n] for row, n in zip(batch.input_ids.tolist(), lengths.tolist())]
    return out.last_hidden_state.float().cpu(), out.pooler_output.float().cpu(), ids


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over positions of |a - b| / |b| (L2 over the feature axis)."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-8)).mean())


def hidden_state_rows(pipe, half: str) -> dict:
    rows = {}
    for subject in subjects.SUBJECTS:
        captions = protocol.captions("positioned", half) + protocol.captions("pair", half)
        pairs = [(insert_token(c, subject.token), c) for c in captions]
        pairs += [(p, contrast(p, subject)[1]) for p in subject_prompts(subject)]
        rows[subject.token] = token_difference(pipe, [a for a, _ in pairs], [b for _, b in pairs])
    return rows


def token_difference(pipe, with_token: list[str], plain: list[str]) -> dict:
    """Hidden states with the token against without it: at equal positions, at the positions after the token
    (shifted by its pieces: the causal encoder leaves the positions before it unchanged), and pooled."""
    states_t, pooled_t, ids_t = encode(pipe, with_token)
    states_p, pooled_p, ids_p = encode(pipe, plain)
    full, shifted = [], []
    for i, (a, b) in enumerate(zip(ids_t, ids_p)):
        start = next(j for j in range(len(b)) if a[j] != b[j])   # first position the token changed
        pieces = len(a) - len(b)
        full.append(relative(states_t[i], states_p[i]))
        shifted.append(relative(states_t[i, start + pieces:], states_p[i, start:states_p.shape[1] - pieces]))
    cosine = torch.nn.functional.cosine_similarity(pooled_t, pooled_p, dim=-1)
    return {"relative_l2": float(np.mean(full)), "relative_l2_after_token": float(np.mean(shifted)),
            "pooled_cosine": float(cosine.mean()), "prompts": len(with_token)}


# ----------------------------------------------------------------------------------------------- 4. DreamBooth

def dreambooth(pipe, scorer, subject: subjects.Subject, args, folder: str) -> str:
    """The subject's DreamBooth LoRA, trained once per setting under `folder` (train_rpo resumes a cut run)."""
    from rpo_core.train import RPOConfig, train_rpo

    config = RPOConfig(token=subject.token, class_name=subject.shape, prompts=subjects.training_prompts(subject),
                       iterations=args.dreambooth_steps, lr=args.lr, lora_rank=args.rank, preference=False,
                       select_best=False, validate_every=max(args.dreambooth_steps, 1))
    out = os.path.join(folder, f"dreambooth_{subject.name}_{config.fingerprint()}_{args.dreambooth_steps}")
    path = os.path.join(out, "rpo_lora.safetensors")
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("rpo_config") == json.dumps(dataclasses.asdict(config), default=str):
                return path
    references = torch.from_numpy(subjects.references(subject)).permute(0, 3, 1, 2).float()
    train_rpo(pipe, scorer, references, config, out)
    return path


def fidelity(sample: Sampler, subject: subjects.Subject, tag: str) -> dict:
    prompts = [p for p in subjects.evaluation_prompts(subject) for _ in range(EVAL_IMAGES_PER_PROMPT)]
    verdicts = [subjects.judge(im, p, subject) for im, p in zip(sample(prompts, tag), prompts)]
    return {"subject_ok": np.array([v.subject_ok for v in verdicts], dtype=float),
            "both_ok": np.array([v.subject_ok and v.prompt_ok for v in verdicts], dtype=float)}


def dreambooth_rows(args, folder: str) -> dict:
    from r0_core.rewards import load_reward

    scorer = load_reward("clip", TINY)
    rows = {}
    for subject in chosen(args):
        pipe = load_pipeline(args.model)   # fresh weights: a trainer must not start from another subject's adapter
        samplers = {s: Sampler(pipe, os.path.join(folder, "samples"), s, args.guidance, args.seed) for s in args.steps}
        base = {s: fidelity(sample, subject, "base") for s, sample in samplers.items()}
        path = dreambooth(pipe, scorer, subject, args, folder)
        lora.load_lora(pipe, path, name="dreambooth")
        lora.use_loras(pipe, [("dreambooth", 1.0)])
        trained = {s: fidelity(sample, subject, os.path.basename(os.path.dirname(path)))
                   for s, sample in samplers.items()}
        groups = np.repeat(np.arange(len(subjects.evaluation_prompts(subject))), EVAL_IMAGES_PER_PROMPT)
        rows[subject.token] = {str(s): {m: {"base": protocol.summarize(base[s][m], groups),
                                            "dreambooth": protocol.summarize(trained[s][m], groups)}
                                        for m in ("subject_ok", "both_ok")} for s in args.steps}
    return rows


# ----------------------------------------------------------------------------------------------- report

def chosen(args) -> list[subjects.Subject]:
    known = [s.token for s in subjects.SUBJECTS]
    unknown = [t for t in args.tokens if t not in known]
    if unknown:
        raise ValueError(f"--tokens {unknown} are not subject tokens; choose from {known}")
    return [s for s in subjects.SUBJECTS if s.token in args.tokens]


SAMPLER_COLUMNS = ("token (class)", "accuracy without", "with token", "ratio", "paired diff [CI]",
                   "own class: without / with / ratio", "distance to same prompt", "to one thing changed",
                   "same / changed", "share closer to same")


def sampler_row(subject: subjects.Subject, cell: dict) -> str:
    a, d = cell["accuracy"][subject.token], cell["distances"][subject.token]
    own = a["own_class"]
    values = [f"{subject.token} ({subject.shape})", protocol.fmt(a["all"]["without"]), protocol.fmt(a["all"]["with"]),
              f"{a['all']['ratio']:.2f}", protocol.fmt(a["all"]["paired"]),
              f"{own['without']['mean']:.0%} / {own['with']['mean']:.0%} / {own['ratio']:.2f}",
              f"{d['same']:.3f}", f"{d['changed']:.3f}", f"{d['same'] / d['changed']:.2f}", f"{d['closer_share']:.0%}"]
    return "| " + " | ".join(values) + " |"


def markdown(results: dict) -> str:
    lines = [f"Base model, {results['half']} half, {results['seeds']} seeds per caption, CFG {results['guidance']}, "
             f"R0 sampler. Target: accuracy with the token >= {TARGET_RATIO:.0%} of without.", ""]
    for steps, cell in results["sampler"].items():
        lines += [f"## {steps} steps", "", "| " + " | ".join(SAMPLER_COLUMNS) + " |",
                  "|" + "---|" * len(SAMPLER_COLUMNS)]
        lines += [sampler_row(s, cell) for s in subjects.SUBJECTS] + [""]
    lines += ["## Text encoder (last hidden states with vs without the token)", "",
              "| token | relative L2, all positions | after the token (shifted) | pooled cosine |", "|---|---|---|---|"]
    for token, h in results["hidden_states"].items():
        lines.append(f"| {token} | {h['relative_l2']:.3f} | {h['relative_l2_after_token']:.3f} | "
                     f"{h['pooled_cosine']:.3f} |")
    if results.get("dreambooth"):
        lines += ["", f"## DreamBooth, {results['dreambooth_steps']} steps: subject oracle on the evaluation prompts "
                  f"({EVAL_IMAGES_PER_PROMPT} images each)", "",
                  "| token | steps | base subject | DreamBooth subject | base subject+prompt "
                  "| DreamBooth subject+prompt |",
                  "|---|---|---|---|---|---|"]
        for token, by_steps in results["dreambooth"].items():
            for steps, m in by_steps.items():
                lines.append(f"| {token} | {steps} | {protocol.fmt(m['subject_ok']['base'])} | "
                             f"{protocol.fmt(m['subject_ok']['dreambooth'])} | {protocol.fmt(m['both_ok']['base'])} | "
                             f"{protocol.fmt(m['both_ok']['dreambooth'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 50])
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, default=protocol.SEEDS, help="noise seeds per caption")
    parser.add_argument("--seed", type=int, default=0, help="image i of a cell starts from noise seed + i")
    parser.add_argument("--half", default="test", choices=protocol.HALVES)
    parser.add_argument("--no-dreambooth", action="store_true", help="skip part 4 (training a LoRA per subject)")
    parser.add_argument("--dreambooth-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", nargs="+", default=[s.token for s in subjects.SUBJECTS],
                        help="subjects to fine-tune in part 4 (parts 1-3 always measure all three)")
    parser.add_argument("--model", default=TINY, help="the tiny-sd pipeline folder to measure (default: shipped)")
    parser.add_argument("--name", default="rare_tokens", help="results file name")
    parser.add_argument("--out", default="out/benchmarks/rare_tokens", help="cache of samples and LoRAs")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args(argv)
    chosen(args)
    torch.set_num_threads(1)
    folder = os.path.join(args.out, model_fingerprint(TINY_PIPELINE_DIR if args.model == TINY else args.model))
    pipe = load_pipeline(args.model)
    results = {"half": args.half, "seeds": args.seeds, "guidance": args.guidance, "target_ratio": TARGET_RATIO,
               "model": os.path.basename(folder), "sampler": {},
               "hidden_states": hidden_state_rows(pipe, args.half)}
    for steps in args.steps:
        sample = Sampler(pipe, os.path.join(folder, "samples"), steps, args.guidance, args.seed)
        results["sampler"][str(steps)] = {"accuracy": accuracy_rows(sample, args.half, args.seeds),
                                          "distances": distance_rows(sample, args.seeds)}
        print(f"{steps} steps: accuracy ratio with/without token", {t: round(r["all"]["ratio"], 3) for t, r in
                                                                    results["sampler"][str(steps)]["accuracy"].items()},
              flush=True)
    if not args.no_dreambooth:
        results["dreambooth_steps"] = args.dreambooth_steps
        results["dreambooth"] = dreambooth_rows(args, folder)
    text = markdown(results)
    paths = protocol.write_results(args.name, results, text, out=args.results, argv=argv)
    print(text)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
