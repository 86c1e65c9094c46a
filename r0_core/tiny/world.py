"""The tiny world: seeded scenes of one or two coloured shapes, their captions and their pixels.

A scene is data (`Scene`), a caption is text made from it (`caption`), and `parse_caption` turns any caption of
this world back into the `Scene` it asks for, so the oracle can judge an image against a prompt alone.

Single-object captions name a colour, a shape and optionally a position ("a red circle on the left");
two-object captions name a spatial relation ("a red circle left of a blue square"). A fixed, seeded part of the
caption set is held out of training (`prompt_split`) so quality is measured on prompts the model never saw.

Training captions are varied as real captions are (`augment_caption`): some leave one object's colour out ("a
circle on the left" is a circle of any colour), and some carry a nonsense word before one object's noun ("a red
vum circle on the left"). The nonsense words (`nonsense_words`) are spelled from the tokenizer's word pieces and
appear with unrelated images, so they carry no visual meaning and the model learns to ignore them, as Stable
Diffusion ignores a rare token such as "sks" that CLIP saw with no consistent meaning. The RPO subjects' rare
tokens belong to that pool, so "a vum circle" draws a circle until fine-tuning gives "vum" a meaning.
"""
from __future__ import annotations

import dataclasses
import functools
import random
from typing import Optional

import numpy as np

IMAGE_SIZE = 32

# Saturated colours on a dark grey background: the oracle separates objects from background by colour distance
# and names them by hue, which stays stable under noise, blur and brightness drift.
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "yellow": (0.92, 0.88, 0.15),
    "green": (0.15, 0.78, 0.22),
    "blue": (0.20, 0.38, 0.95),
    "purple": (0.68, 0.25, 0.90),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "middle": "in the middle"}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}

BACKGROUND_RANGE = (0.10, 0.28)  # grey level of the background
RADIUS_RANGE = (4.5, 7.0)         # half-width of a lone object, in pixels at IMAGE_SIZE 32
PAIR_RADIUS_RANGE = (4.0, 5.5)    # half-width of each object of a pair, so that both fit with a clear gap
# every 3rd positioned and every 7th two-object caption (in a seeded order) is held out: 25 and 103 captions,
# enough for validation and test halves (r0_core.tiny.protocol)
HELD_OUT_EVERY = {"positioned": 3, "pair": 7}
NONSENSE_SHARE = 0.3              # training captions with one nonsense word inserted
COLOURLESS_SHARE = 0.15           # training captions with one object's colour left out
NONSENSE_POOL_SIZE = 256
SUBJECT_TOKENS = ("vum", "bip", "qud")   # the rare tokens of subjects.SUBJECTS, part of the nonsense pool


@dataclasses.dataclass(frozen=True)
class Obj:
    colour: Optional[str]   # None: the caption leaves the colour open, any colour is right
    shape: str


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a caption asks for: one object (with an optional position) or two objects and a relation."""
    objects: tuple[Obj, ...]
    position: Optional[str] = None   # single object only: a key of POSITIONS
    relation: Optional[str] = None   # two objects only: a key of RELATIONS, objects[0] <relation> objects[1]


def _phrase(obj: Obj) -> str:
    return f"a {obj.shape}" if obj.colour is None else f"a {obj.colour} {obj.shape}"


def caption(scene: Scene) -> str:
    first = _phrase(scene.objects[0])
    if scene.relation is not None:
        return f"{first} {scene.relation} {_phrase(scene.objects[1])}"
    if scene.position is not None:
        return f"{first} {POSITIONS[scene.position]}"
    return first


def parse_caption(text: str) -> Scene:
    """The scene a caption of this world asks for (an object's colour may be left out). Raises ValueError naming
    the caption if it is not one."""
    words = text.strip().lower().split()

    def obj_at(i: int) -> tuple[Obj, int]:
        """The object phrase starting at word i, and the index after it."""
        if len(words) >= i + 3 and words[i] == "a" and words[i + 1] in COLOURS and words[i + 2] in SHAPES:
            return Obj(words[i + 1], words[i + 2]), i + 3
        if len(words) >= i + 2 and words[i] == "a" and words[i + 1] in SHAPES:
            return Obj(None, words[i + 1]), i + 2
        raise ValueError(f"caption {text!r} is not a tiny-world caption: expected 'a [<colour>] <shape> ...' "
                         f"with colours {sorted(COLOURS)} and shapes {list(SHAPES)}")

    first, end = obj_at(0)
    rest = " ".join(words[end:])
    if not rest:
        return Scene((first,))
    for key, phrase in POSITIONS.items():
        if rest == phrase:
            return Scene((first,), position=key)
    for relation in RELATIONS:
        if rest.startswith(relation + " "):
            second, last = obj_at(end + len(relation.split()))
            if last == len(words):
                return Scene((first, second), relation=relation)
    raise ValueError(f"caption {text!r} is not a tiny-world caption: after 'a <colour> <shape>' expected nothing, "
                     f"a position {list(POSITIONS.values())} or a relation {list(RELATIONS)} and a second object")


def all_scenes() -> dict[str, list[Scene]]:
    """Every caption the world can make, by kind: 'single' (no position), 'positioned' and 'pair'."""
    objects = [Obj(c, s) for c in COLOURS for s in SHAPES]
    return {
        "single": [Scene((o,)) for o in objects],
        "positioned": [Scene((o,), position=p) for o in objects for p in POSITIONS],
        "pair": [Scene((a, b), relation=r) for a in objects for b in objects if a.colour != b.colour
                 for r in RELATIONS],
    }


def prompt_split(kind: str) -> tuple[list[Scene], list[Scene]]:
    """(train, held_out) scenes of one kind. Unpositioned single objects are never held out: every colour-shape
    pair must be seen in training; what is held out is its combination with a position or a relation."""
    scenes = all_scenes()[kind]
    if kind == "single":
        return scenes, []
    order = list(range(len(scenes)))
    random.Random(f"held-out-{kind}").shuffle(order)
    held = {i for n, i in enumerate(order) if n % HELD_OUT_EVERY[kind] == 0}
    return [s for i, s in enumerate(scenes) if i not in held], [s for i, s in enumerate(scenes) if i in held]


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def near_misses(scene: Scene) -> list[Scene]:
    """Scenes one edit away: another colour or shape for one object, another position, the opposite relation or
    the objects swapped. Captions of these are the hard negatives a reward model must tell from the truth."""
    out = []
    for i, o in enumerate(scene.objects):
        taken = {p.colour for j, p in enumerate(scene.objects) if j != i}
        for c in COLOURS:
            if c != o.colour and c not in taken:
                out.append(dataclasses.replace(scene, objects=scene.objects[:i] + (Obj(c, o.shape),)
                                               + scene.objects[i + 1:]))
        for s in SHAPES:
            if s != o.shape:
                out.append(dataclasses.replace(scene, objects=scene.objects[:i] + (Obj(o.colour, s),)
                                               + scene.objects[i + 1:]))
    if scene.position is not None:
        out += [dataclasses.replace(scene, position=p) for p in POSITIONS if p != scene.position]
    if scene.relation is not None:
        out.append(dataclasses.replace(scene, relation=OPPOSITE[scene.relation]))
        out.append(dataclasses.replace(scene, objects=scene.objects[::-1]))
    return out


def training_captions() -> list[str]:
    return [caption(s) for kind in ("single", "positioned", "pair") for s in prompt_split(kind)[0]]


def describes(asked: Scene, shown: Scene) -> bool:
    """Whether a caption of `asked` is true of an image of `shown`: the same objects, layout and relation, with a
    left-out colour matching any colour."""
    return (len(asked.objects) == len(shown.objects) and asked.position == shown.position
            and asked.relation == shown.relation
            and all(a.shape == b.shape and a.colour in (None, b.colour) for a, b in zip(asked.objects, shown.objects)))


# ----------------------------------------------------------------------------------------------- rare words

def vocabulary() -> list[str]:
    """Every word of the world's captions."""
    words = {"a"} | set(COLOURS) | set(SHAPES)
    for phrase in list(POSITIONS.values()) + list(RELATIONS):
        words |= set(phrase.split())
    return sorted(words)


@functools.lru_cache(maxsize=None)
def nonsense_words() -> tuple[str, ...]:
    """The seeded pool of words without a visual meaning: consonant-vowel-consonant words spelled from the
    tokenizer's pieces (as "sks" is spelled from CLIP's), the subjects' rare tokens first. The tokenizer spells
    each caption word from its letters (models.build_tokenizer), so a letter it has inside a word and a letter it
    has at a word's end make a word it can spell."""
    real = set(vocabulary())
    inner, last = {c for w in real for c in w[:-1]}, {w[-1] for w in real}
    vowels = sorted(set("aeiou") & inner)
    consonants = sorted(inner - set("aeiou"))
    finals = sorted(last - set("aeiou"))
    rng = random.Random("nonsense-words")
    pool = list(SUBJECT_TOKENS)
    while len(pool) < NONSENSE_POOL_SIZE:
        word = rng.choice(consonants) + rng.choice(vowels) + rng.choice(finals)
        if word not in real and word not in pool:
            pool.append(word)
    return tuple(pool)


def augment_caption(scene: Scene, rng: random.Random, nonsense_share: float = NONSENSE_SHARE,
                    colourless_share: float = COLOURLESS_SHARE) -> tuple[str, Scene]:
    """A training caption of `scene` as the data shows it, and the scene that caption asks for: with probability
    colourless_share one object's colour is left out, and independently with probability nonsense_share a
    nonsense word goes before one object's noun (it asks for nothing). The same draws whatever the shares."""
    objects = list(scene.objects)
    if rng.random() < colourless_share:
        i = rng.randrange(len(objects))
        objects[i] = Obj(None, objects[i].shape)
    asked = dataclasses.replace(scene, objects=tuple(objects))
    text = caption(asked)
    if rng.random() < nonsense_share:
        words = text.split()
        at = rng.choice([i for i, w in enumerate(words) if w in SHAPES])
        text = " ".join(words[:at] + [rng.choice(nonsense_words())] + words[at:])
    return text, asked


# ----------------------------------------------------------------------------------------------- layout

def _centre_for_position(rng: random.Random, position: Optional[str], r: float) -> tuple[float, float]:
    """Object centre in pixels. Positioned objects land well inside their named region (see oracle.POSITION_*)."""
    n = IMAGE_SIZE
    lo, hi = r + 1.0, n - r - 1.0
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if position == "left":
        x = rng.uniform(lo, 0.32 * n)
    elif position == "right":
        x = rng.uniform(0.68 * n, hi)
    elif position == "top":
        y = rng.uniform(lo, 0.32 * n)
    elif position == "bottom":
        y = rng.uniform(0.68 * n, hi)
    elif position == "middle":
        x, y = rng.uniform(0.44 * n, 0.56 * n), rng.uniform(0.44 * n, 0.56 * n)
    if position in ("left", "right"):
        y = rng.uniform(max(lo, 0.25 * n), min(hi, 0.75 * n))
    if position in ("top", "bottom"):
        x = rng.uniform(max(lo, 0.25 * n), min(hi, 0.75 * n))
    return x, y


def _layout_pair(rng: random.Random, relation: str, r0: float, r1: float):
    """Centres of two objects whose relation is unambiguous: the named axis dominates by at least 2:1."""
    n = IMAGE_SIZE
    ax, ay = RELATIONS[relation]
    gap = r0 + r1 + rng.uniform(2.5, 5.0)                  # centre distance along the named axis
    side = rng.uniform(-0.25, 0.25) * gap                    # drift across it
    along_0 = rng.uniform(max(r0, r1) + 1.0, n - max(r0, r1) - 1.0 - gap)
    across = rng.uniform(max(r0, r1) + 1.0 + abs(side), n - max(r0, r1) - 1.0 - abs(side))
    a0, a1 = along_0, along_0 + gap
    if ax + ay < 0:    # "left of" / "above": the first object has the smaller coordinate
        first, second = a0, a1
    else:
        first, second = a1, a0
    c0, c1 = across - side / 2, across + side / 2
    if ax != 0:
        return (first, c0), (second, c1)
    return (c0, first), (c1, second)


# ----------------------------------------------------------------------------------------------- rendering

_SUPERSAMPLE = 4


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE, supersample: int = _SUPERSAMPLE,
               ry: Optional[float] = None):
    """Coverage in [0, 1] of a shape centred at (cx, cy) with half-width r, antialiased by supersampling.
    With `ry` the shape is stretched to half-height ry (the oracle fits such templates)."""
    s = supersample
    coords = (np.arange(size * s) + 0.5) / s
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if ry is not None:
        y = cy + (y - cy) * (r / ry)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    elif shape == "square":
        h = r * 0.9  # a square of the same half-width looks larger than the circle; keep areas comparable
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        # upright isosceles triangle inscribed in the (2r x 2r) box
        top, bottom = cy - r, cy + r
        frac = np.clip((y - top) / (2 * r), 0, 1)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * r * 1.05)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(size, s, size, s).mean(axis=(1, 3))


def render(scene: Scene, seed: int) -> np.ndarray:
    """An image (H, W, 3) float32 in [0, 1] showing `scene`; the same seed gives the same pixels."""
    rng = random.Random(seed)
    grey = rng.uniform(*BACKGROUND_RANGE)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), grey, dtype=np.float32)
    radius_range = PAIR_RADIUS_RANGE if scene.relation is not None else RADIUS_RANGE
    radii = [rng.uniform(*radius_range) for _ in scene.objects]
    if scene.relation is not None:
        centres = _layout_pair(rng, scene.relation, *radii)
    else:
        centres = [_centre_for_position(rng, scene.position, radii[0])]
    named = {o.colour for o in scene.objects}
    for obj, (cx, cy), r in zip(scene.objects, centres, radii):
        # a colour the caption leaves out is any colour the other object does not have
        name = obj.colour or rng.choice([c for c in COLOURS if c not in named])
        colour = np.array(COLOURS[name]) + np.array([rng.uniform(-0.05, 0.05) for _ in range(3)])
        cover = shape_mask(obj.shape, cx, cy, r)[..., None]
        image = image * (1 - cover) + np.clip(colour, 0, 1) * cover
    return image.astype(np.float32)


def sample_batch(seed: int, n: int, mix=(0.15, 0.35, 0.5), held_out: bool = False):
    """n (image, caption) pairs drawn from the training captions (or the held-out ones) with kind weights `mix`
    for (single, positioned, pair). Returns (uint8 array [n, H, W, 3], list of captions)."""
    rng = random.Random(seed)
    pools = {k: prompt_split(k)[1 if held_out else 0] for k in ("single", "positioned", "pair")}
    kinds = [k for k in pools if pools[k]]
    weights = [w for k, w in zip(pools, mix) if pools[k]]
    images, texts = [], []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        scene = rng.choice(pools[kind])
        images.append(np.round(render(scene, rng.getrandbits(63)) * 255).astype(np.uint8))
        texts.append(caption(scene))
    return np.stack(images), texts
