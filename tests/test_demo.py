"""The demo's labelled grid: real tiny-world images, judged by the oracle, come out enlarged, headed by their
setting, labelled with their prompt and framed in the colour of their verdict."""
import numpy as np
import pytest

from r0_core.demo import describe, nfe
from r0_core.tiny import figures, oracle, world
from r0_core.tiny.world import Obj, Scene

SCALE = 4
RED_LEFT = Scene((Obj("red", "circle"),), position="left")
PAIR = Scene((Obj("green", "square"), Obj("blue", "triangle")), relation="above")


@pytest.fixture(scope="module")
def drawn():
    prompts = [world.caption(RED_LEFT), world.caption(PAIR)]
    shown = [
        [RED_LEFT, PAIR],                                                       # what each prompt asks for
        [Scene((Obj("red", "circle"),), position="right"), Scene((Obj("yellow", "circle"),))],  # misses
    ]
    images = [np.stack([world.render(s, seed=i) for i, s in enumerate(row)]) for row in shown]
    verdicts = [[oracle.judge(im, p) for im, p in zip(group, prompts)] for group in images]
    groups = [describe("base", 50, "DDIM", 2.0, True), "misses\na second header line"]
    canvas = figures.labelled_grid(groups, prompts, images, verdicts, scale=SCALE, title="a title")
    return canvas, figures.plan(groups, prompts, 1, world.IMAGE_SIZE, SCALE, "a title"), images, verdicts


def _inked(canvas, box) -> int:
    left, top, right, bottom = box
    return int((np.abs(canvas[top:bottom, left:right].astype(int) - figures.BACKGROUND).sum(-1) > 150).sum())


def test_grid_size_and_enlarged_images(drawn):
    canvas, layout, images, _ = drawn
    assert canvas.shape == (layout.height, layout.width, 3) and canvas.dtype == np.uint8
    assert layout.width > figures.LABEL_WIDTH + 2 * world.IMAGE_SIZE * SCALE
    for g, group in enumerate(images):
        for p, image in enumerate(group):
            left, top, right, bottom = layout.image_box(g, p, 0)
            expected = np.repeat(np.repeat(np.round(image * 255).astype(np.uint8), SCALE, 0), SCALE, 1)
            assert np.abs(canvas[top:bottom, left:right].astype(int) - expected).max() <= 1


def test_headers_and_prompts_are_written(drawn):
    canvas, layout, _, _ = drawn
    assert layout.header_lines == 2   # the second header's newline
    for g in range(2):
        assert _inked(canvas, layout.header_box(g)) > 40
    for p in range(2):
        assert _inked(canvas, layout.label_box(p)) > 40
    # the gap between the prompt column and the first group stays empty
    gap = (layout.label_box(0)[2], layout.top, layout.group_left(0) - 1, layout.label_box(1)[3])
    assert _inked(canvas, gap) == 0


def test_frames_show_the_verdict(drawn):
    canvas, layout, _, verdicts = drawn
    kinds = [[figures.verdict_kind(v) for v in group] for group in verdicts]
    assert kinds == [["correct", "correct"], ["layout", "wrong"]]
    colours = {}
    for g in range(2):
        for p in range(2):
            left, top = layout.frame_box(g, p, 0)[:2]
            colours[kinds[g][p]] = tuple(canvas[top + 1, left + 1])
            assert colours[kinds[g][p]] == figures.VERDICTS[kinds[g][p]][0]
    assert len(set(colours.values())) == 3   # correct, wrong layout and wrong each have their own colour


def test_mismatched_inputs_are_refused(drawn):
    _, _, images, verdicts = drawn
    with pytest.raises(ValueError, match="expected 2 of each"):
        figures.labelled_grid(["a", "b"], ["p", "q"], [images[0], images[1][:1]], verdicts)


def test_headers_count_unet_evaluations():
    assert describe("base", 50, "DDIM", 2.0, True) == "base · 50-step DDIM + CFG 2 · 100 NFE"
    assert describe("R0 LoRA", 4, "R0 sampler", 1.0, False) == "R0 LoRA · 4-step R0 sampler (no CFG) · 4 NFE"
    assert nfe(4, True) == 8 and nfe(4, False) == 4
