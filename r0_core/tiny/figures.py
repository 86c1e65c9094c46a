"""Sample grids a person can check by eye: each column group headed by its setting, each row by its prompt, and
every image framed in the colour of the oracle's verdict. Text uses Pillow's built-in font, so no font file is
needed."""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (25, 25, 25)
# the oracle's verdict on an image: its frame colour, the word under it, and that word's colour
VERDICTS = {
    "correct": ((40, 160, 60), "correct", (255, 255, 255)),
    "layout": ((240, 170, 30), "wrong layout", (25, 25, 25)),
    "wrong": ((205, 45, 45), "wrong", (255, 255, 255)),
}
LEGEND = {"correct": "everything the prompt asks for: objects, colours, shapes, position or relation",
          "layout": "the right objects, in the wrong position or relation",
          "wrong": "wrong objects: count, colour or shape"}

MARGIN = 10
FRAME = 4           # frame width around each image, in pixels
STRIP = 16          # the frame's bottom edge is this tall and names the verdict
TILE_GAP = 4
GROUP_GAP = 18
LABEL_WIDTH = 190   # the prompt column
LEGEND_INDENT = 100  # the legend's text starts right of its colour swatches
TEXT_SIZE = 13
LINE = 17           # line height of TEXT_SIZE text


def font(size: int = TEXT_SIZE) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` (Pillow >= 10.1); older Pillow only has its fixed-size bitmap font."""
    try:
        return ImageFont.load_default(size)
    except TypeError:
        return ImageFont.load_default()


def verdict_kind(verdict) -> str:
    """'correct', 'layout' (right objects in the wrong place) or 'wrong', for an oracle.Verdict."""
    return "correct" if verdict.correct else "layout" if verdict.objects_correct else "wrong"


def wrap(text: str, width: int, typeface=None) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a single over-long word keeps its line);
    explicit newlines are kept."""
    typeface = typeface or font()
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and typeface.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


@dataclasses.dataclass
class GridLayout:
    """Where everything of a labelled grid goes; boxes are (left, top, right, bottom) pixels."""
    groups: list[str]
    prompts: list[str]
    per_prompt: int     # images per prompt in each group
    side: int           # an enlarged image's side
    header_lines: int
    title_lines: list[str]
    legend_width: int = 0

    @property
    def tile(self) -> int:
        return self.side + 2 * FRAME

    @property
    def group_width(self) -> int:
        return self.per_prompt * self.tile + (self.per_prompt - 1) * TILE_GAP

    @property
    def row_height(self) -> int:
        return self.side + FRAME + STRIP + TILE_GAP

    @property
    def top(self) -> int:
        """Where the first row starts."""
        return self.header_box(0)[1] + self.header_lines * LINE + 6

    @property
    def width(self) -> int:
        columns = LABEL_WIDTH + len(self.groups) * (self.group_width + GROUP_GAP) - GROUP_GAP
        return MARGIN + max(columns, self.legend_width) + MARGIN

    @property
    def height(self) -> int:
        return self.top + len(self.prompts) * self.row_height + 6 + (len(LEGEND) + 1) * LINE + MARGIN

    def group_left(self, g: int) -> int:
        return MARGIN + LABEL_WIDTH + g * (self.group_width + GROUP_GAP)

    def header_box(self, g: int) -> tuple[int, int, int, int]:
        top = MARGIN + len(self.title_lines) * LINE + (6 if self.title_lines else 0)
        return self.group_left(g), top, self.group_left(g) + self.group_width, top + self.header_lines * LINE

    def label_box(self, p: int) -> tuple[int, int, int, int]:
        top = self.top + p * self.row_height
        return MARGIN, top, MARGIN + LABEL_WIDTH - 8, top + self.row_height - TILE_GAP

    def frame_box(self, g: int, p: int, k: int) -> tuple[int, int, int, int]:
        """The k-th image of prompt p in group g, with its frame and verdict strip."""
        left, top = self.group_left(g) + k * (self.tile + TILE_GAP), self.top + p * self.row_height
        return left, top, left + self.tile, top + FRAME + self.side + STRIP

    def image_box(self, g: int, p: int, k: int) -> tuple[int, int, int, int]:
        left, top = self.frame_box(g, p, k)[:2]
        return left + FRAME, top + FRAME, left + FRAME + self.side, top + FRAME + self.side


def plan(groups: list[str], prompts: list[str], per_prompt: int, image_size: int, scale: int,
         title: str = "") -> GridLayout:
    """The layout of `labelled_grid` for these headers, prompts and image counts."""
    side = image_size * scale
    legend_width = LEGEND_INDENT + max(int(font().getlength(m)) for m in LEGEND.values())
    layout = GridLayout(groups, prompts, per_prompt, side, 0, [], legend_width)
    layout.header_lines = max(len(wrap(g, layout.group_width)) for g in groups)
    layout.title_lines = wrap(title, layout.width - 2 * MARGIN) if title else []
    return layout


def _enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """uint8 copy of an (H, W, 3) image in [0, 1] (or uint8), `scale` times larger without smoothing, so every
    pixel the oracle judged stays visible."""
    if image.dtype != np.uint8:
        image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(image, scale, 0), scale, 1)


def _legend(draw: ImageDraw.ImageDraw, layout: GridLayout, typeface) -> None:
    top = layout.top + len(layout.prompts) * layout.row_height + 6
    draw.text((MARGIN, top), "Frame colour: the oracle's verdict on the image", fill=INK, font=typeface)
    for i, (kind, meaning) in enumerate(LEGEND.items()):
        colour, word, ink = VERDICTS[kind]
        y = top + (i + 1) * LINE
        draw.rectangle((MARGIN, y + 1, MARGIN + 90, y + LINE - 2), fill=colour)
        draw.text((MARGIN + 45, y + LINE // 2), word, fill=ink, font=typeface, anchor="mm")
        draw.text((MARGIN + LEGEND_INDENT, y + LINE // 2), meaning, fill=INK, font=typeface,
                  anchor="lm")


def labelled_grid(groups: list[str], prompts: list[str], images, verdicts, *, scale: int = 4,
                  title: str = "") -> np.ndarray:
    """A uint8 image [H, W, 3]: one column group per setting (`groups` are their headers; a header may hold
    newlines), one row per prompt, the prompt written at the start of its row, each image enlarged `scale` times
    and framed in the colour of its verdict, and a legend at the bottom.

    images[g] is group g's [len(prompts) * k, h, w, 3] array in [0, 1] or uint8, in the order the sampling
    functions return them (image i belongs to prompt i // k); verdicts[g] holds their oracle.Verdicts."""
    if len(images) != len(groups) or len(verdicts) != len(groups):
        raise ValueError(f"got {len(groups)} groups, {len(images)} image sets and {len(verdicts)} verdict sets; "
                         "pass one image array and one verdict list per group")
    per_prompt = len(images[0]) // max(len(prompts), 1)
    for g, (group_images, group_verdicts) in enumerate(zip(images, verdicts)):
        if len(group_images) != per_prompt * len(prompts) or len(group_verdicts) != len(group_images):
            raise ValueError(f"group {groups[g]!r} has {len(group_images)} images and {len(group_verdicts)} "
                             f"verdicts; expected {per_prompt * len(prompts)} of each ({per_prompt} per prompt)")
    typeface, small = font(), font(TEXT_SIZE - 2)
    layout = plan(groups, prompts, per_prompt, images[0].shape[1], scale, title)
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(layout.title_lines):
        draw.text((MARGIN, MARGIN + i * LINE), line, fill=INK, font=typeface)
    for g, header in enumerate(groups):
        left, top = layout.header_box(g)[:2]
        for i, line in enumerate(wrap(header, layout.group_width, typeface)):
            draw.text((left, top + i * LINE), line, fill=INK, font=typeface)
    for p, prompt in enumerate(prompts):
        left, top, _, bottom = layout.label_box(p)
        lines = wrap(prompt, LABEL_WIDTH - 8, typeface)
        y = (top + bottom - len(lines) * LINE) // 2
        for i, line in enumerate(lines):
            draw.text((left, y + i * LINE), line, fill=INK, font=typeface)
        for g in range(len(groups)):
            for k in range(per_prompt):
                colour, word, ink = VERDICTS[verdict_kind(verdicts[g][p * per_prompt + k])]
                frame = layout.frame_box(g, p, k)
                draw.rectangle((frame[0], frame[1], frame[2] - 1, frame[3] - 1), fill=colour)
                draw.text(((frame[0] + frame[2]) // 2, frame[3] - STRIP // 2), word, fill=ink, font=small,
                          anchor="mm")
                canvas.paste(Image.fromarray(_enlarge(np.asarray(images[g][p * per_prompt + k]), scale)),
                             layout.image_box(g, p, k)[:2])
    _legend(draw, layout, typeface)
    return np.asarray(canvas)
