"""The oracle: an exact pixel-analysis judge of tiny-world images, the GenEval of this world.

It finds objects as connected regions that differ from the background, names each by hue and by the shape
template it overlaps best, and checks them against what a caption asks for: count, colour, shape, and the
position or relation. Model samples are not clean (speckle, soft edges, stray blobs, tinted backgrounds), so
the image is smoothed before thresholding, the background is estimated from the border, and blobs too small to
be an object count as stray marks: they spoil validity but not correctness, as a person would judge.
"""
from __future__ import annotations

import colorsys
import dataclasses
from typing import Optional

import numpy as np

from .world import COLOURS, IMAGE_SIZE, RELATIONS, SHAPES, Scene, parse_caption, shape_mask

FOREGROUND_DISTANCE = 0.22   # RGB distance from the background that marks a pixel as object
MIN_OBJECT_AREA = 14         # pixels (at 32x32); a pair object of half-width 4 covers about 30
MIN_STRAY_AREA = 3           # smaller specks are ignored altogether
MAX_HUE_ERROR = 35.0         # degrees; further from every named hue means "no colour"
MIN_SATURATION = 0.3
MAX_BACKGROUND_STD = 0.06    # validity: how flat the background must be
POSITION_MARGIN = 0.42       # a positioned object's centre lies in the outer 42% on its side
MIDDLE_RADIUS = 0.14         # "in the middle": centre within 14% of the image centre on both axes

_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360 for name, rgb in COLOURS.items()}


@dataclasses.dataclass
class Detection:
    colour: Optional[str]
    shape: str
    cx: float       # centroid, in [0, 1] of the image width
    cy: float
    area: int


@dataclasses.dataclass
class Verdict:
    """The oracle's judgement of one image against one caption."""
    correct: bool               # everything the caption asks for: count, colours, shapes, position/relation
    objects_correct: bool       # right count, and every named object's colour and shape
    count_ok: bool
    layout_ok: Optional[bool]   # position or relation; None when the caption names neither
    valid: bool                 # one clean object per named object, no stray marks, flat background
    detections: list[Detection]


def _smooth(image: np.ndarray) -> np.ndarray:
    """3x3 box blur with edge padding: averages speckle away before thresholding."""
    p = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (y, x) indices."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _moments(coverage: np.ndarray):
    """Area, centroid (x, y) and variances (x, y) of a coverage map."""
    area = coverage.sum()
    ys, xs = np.indices(coverage.shape) + 0.5
    cx, cy = (coverage * xs).sum() / area, (coverage * ys).sum() / area
    return area, cx, cy, (coverage * (xs - cx) ** 2).sum() / area, (coverage * (ys - cy) ** 2).sum() / area


# per shape, for half-width 1: x and y variance and how far the centroid sits below the centre
_UNIT = {}
for _shape in SHAPES:
    _, _cx, _cy, _vx, _vy = _moments(shape_mask(_shape, 64.0, 64.0, 32.0, size=128, supersample=2))
    _UNIT[_shape] = (_vx / 32 ** 2, _vy / 32 ** 2, (_cy - 64.0) / 32)


def _name_shape(coverage: np.ndarray) -> str:
    """The shape whose antialiased template, stretched to the region's centroid and spread in x and y, explains
    the region's coverage map best (least absolute error). Sub-pixel fitting separates small squares from small
    circles; fitting width and height apart judges a drawn rectangle as square-like and an oval as circle-like,
    as a person would; blur and noise shift all templates alike."""
    _, cx, cy, var_x, var_y = _moments(coverage)
    best, best_error = SHAPES[0], np.inf
    for shape, (unit_x, unit_y, drop) in _UNIT.items():
        rx, ry = np.sqrt(var_x / unit_x), np.sqrt(var_y / unit_y)
        template = shape_mask(shape, cx, cy - drop * ry, rx, size=coverage.shape[0], ry=ry)
        error = np.abs(template - coverage).sum()
        if error < best_error:
            best, best_error = shape, error
    return best


def _hue_names(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel colour name index into COLOURS (-1 for unsaturated pixels), for rgb of shape [N, 3]."""
    top, low = rgb.max(1), rgb.min(1)
    chroma = top - low
    saturation = np.where(top > 0, chroma / np.maximum(top, 1e-6), 0)
    hsv = np.array([colorsys.rgb_to_hsv(*px)[0] * 360 for px in rgb])
    hues = np.array(list(_HUES.values()))
    error = np.abs(hsv[:, None] - hues[None])
    error = np.minimum(error, 360 - error)
    names = error.argmin(1)
    names[(saturation < MIN_SATURATION) | (error.min(1) > MAX_HUE_ERROR)] = -1
    return names


def _colour_name(rgb: np.ndarray) -> Optional[str]:
    index = _hue_names(np.clip(rgb, 0, 1)[None])[0]
    return list(_HUES)[index] if index >= 0 else None


def _split_by_colour(pixels: np.ndarray, smooth: np.ndarray, scale: float) -> list[np.ndarray]:
    """Blur or a narrow gap can fuse two objects into one region; objects of different colours are split
    apart again, each pixel going to the colour whose pixels' centroid is nearest."""
    names = _hue_names(smooth[pixels[:, 0], pixels[:, 1]])
    counts = {n: (names == n).sum() for n in set(names.tolist()) if n >= 0}
    major = [n for n, c in counts.items() if c >= MIN_OBJECT_AREA * scale / 2]
    if len(major) < 2:
        return [pixels]
    centroids = np.stack([pixels[names == n].mean(0) for n in major])
    nearest = np.linalg.norm(pixels[:, None] - centroids[None], axis=-1).argmin(1)
    owner = np.where(np.isin(names, major), np.array([major.index(n) if n in major else -1 for n in names]),
                     nearest)
    return [pixels[owner == i] for i in range(len(major))]


def _core_colour(pixels: np.ndarray, distance: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Mean colour of a region's most distinct half, so soft edges do not pull it toward the background."""
    d = distance[pixels[:, 0], pixels[:, 1]]
    core = pixels[d >= np.median(d)]
    return image[core[:, 0], core[:, 1]].mean(0)


def detect(image: np.ndarray) -> tuple[list[Detection], int, float]:
    """Objects in an (H, W, 3) image in [0, 1]; also the number of stray marks and the background's std."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image has shape {image.shape}; expected (H, W, 3) floats in [0, 1]")
    h, w = image.shape[:2]
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    smooth = _smooth(image)
    distance = np.linalg.norm(smooth - background, axis=-1)
    scale = (h * w) / IMAGE_SIZE ** 2
    detections, strays = [], 0
    regions = [part for pixels in _components(distance > FOREGROUND_DISTANCE)
               for part in _split_by_colour(pixels, smooth, scale)]
    for pixels in regions:
        if len(pixels) < MIN_STRAY_AREA * scale:
            continue
        colour_rgb = _core_colour(pixels, distance, image)
        if len(pixels) < MIN_OBJECT_AREA * scale or _colour_name(colour_rgb) is None:
            strays += 1  # too small, or grey: a blemish, not an object of this world
            continue
        # coverage: how much of each pixel the object fills, by projecting the unsmoothed pixel onto the
        # background->object colour line (smoothing would round the corners the shape test looks at)
        contrast = colour_rgb - background
        region = np.zeros((h, w), dtype=bool)
        region[pixels[:, 0], pixels[:, 1]] = True
        coverage = np.clip((image - background) @ contrast / max(contrast @ contrast, 1e-6), 0, 1) * region
        ys, xs = np.indices((h, w)) + 0.5
        cx, cy = (coverage * xs).sum() / coverage.sum() / w, (coverage * ys).sum() / coverage.sum() / h
        detections.append(Detection(_colour_name(colour_rgb), _name_shape(coverage), float(cx), float(cy),
                                    len(pixels)))
    foreground = distance > FOREGROUND_DISTANCE / 2
    background_std = float(image[~foreground].std(0).mean()) if (~foreground).any() else 1.0
    return detections, strays, background_std


def _position_ok(d: Detection, position: str) -> bool:
    return {
        "left": d.cx < POSITION_MARGIN, "right": d.cx > 1 - POSITION_MARGIN,
        "top": d.cy < POSITION_MARGIN, "bottom": d.cy > 1 - POSITION_MARGIN,
        "middle": abs(d.cx - 0.5) < MIDDLE_RADIUS and abs(d.cy - 0.5) < MIDDLE_RADIUS,
    }[position]


def _relation_ok(a: Detection, b: Detection, relation: str) -> bool:
    """a <relation> b, with the named axis dominating the other one."""
    ax, ay = RELATIONS[relation]
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = (dx * -ax, abs(dy)) if ax else (dy * -ay, abs(dx))
    return along > 0 and along > across


def judge(image: np.ndarray, prompt: str | Scene) -> Verdict:
    """Does `image` (H, W, 3 in [0, 1]) show what `prompt` asks for?"""
    scene = parse_caption(prompt) if isinstance(prompt, str) else prompt
    detections, strays, background_std = detect(image)
    count_ok = len(detections) == len(scene.objects)
    matched = None
    if count_ok:
        wanted = [(o.colour, o.shape) for o in scene.objects]
        got = [(d.colour, d.shape) for d in detections]
        orders = [(0,), ] if len(got) == 1 else [(0, 1), (1, 0)]
        for order in orders:
            # a colour the caption leaves out (None) matches any colour
            if all(g[1] == w[1] and w[0] in (None, g[0]) for g, w in zip((got[i] for i in order), wanted)):
                matched = [detections[i] for i in order]
    objects_correct = matched is not None
    layout_ok = None
    if scene.position is not None:
        layout_ok = objects_correct and _position_ok(matched[0], scene.position)
    elif scene.relation is not None:
        layout_ok = objects_correct and _relation_ok(matched[0], matched[1], scene.relation)
    valid = count_ok and strays == 0 and background_std <= MAX_BACKGROUND_STD
    correct = objects_correct and layout_ok is not False
    return Verdict(correct, objects_correct, count_ok, layout_ok, valid, detections)


def accuracy(images, prompts) -> dict[str, float]:
    """Mean verdict fields over a batch: images as (N, H, W, 3) floats in [0, 1] or uint8."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    verdicts = [judge(im, p) for im, p in zip(images, prompts)]
    n = max(len(verdicts), 1)
    layout = [v.layout_ok for v in verdicts if v.layout_ok is not None]
    return {
        "correct": sum(v.correct for v in verdicts) / n,
        "objects_correct": sum(v.objects_correct for v in verdicts) / n,
        "count_ok": sum(v.count_ok for v in verdicts) / n,
        "layout_ok": sum(layout) / len(layout) if layout else float("nan"),
        "valid": sum(v.valid for v in verdicts) / n,
        "n": len(verdicts),
    }
