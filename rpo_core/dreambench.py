"""DreamBench (DreamBooth, Ruiz et al. 2023), the subject-driven generation benchmark, with its official protocol.

Data: google/dreambooth's `dataset/` folder as published: `<root>/<subject>/*.jpg` and `prompts_and_classes.txt`
(a `subject_name,class` table for the 30 subjects, then 25 "Object Prompts" and 25 "Live Subject Prompts"
templates). Any subset of the subject folders may be present. Subjects of a live class (dog, cat: 9 of the 30)
get the live prompts, the others the object prompts, each formatted with the unique token and the class noun.

Metrics, for each subject, over `images_per_prompt` (4) images per prompt, 100 images per subject:
  DINO   = mean over (generated, real) pairs of cos(DINO CLS embedding of each)
  CLIP-I = the same with CLIP image embeddings
  CLIP-T = mean over generated images of max(cos(CLIP image, CLIP text of the prompt without the token), 0)
and their means over subjects (all, object, live). Every subject's images are made from the same seeds
(`prompt_seeds`), so two runs, or a base model and a fine-tuned one, start from the same noise.

`python -m rpo_core.dreambench --data <root> --dino <folder> --clip <folder> --model <tiny|folder> --out <dir>`
evaluates a pipeline, optionally with one LoRA per subject (`--lora dog=dog.safetensors`)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from r0_core import cli
from r0_core.files import atomic_write
from r0_core.tiny.evaluate import grid

from .references import fit, image_files, load_image

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts_and_classes.txt"
TOKEN = "sks"  # DreamBooth's rare-token identifier
LIVE_CLASSES = ("dog", "cat")  # the official live subjects: dog, dog2, dog3, dog5-dog8, cat, cat2
GRID_CELL = 256  # grid images are shrunk to at most this many pixels a side (a person looks at them, no metric)

# one template line of the prompts file: 'a {0} {1} in the jungle'.format(unique_token, class_token),
TEMPLATE = re.compile(r"""^(?P<q>['"])(?P<body>(?:\\.|(?!(?P=q)).)*)(?P=q)"""
                      r"""\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?$""")
SECTIONS = {"subject_name,class": "classes", "object prompts": "object", "live subject prompts": "live"}

Generate = Callable[["Subject", list[str], list[int]], torch.Tensor]  # -> images [B, 3, H, W] in 0..1


@dataclass(frozen=True)
class Subject:
    name: str  # the folder name, e.g. "dog2"
    class_name: str  # the class noun of prompts_and_classes.txt, e.g. "dog"
    image_paths: tuple[str, ...]  # the real images, sorted by name
    live: bool  # a live subject gets the live prompts


@dataclass(frozen=True)
class DreamBench:
    root: str  # the folder holding the subject folders and prompts_and_classes.txt
    subjects: tuple[Subject, ...]  # those present on disk, sorted by name
    object_prompts: tuple[str, ...]  # templates: {0} is the unique token, {1} the class noun
    live_prompts: tuple[str, ...]

    def templates_for(self, subject: Subject | str) -> tuple[str, ...]:
        return self.live_prompts if self.subject(subject).live else self.object_prompts

    def prompts_for(self, subject: Subject | str, token: str = TOKEN) -> list[str]:
        """The subject's prompts, e.g. "a sks dog in the jungle" (replace, not str.format: the file is data)."""
        subject = self.subject(subject)
        _check_token(token)
        return [t.replace("{0}", token).replace("{1}", subject.class_name) for t in self.templates_for(subject)]

    def subject(self, subject: Subject | str) -> Subject:
        """A subject by name (a Subject is returned as it is)."""
        if isinstance(subject, Subject):
            return subject
        found = [s for s in self.subjects if s.name == subject]
        if not found:
            raise ValueError(f"subject {subject!r} is not in {self.root}; present: "
                             f"{', '.join(s.name for s in self.subjects)}")
        return found[0]

    def select(self, names: Optional[Iterable[Subject | str]] = None) -> list[Subject]:
        """These subjects (names or Subjects), or all of them for None; an absent name is an error."""
        return list(self.subjects) if names is None else [self.subject(n) for n in names]


# ----------------------------------------------------------------------------------------------- reading

def find_dataset(root: str | os.PathLike) -> str:
    """The folder holding prompts_and_classes.txt: `root` itself or `root/dataset` (the repository's layout)."""
    root = os.fspath(root)
    for folder in (root, os.path.join(root, "dataset")):
        if os.path.isfile(os.path.join(folder, PROMPTS_FILE)):
            return folder
    raise FileNotFoundError(f"no {PROMPTS_FILE} in {root} or {os.path.join(root, 'dataset')}; expected "
                            f"google/dreambooth's dataset folder: <subject>/*.jpg beside {PROMPTS_FILE}")


def parse_prompts_file(path: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class, object templates, live templates) of prompts_and_classes.txt, read line by line: the
    templates are matched by a regular expression, never evaluated."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    classes, templates, section = {}, {"object": [], "live": []}, None
    for number, line in enumerate((line.strip() for line in lines), 1):
        if line.lower() in SECTIONS:
            section = SECTIONS[line.lower()]
        elif (match := TEMPLATE.match(line)) is not None:
            if section not in templates:
                raise ValueError(f"{path}, line {number}: a prompt template outside the 'Object Prompts' and "
                                 f"'Live Subject Prompts' sections; put those headings before their lists")
            templates[section].append(re.sub(r"\\(.)", r"\1", match["body"]))
        elif section == "classes":
            if "," not in line:
                section = None  # a blank line ends the table
                continue
            name, class_name = (part.strip() for part in line.split(",", 1))
            classes[name] = class_name
    return classes, templates["object"], templates["live"]


def read_dreambench(root: str | os.PathLike, live_classes: Sequence[str] = LIVE_CLASSES) -> DreamBench:
    """The subject folders present under `root` (or `root/dataset`) and the prompt templates."""
    folder = find_dataset(root)
    prompts_path = os.path.join(folder, PROMPTS_FILE)
    classes, object_prompts, live_prompts = parse_prompts_file(prompts_path)
    if not classes:
        raise ValueError(f"{prompts_path} has no 'subject_name,class' table; expected that header line followed "
                         f"by one 'subject,class' line per subject")
    subjects = tuple(_read_subject(folder, name, classes, live_classes, prompts_path)
                     for name in _subject_dirs(folder))
    sections = ((False, object_prompts, "Object Prompts"), (True, live_prompts, "Live Subject Prompts"))
    for live, templates, heading in sections:
        if any(s.live == live for s in subjects) and not templates:
            raise ValueError(f"{prompts_path} has no '{heading}' templates; expected a '{heading}' line, then "
                             f"lines like 'a {{0}} {{1}} in the jungle'.format(unique_token, class_token),")
    return DreamBench(folder, subjects, tuple(object_prompts), tuple(live_prompts))


def _subject_dirs(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)) and not n.startswith("."))
    if not names:
        raise ValueError(f"{folder} holds no subject folders; expected <subject>/*.jpg beside {PROMPTS_FILE}")
    return names


def _read_subject(folder: str, name: str, classes: dict[str, str], live_classes: Sequence[str],
                  prompts_path: str) -> Subject:
    path = os.path.join(folder, name)
    if name not in classes:
        raise ValueError(f"subject folder {path} is not listed in {prompts_path}; add a line '{name},<class noun>' "
                         f"to its subject_name,class table, or move the folder out")
    paths = image_files(path)
    if not paths:
        raise ValueError(f"subject folder {path} holds no images; expected its real photos (*.jpg, *.png, ...)")
    return Subject(name, classes[name], tuple(paths), classes[name] in live_classes)


# ----------------------------------------------------------------------------------------------- metrics

def _check_token(token: str) -> None:
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"token={token!r}; expected the non-empty identifier the subject was trained with, "
                         f"e.g. {TOKEN!r}")


def strip_token(prompt: str, token: str = TOKEN) -> str:
    """The prompt without the unique token, as CLIP-T reads it: "a sks dog in the snow" -> "a dog in the snow"."""
    _check_token(token)
    words = r"\s+".join(re.escape(w) for w in token.split())
    return " ".join(re.sub(rf"(?<!\S){words}(?!\S)", " ", prompt).split())


def prompt_seeds(prompt_index: int, images_per_prompt: int, seed: int = 0) -> list[int]:
    """Seeds of a prompt's images: seed + images_per_prompt · prompt_index + k, k < images_per_prompt; the same
    for every subject and run, so every image can be remade alone."""
    start = seed + images_per_prompt * prompt_index
    return list(range(start, start + images_per_prompt))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed(encoder, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] (float32, CPU), `batch_size` images at a time."""
    device = _device(encoder)
    return torch.cat([encoder.image_embeds(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def real_embeds(dino, clip, paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO and CLIP embeddings of the real photos, read one at a time (a full-size photo is ~150 MB as floats)
    and given to the encoders as they are: each encoder resizes and crops as its processor says."""
    pairs = [(embed(dino, image[None]), embed(clip, image[None])) for image in map(load_image, paths)]
    return torch.cat([d for d, _ in pairs]), torch.cat([c for _, c in pairs])


@torch.no_grad()
def score_images(images: torch.Tensor, clip_prompt: str, real_dino: torch.Tensor, real_clip: torch.Tensor,
                 dino, clip, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per image [B]: DINO and CLIP-I (mean cosine to the real images' embeddings) and CLIP-T (max(cos, 0) with
    `clip_prompt`, as torchmetrics' clip_score without its factor 100)."""
    clip_images = embed(clip, images, batch_size)
    text = clip.text_embeds([clip_prompt]).float().cpu()
    return {"dino": (embed(dino, images, batch_size) @ real_dino.T).mean(1),
            "clip_i": (clip_images @ real_clip.T).mean(1),
            "clip_t": (clip_images @ text.T)[:, 0].clamp(min=0)}


def _generated(generate: Generate, subject: Subject, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    images = generate(subject, prompts, seeds)
    if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[:2]) != (len(prompts), 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"generate returned {shape} for {len(prompts)} prompts of subject {subject.name}; "
                         f"expected float images [{len(prompts)}, 3, H, W] in 0..1")
    images = images.detach().float()
    if images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise ValueError(f"generate returned values in {images.min().item():.3f}..{images.max().item():.3f} for "
                         f"subject {subject.name}; expected 0..1 (map -1..1 images with (x + 1) / 2)")
    return images.clamp(0, 1)


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Small CPU copies for the grid: at most GRID_CELL pixels a side."""
    images = images.cpu()
    scale = GRID_CELL / max(images.shape[-2:])
    if scale >= 1:
        return images
    size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def evaluate_subject(bench: DreamBench, subject: Subject, generate: Generate, dino, clip, *, token: str = TOKEN,
                     images_per_prompt: int = 4, seed: int = 0, batch_size: int = 16, keep_images: bool = False,
                     on_prompt: Optional[Callable[[str], None]] = None) -> tuple[dict, Optional[torch.Tensor]]:
    """One subject's result dict and (with keep_images) its images as thumbnails [P·k, 3, h, w], prompt-major."""
    real_dino, real_clip = real_embeds(dino, clip, subject.image_paths)
    rows, scores, thumbnails = [], [], []
    for index, prompt in enumerate(bench.prompts_for(subject, token)):
        seeds = prompt_seeds(index, images_per_prompt, seed)
        images = _generated(generate, subject, [prompt] * images_per_prompt, seeds)
        clip_prompt = strip_token(prompt, token)
        score = score_images(images, clip_prompt, real_dino, real_clip, dino, clip, batch_size)
        rows.append({"prompt": prompt, "clip_prompt": clip_prompt, "seeds": seeds,
                     **{k: v.mean().item() for k, v in score.items()}})
        scores.append(score)
        if keep_images:
            small = _thumbnails(images)  # fitted to the first prompt's size, should a generator vary it
            thumbnails.append(fit(small, tuple(thumbnails[0].shape[-2:])) if thumbnails else small)
        if on_prompt is not None:
            on_prompt(prompt)
    per_image = {k: torch.cat([s[k] for s in scores]) for k in ("dino", "clip_i", "clip_t")}
    result = {"class": subject.class_name, "live": subject.live, **{k: v.mean().item() for k, v in per_image.items()},
              "n_images": len(per_image["dino"]), "n_references": len(real_dino), "per_prompt": rows}
    return result, (torch.cat(thumbnails) if keep_images else None)


def _mean(results: dict[str, dict]) -> Optional[dict]:
    if not results:
        return None
    return {**{k: sum(r[k] for r in results.values()) / len(results) for k in ("dino", "clip_i", "clip_t")},
            "n_subjects": len(results)}


def evaluate(bench: DreamBench, generate: Generate, dino, clip, *, token: str = TOKEN, images_per_prompt: int = 4,
             seed: int = 0, out_dir: Optional[str | os.PathLike] = None,
             subjects: Optional[Iterable[Subject | str]] = None, save_grids: bool = True, batch_size: int = 16,
             callback: Optional[Callable[[dict], None]] = None,
             run_key: Optional[Callable[[Subject], str]] = None) -> dict:
    """DreamBench scores of `generate` on `subjects` (default: all present).

    generate(subject, prompts, seeds) -> images [B, 3, H, W] in 0..1, one per (prompt, seed); it is called once
    per prompt with `images_per_prompt` copies of it and the seeds of `prompt_seeds`.
    dino, clip: scorers with `image_embeds` (DinoSimilarity, ClipScore; `text_embeds` for CLIP), e.g.
    load_reward("dino", folder) and load_reward("clip", folder).
    out_dir: writes <subject>.json (and <subject>.png, a grid with one row per prompt, unless save_grids is
    False) as each subject finishes, then results.json and results.md.
    callback({"i", "total", "subject", "prompt"}) after each prompt (i counts from 0 over all subjects).
    run_key(subject): what makes that subject's images (model, LoRA, sampler settings). With out_dir, a subject
    whose <subject>.json holds the same key, token, images_per_prompt and seed is read back instead of generated
    again, so a stopped run resumes where it stopped, and processes that split the subjects can be joined.

    Returns {"subjects": {name: {class, live, dino, clip_i, clip_t, n_images, n_references, per_prompt}},
    "mean", "object_mean", "live_mean": {dino, clip_i, clip_t, n_subjects} (None without such subjects),
    "settings"}.
    """
    _check_token(token)
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt!r}; expected a positive int (the protocol's is 4)")
    chosen = bench.select(subjects)
    total, done = sum(len(bench.templates_for(s)) for s in chosen), 0
    results = {}
    for subject in chosen:
        def on_prompt(prompt, name=subject.name):
            nonlocal done
            if callback is not None:
                callback({"i": done, "total": total, "subject": name, "prompt": prompt})
            done += 1
        key = None if run_key is None else f"{run_key(subject)}|{token}|{images_per_prompt}|{seed}"
        saved = _read_saved(out_dir, subject.name) if key is not None and out_dir is not None else None
        if saved is not None and saved.get("run_key") == key:
            results[subject.name] = saved
            for prompt in bench.prompts_for(subject, token):
                on_prompt(prompt)
            continue
        results[subject.name], thumbnails = evaluate_subject(
            bench, subject, generate, dino, clip, token=token, images_per_prompt=images_per_prompt, seed=seed,
            batch_size=batch_size, keep_images=out_dir is not None and save_grids, on_prompt=on_prompt)
        if key is not None:
            results[subject.name]["run_key"] = key
        logger.info("%s: DINO %.3f, CLIP-I %.3f, CLIP-T %.3f", subject.name, *(results[subject.name][k] for k in
                                                                          ("dino", "clip_i", "clip_t")))
        if out_dir is not None:
            write_subject(out_dir, subject.name, results[subject.name], thumbnails, images_per_prompt)
    summary = {"subjects": results, "mean": _mean(results),
               "object_mean": _mean({k: r for k, r in results.items() if not r["live"]}),
               "live_mean": _mean({k: r for k, r in results.items() if r["live"]}),
               "settings": {"data": bench.root, "token": token, "images_per_prompt": images_per_prompt, "seed": seed,
                            "seeds": f"seed + {images_per_prompt} * prompt index + k, the same for every subject"}}
    if out_dir is not None:
        write_results(out_dir, summary)
    return summary


# ----------------------------------------------------------------------------------------------- files

def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_saved(out_dir, name: str) -> Optional[dict]:
    path = os.path.join(out_dir, f"{name}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:   # a damaged file is measured again, not trusted
        logger.warning("%s is unreadable (%s); measuring %s again", path, e, name)
        return None


def _write_json(path: str, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Images [N, 3, H, W] in 0..1 as one RGB picture, `columns` a row, 2 white pixels apart."""
    return Image.fromarray(grid(images.permute(0, 2, 3, 1).numpy(), columns, scale=1))


def write_subject(out_dir, name: str, result: dict, thumbnails: Optional[torch.Tensor], columns: int) -> None:
    _write_json(os.path.join(out_dir, f"{name}.json"), result)
    if thumbnails is not None:
        picture = image_grid(thumbnails, columns)
        atomic_write(os.path.join(out_dir, f"{name}.png"), lambda tmp: picture.save(tmp, format="PNG"))


def markdown_table(summary: dict) -> str:
    """One row per subject, then the mean rows: `| subject | class | DINO | CLIP-I | CLIP-T |`."""
    def row(label, class_name, r):
        return f"| {label} | {class_name} | {r['dino']:.3f} | {r['clip_i']:.3f} | {r['clip_t']:.3f} |"

    lines = ["| subject | class | DINO | CLIP-I | CLIP-T |", "|---|---|---:|---:|---:|"]
    lines += [row(name, r["class"], r) for name, r in summary["subjects"].items()]
    for key, label in (("mean", "mean"), ("object_mean", "object mean"), ("live_mean", "live mean")):
        if summary[key] is not None:
            n = summary[key]["n_subjects"]
            lines.append(row(f"**{label}** ({n} subject{'s' if n != 1 else ''})", "", summary[key]))
    return "\n".join(lines)


def write_results(out_dir, summary: dict) -> None:
    settings = summary["settings"]
    text = (f"# DreamBench\n\n{settings['data']}: {settings['images_per_prompt']} images per prompt, token "
            f"{settings['token']!r}, seeds {settings['seeds']}.\n\n{markdown_table(summary)}\n")
    _write_json(os.path.join(out_dir, "results.json"), summary)
    _write_text(os.path.join(out_dir, "results.md"), text)


# ----------------------------------------------------------------------------------------------- command line

def pipeline_generator(pipe, loras: dict[str, str], *, steps: int = 4, guidance: float = 1.0,
                       eta: float = 0.0) -> Generate:
    """A `generate` for evaluate: the R0 sampler on `pipe`, with the subject's LoRA (loras: subject -> file) on
    and every other LoRA off, or the bare model for subjects without one."""
    from r0_core import lora
    from r0_core.generate import generate as sample

    names = {subject: lora.load_lora(pipe, path, name="dreambench_" + re.sub(r"[^A-Za-z0-9_-]", "_", subject))
             for subject, path in loras.items()}

    def generate(subject: Subject, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        lora.use_loras(pipe, [(names[subject.name], 1.0)] if subject.name in names else [])
        with torch.no_grad():
            return sample(pipe, prompts, steps=steps, guidance=guidance, eta=eta, seeds=seeds)[0]
    return generate


def parse_loras(items: Sequence[str], bench: DreamBench) -> dict[str, str]:
    """`subject=path` pairs -> {subject: path}, each subject present in the benchmark."""
    loras = {}
    for item in items:
        subject, sep, path = item.partition("=")
        if not sep or not subject or not path:
            raise ValueError(f"--lora {item!r}; expected subject=path/to/lora.safetensors")
        loras[bench.subject(subject).name] = path
    return loras


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from tqdm import tqdm

    from r0_core.loading import load_pipeline
    from r0_core.rewards import load_reward

    parser = cli.make_parser("rpo_core.dreambench", __doc__)
    parser.add_argument("--data", required=True, help="DreamBench dataset folder (or the folder holding dataset/)")
    parser.add_argument("--dino", required=True, help="DINO transformers folder (e.g. facebook/dino-vits16)")
    parser.add_argument("--clip", required=True, help="CLIP transformers folder (e.g. openai/clip-vit-base-patch32)")
    cli.add_model_arguments(parser, required=True)
    parser.add_argument("--lora", nargs="*", action="extend", default=[], metavar="SUBJECT=PATH",
                        help="a LoRA used for that subject's images (other subjects use the bare model)")
    parser.add_argument("--subjects", nargs="*", help="evaluate only these subjects (default: all present)")
    parser.add_argument("--steps", type=int, default=4, help="R0 sampler steps K")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1: off)")
    parser.add_argument("--eta", type=float, default=0.0, help="η of the R0 sampler")
    parser.add_argument("--token", default=TOKEN, help="the rare token the LoRAs were trained with")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="the protocol's is 4")
    parser.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    parser.add_argument("--no-grids", action="store_true", help="do not write <subject>.png image grids")
    parser.add_argument("--device", help="default: CUDA, else MPS, else CPU")
    parser.add_argument("--out", required=True, help="folder for results.md, results.json, <subject>.json/.png")
    args = parser.parse_args(argv)
    cli.setup_logging()
    from accelerate import PartialState

    # `accelerate launch -m rpo_core.dreambench ...` splits the subjects across processes; each writes its
    # subjects' files and the main process then joins them (read back by run_key)
    state = PartialState(cpu=args.device == "cpu")
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    bench = read_dreambench(args.data)
    loras = parse_loras(args.lora, bench)
    chosen = bench.select(args.subjects or None)
    settings = json.dumps({k: getattr(args, k) for k in ("model", "dino", "clip", "steps", "guidance", "eta")})

    def run_key(subject: Subject) -> str:
        path = loras.get(subject.name)
        weights = _file_digest(path) if path else "no LoRA"
        return hashlib.sha256(f"{settings}|{weights}".encode()).hexdigest()[:16]

    pipe = load_pipeline(args.model, device=device, **cli.model_kwargs(args))
    # encoders in float32: the metric is reported to three decimals, which bf16 embeddings would not hold
    dino = load_reward("dino", args.dino, device=device, dtype=torch.float32)
    clip = load_reward("clip", args.clip, device=device, dtype=torch.float32)
    bar = tqdm(desc="DreamBench", unit="prompt", disable=not state.is_main_process)

    def progress(info: dict) -> None:
        bar.total = info["total"]
        bar.set_postfix_str(info["subject"], refresh=False)
        bar.update(1)

    generate = pipeline_generator(pipe, loras, steps=args.steps, guidance=args.guidance, eta=args.eta)
    common = dict(token=args.token, images_per_prompt=args.images_per_prompt, seed=args.seed, out_dir=args.out,
                  save_grids=not args.no_grids, run_key=run_key)
    mine = chosen[state.process_index::state.num_processes]
    if mine:
        evaluate(bench, generate, dino, clip, subjects=mine, callback=progress, **common)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    summary = evaluate(bench, generate, dino, clip, subjects=chosen, **common)   # joins every process's files
    bar.close()
    print(markdown_table(summary))
    print(f"written to {os.path.join(args.out, 'results.md')}")
    return summary


if __name__ == "__main__":
    main()
