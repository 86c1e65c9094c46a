"""Subjects for RPO in the tiny world: two-tone shapes the base model never saw, their reference images, a
DreamBench-like prompt list, and an oracle that checks both the subject and the rest of the prompt.

A subject is a shape with a fixed two-colour pattern (a ring, a left/right split, top/bottom bands). The base
model only ever drew one-colour shapes, so drawing the pattern on request is exactly what subject fine-tuning
has to teach. Each subject has a rare token built from word pieces the tiny tokenizer knows but never saw as a
word ("vum" is v·u·m), the tiny world's "sks". Prompts read like the world's captions with the token in the
colour's place: "a vum circle on the left", "a vum circle left of a red square", "a green vum circle".
"""
from __future__ import annotations

import colorsys
import dataclasses
import os
import random
from typing import Optional

import numpy as np

from . import oracle
from .world import COLOURS, IMAGE_SIZE, POSITIONS, RELATIONS, SHAPES, _centre_for_position, _layout_pair, shape_mask

PATTERN_SHARE = 0.1    # oracle: each of the subject's two colours must cover this much of the object
PATTERN_PURITY = 0.6   # ...and together this much (the rest is soft edges and blur)
ATTRIBUTE_SHARE = 0.3  # an attribute prompt's colour must cover this much of the subject
LOOSE_SATURATION = 0.15   # pixel colour naming inside objects (see _colour_names)
LOOSE_HUE_ERROR = 45.0


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str                   # folder name in the DreamBench layout
    token: str                  # the rare token, [V]
    shape: str                  # the class noun
    pattern: str                # "ring": outer/inner; "split": left/right; "bands": top/bottom
    colours: tuple[str, str]    # (outer, inner) / (left, right) / (top, bottom)

    def prompt(self, rest: str = "", colour: Optional[str] = None) -> str:
        head = f"a {colour + ' ' if colour else ''}{self.token} {self.shape}"
        return f"{head} {rest}".strip()


SUBJECTS = (
    Subject("ring_circle", "vum", "circle", "ring", ("yellow", "blue")),
    Subject("split_square", "bip", "square", "split", ("red", "green")),
    Subject("banded_triangle", "qud", "triangle", "bands", ("purple", "yellow")),
)
# Two more subjects for the mini DreamBench only (benchmarks/rpo_mini_dreambench.py): their tokens are the next
# words of the nonsense pool (world.nonsense_words), so the world treats them as it treats vum, bip and qud.
MORE_SUBJECTS = (
    Subject("split_circle", "taf", "circle", "split", ("purple", "green")),
    Subject("banded_square", "pud", "square", "bands", ("green", "purple")),
)
REFERENCES_PER_SUBJECT = 5

# The 25 evaluation prompts per subject, by DreamBench's kinds; `{}` is "a [V] <class>". Training prompts (below)
# use other second objects, so evaluation measures what fine-tuning did not see, as in DreamBench.
RECONTEXTUALISATION = [f"{{}} {phrase}" for phrase in POSITIONS.values()]
RELATION = [f"{{}} {relation} a {other}" for relation in RELATIONS
            for other in ("red square", "green triangle", "blue circle", "purple square")]
ATTRIBUTE = ["a red {}", "a green {}", "a blue {}", "a purple {}"]
TRAINING = [f"{{}} {relation} a {other}" for relation, other in (
    ("left of", "yellow triangle"), ("right of", "purple circle"), ("above", "red circle"),
    ("below", "blue square"), ("left of", "green circle"), ("right of", "yellow square"),
    ("above", "blue triangle"), ("below", "purple triangle"))]


# Validation prompts (choosing checkpoints): second objects that neither the training nor the evaluation prompts
# use, and the one colour the attribute prompts leave out, so training, validation and test prompts are disjoint.
VALIDATION = [f"{{}} {relation} a {other}" for relation in RELATIONS
              for other in ("red triangle", "green square", "yellow circle")] + ["a yellow {}"]


def _fill(template: str, subject: Subject) -> str:
    if template.startswith("a ") and template.endswith(" {}"):   # attribute: "a <colour> [V] <class>"
        return subject.prompt(colour=template[2:-3])
    return template.format(subject.prompt())


def evaluation_prompts(subject: Subject) -> list[str]:
    return [_fill(t, subject) for t in RECONTEXTUALISATION + RELATION + ATTRIBUTE]


def validation_prompts(subject: Subject) -> list[str]:
    return [_fill(t, subject) for t in VALIDATION]


def training_prompts(subject: Subject) -> list[str]:
    return [_fill(t, subject) for t in TRAINING]


def training_prompts_for(token: str, shape: str) -> list[str]:
    """The eight training prompts for any token and class noun, in words the tiny tokenizer can read."""
    return training_prompts(Subject("", token, shape, "", ("", "")))


# ----------------------------------------------------------------------------------------------- rendering

def subject_coverage(subject: Subject, cx: float, cy: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage maps of the subject's two colours (they sum to the shape's coverage)."""
    whole = shape_mask(subject.shape, cx, cy, r)
    if subject.pattern == "ring":
        inner = shape_mask(subject.shape, cx, cy, 0.55 * r)
        return whole - inner, inner
    s = 4   # supersampled half-plane, so the dividing line is antialiased like the outline
    coords = (np.arange(IMAGE_SIZE * s) + 0.5) / s
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if subject.pattern == "split":
        first = (x < cx).reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3))
    elif subject.pattern == "bands":   # an upright triangle is narrow at the top: split it near equal areas
        first = (y < cy - r + 1.3 * r).reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3))
    else:
        raise ValueError(f"unknown pattern {subject.pattern!r}; expected ring, split or bands")
    return whole * first, whole * (1 - first)


def _paint(image, cover, colour, rng):
    rgb = np.clip(np.array(COLOURS[colour]) + np.array([rng.uniform(-0.05, 0.05) for _ in range(3)]), 0, 1)
    return image * (1 - cover[..., None]) + rgb * cover[..., None]


def render(subject: Subject, prompt: str, seed: int) -> np.ndarray:
    """An image (H, W, 3) in [0, 1] that shows `prompt` (a subject prompt) correctly."""
    ask = parse(prompt, subject)
    rng = random.Random(seed)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), rng.uniform(0.10, 0.28), dtype=np.float32)
    if ask.relation is not None:
        r, r_other = rng.uniform(4.5, 5.5), rng.uniform(4.0, 5.0)
        (cx, cy), (ox, oy) = _layout_pair(rng, ask.relation, r, r_other)
        image = _paint(image, shape_mask(ask.other[1], ox, oy, r_other), ask.other[0], rng)
    else:
        r = rng.uniform(5.5, 7.5)   # a touch larger than plain objects, so the pattern reads at 32 px
        cx, cy = _centre_for_position(rng, ask.position, r)
    colours = subject.colours
    if ask.colour is not None:   # recoloured: the named colour replaces the first, keeping the pattern two-tone
        colours = (ask.colour, colours[1] if ask.colour != colours[1] else colours[0])
    for cover, colour in zip(subject_coverage(subject, cx, cy, r), colours):
        image = _paint(image, cover, colour, rng)
    return image.astype(np.float32)


def references(subject: Subject, n: int = REFERENCES_PER_SUBJECT, seed: int = 0) -> np.ndarray:
    """n photos of the subject alone ("a [V] <class>"), at various places and sizes: [n, H, W, 3] in [0, 1]."""
    return np.stack([render(subject, subject.prompt(), seed * 1000 + (SUBJECTS + MORE_SUBJECTS).index(subject) * 100 + i)
                     for i in range(n)])


def write_dreambench(root: str, seed: int = 0) -> str:
    """The mini DreamBench in the official layout: <root>/dataset/<subject>/NN.png and prompts_and_classes.txt
    (lossless PNG: JPEG would smear a 32-pixel pattern). Returns the dataset folder."""
    from PIL import Image

    dataset = os.path.join(root, "dataset")
    for subject in SUBJECTS:
        os.makedirs(os.path.join(dataset, subject.name), exist_ok=True)
        for i, image in enumerate(references(subject, seed=seed)):
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(
                os.path.join(dataset, subject.name, f"{i:02d}.png"))
    # "{}" stands for "a [V] <class>" in our lists, and an attribute goes between "a" and [V]
    templates = [t.replace("{}", "a {0} {1}") if t.startswith("{}") else t.replace("{}", "{0} {1}")
                 for t in RECONTEXTUALISATION + RELATION + ATTRIBUTE]
    lines = ["Classes", "", "subject_name,class"] + [f"{s.name},{s.shape}" for s in SUBJECTS]
    for section in ("Object Prompts", "Live Subject Prompts"):   # no live subjects here; both lists alike
        lines += ["", section, "", "prompt_list = ["]
        lines += [f"'{t}'.format(unique_token, class_token)," for t in templates]
        lines += ["]"]
    with open(os.path.join(dataset, "prompts_and_classes.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return dataset


# ----------------------------------------------------------------------------------------------- the oracle

@dataclasses.dataclass(frozen=True)
class Ask:
    """What a subject prompt asks for beyond the subject itself."""
    position: Optional[str] = None
    relation: Optional[str] = None
    other: Optional[tuple[str, str]] = None   # (colour, shape) of the second object
    colour: Optional[str] = None              # attribute: the subject recoloured


def parse(prompt: str, subject: Subject) -> Ask:
    words = prompt.strip().lower().split()
    colour = None
    if len(words) > 1 and words[1] in COLOURS:
        colour, words = words[1], words[:1] + words[2:]
    if words[:3] != ["a", subject.token, subject.shape]:
        raise ValueError(f"prompt {prompt!r} is not a prompt for subject {subject.name}: expected it to start "
                         f"with {subject.prompt()!r} (or 'a <colour> {subject.token} {subject.shape}')")
    rest = " ".join(words[3:])
    if not rest:
        return Ask(colour=colour)
    for key, phrase in POSITIONS.items():
        if rest == phrase:
            return Ask(position=key, colour=colour)
    for relation in RELATIONS:
        tail = rest[len(relation) + 1:].split() if rest.startswith(relation + " ") else []
        if len(tail) == 3 and tail[0] == "a" and tail[1] in COLOURS and tail[2] in SHAPES:
            return Ask(relation=relation, other=(tail[1], tail[2]), colour=colour)
    raise ValueError(f"prompt {prompt!r}: after {subject.prompt()!r} expected nothing, a position or "
                     f"'<relation> a <colour> <shape>'")


@dataclasses.dataclass
class SubjectVerdict:
    subject_ok: bool   # the subject is there: its shape and its two-tone pattern
    prompt_ok: bool    # the rest of the prompt: position, the second object and the relation, or the colour
    valid: bool        # the right number of clean objects and nothing else


def _colour_names(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's nearest named hue ("" when greyish or far from every hue). Looser than the oracle's naming of
    whole objects: a model draws a small inner part of a pattern darker and duller than the reference, and a
    person still calls a dull blue centre blue."""
    top, low = rgb.max(1), rgb.min(1)
    saturation = (top - low) / np.maximum(top, 1e-6)
    hue = np.array([colorsys.rgb_to_hsv(*px)[0] * 360 for px in np.clip(rgb, 0, 1)])
    named = np.array([colorsys.rgb_to_hsv(*c)[0] * 360 for c in COLOURS.values()])
    error = np.abs(hue[:, None] - named[None])
    error = np.minimum(error, 360 - error)
    names = np.array(list(COLOURS))[error.argmin(1)]
    return np.where((saturation >= LOOSE_SATURATION) & (top >= 0.15) & (error.min(1) <= LOOSE_HUE_ERROR), names, "")


def _regions(image: np.ndarray):
    """Foreground regions (not split by colour: a subject is two-tone), each with its pixels' colour names."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(oracle._smooth(image) - background, axis=-1)
    regions = [p for p in oracle._components(distance > oracle.FOREGROUND_DISTANCE)
               if len(p) >= oracle.MIN_STRAY_AREA]
    objects = [_fill_holes(p) for p in regions if len(p) >= oracle.MIN_OBJECT_AREA]
    names = [_colour_names(image[p[:, 0], p[:, 1]]) for p in objects]
    raw = np.linalg.norm(image - background, axis=-1)
    return objects, names, len(regions) - len(objects), raw


def _fill_holes(pixels: np.ndarray) -> np.ndarray:
    """The region plus what it encloses: a dim centre (a ring drawn with a dull core) is part of the object."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    for hole in oracle._components(~mask):
        ys, xs = hole[:, 0], hole[:, 1]
        if ys.min() > 0 and xs.min() > 0 and ys.max() < IMAGE_SIZE - 1 and xs.max() < IMAGE_SIZE - 1:
            mask[ys, xs] = True
    return np.argwhere(mask)


def _shape_of(pixels: np.ndarray, raw_distance: np.ndarray) -> str:
    """The oracle's shape fit on a coverage map: each pixel's unsmoothed distance from the background relative
    to the region's solid interior (a two-tone object has no single colour to project on, as the oracle does);
    enclosed pixels count as covered."""
    coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    d = raw_distance[pixels[:, 0], pixels[:, 1]]
    coverage[pixels[:, 0], pixels[:, 1]] = np.clip(d / max(np.percentile(d, 75), 1e-6), 0, 1)
    inner = np.zeros_like(coverage, dtype=bool)
    inner[pixels[:, 0], pixels[:, 1]] = True
    inner &= np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
    coverage[inner] = 1.0   # interior pixels (away from the edge) are inside whatever their colour
    return oracle._name_shape(coverage)


def _pattern_ok(subject: Subject, pixels: np.ndarray, names: np.ndarray, colours: tuple[str, str]) -> bool:
    a, b = (names == colours[0]), (names == colours[1])
    n = len(names)
    if a.sum() < PATTERN_SHARE * n or b.sum() < PATTERN_SHARE * n or (a | b).sum() < PATTERN_PURITY * n:
        return False
    centre = pixels.mean(0)
    if subject.pattern == "ring":
        spread = lambda m: np.linalg.norm(pixels[m] - centre, axis=1).mean()  # noqa: E731
        return spread(a) > spread(b)
    axis = 1 if subject.pattern == "split" else 0   # pixels are (y, x)
    return pixels[a, axis].mean() < pixels[b, axis].mean()


def judge(image: np.ndarray, prompt: str, subject: Subject) -> SubjectVerdict:
    """Does `image` (H, W, 3 in [0, 1]) show the subject, and the rest of what `prompt` asks for?"""
    image = np.asarray(image, dtype=np.float32)
    ask = parse(prompt, subject)
    objects, names, strays, raw = _regions(image)
    wanted = 2 if ask.relation is not None else 1
    other = None
    if ask.other is not None:   # the second object: one-colour, the named colour and shape
        for i, (p, n) in enumerate(zip(objects, names)):
            if (n == ask.other[0]).mean() > PATTERN_PURITY and _shape_of(p, raw) == ask.other[1]:
                other = i
                break
    candidates = [i for i in range(len(objects)) if i != other]
    if not candidates:
        return SubjectVerdict(False, False, False)
    main = max(candidates, key=lambda i: len(objects[i]))
    pixels, colour_names = objects[main], names[main]
    shape_ok = _shape_of(pixels, raw) == subject.shape
    if ask.colour is None:
        subject_ok = shape_ok and _pattern_ok(subject, pixels, colour_names, subject.colours)
        prompt_ok = True
    else:   # recoloured: still two-tone in the subject's layout, and the named colour takes a real share
        shares = {c: (colour_names == c).mean() for c in set(colour_names.tolist()) if c}
        two = sorted(shares, key=shares.get, reverse=True)[:2]
        subject_ok = shape_ok and len(two) == 2 and (_pattern_ok(subject, pixels, colour_names, tuple(two))
                                                     or _pattern_ok(subject, pixels, colour_names, tuple(two[::-1])))
        prompt_ok = shares.get(ask.colour, 0.0) >= ATTRIBUTE_SHARE
    ys, xs = pixels.mean(0) + 0.5
    found = oracle.Detection(None, subject.shape, xs / IMAGE_SIZE, ys / IMAGE_SIZE, len(pixels))
    if ask.position is not None:
        prompt_ok = oracle._position_ok(found, ask.position)
    if ask.relation is not None:
        if other is None:
            prompt_ok = False
        else:
            oy, ox = objects[other].mean(0) + 0.5
            second = oracle.Detection(ask.other[0], ask.other[1], ox / IMAGE_SIZE, oy / IMAGE_SIZE, 0)
            prompt_ok = oracle._relation_ok(found, second, ask.relation)
    valid = len(objects) == wanted and strays == 0
    return SubjectVerdict(bool(subject_ok), bool(prompt_ok), bool(valid))


def main(argv=None):
    """`python -m r0_core.tiny.subjects --out DIR`: the built-in subjects' reference photos as folders, one per
    subject, for `python -m rpo_core.train --references` and the RPO Load References node."""
    from .. import cli

    parser = cli.make_parser("r0_core.tiny.subjects", main.__doc__)
    parser.add_argument("--out", default="out/tiny-dreambench", help="where dataset/<subject>/NN.png is written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference photos")
    args = parser.parse_args(argv)
    dataset = write_dreambench(args.out, args.seed)
    for s in SUBJECTS:
        print(f"{os.path.join(dataset, s.name)}  --token {s.token} --class-name {s.shape}  ({s.pattern} "
              f"{'/'.join(s.colours)})")


if __name__ == "__main__":
    main()
