"""The tiny world's data and its oracle: exact on clean data, robust to the defects of model samples, blind on
noise and on mismatched captions."""
import random

import numpy as np
import pytest

from r0_core.tiny import oracle, world


@pytest.fixture(scope="module")
def ground_truth():
    return world.sample_batch(seed=123, n=600)


def _blur(images, sigma=0.8):
    k = np.exp(-np.arange(-2, 3) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    n = images.shape[1]
    p = np.pad(images, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="edge")
    images = sum(k[i] * p[:, i:i + n] for i in range(5))
    p = np.pad(images, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(k[i] * p[:, :, i:i + n] for i in range(5))


def test_captions_round_trip_and_split_is_disjoint():
    for kind, scenes in world.all_scenes().items():
        for scene in scenes:
            assert world.parse_caption(world.caption(scene)) == scene
        train, held = world.prompt_split(kind)
        assert not set(train) & set(held) and len(train) + len(held) == len(scenes)
    # every colour-shape pair is trained alone; held-out captions recombine it with a position or relation
    assert len(world.prompt_split("single")[0]) == len(world.COLOURS) * len(world.SHAPES)
    assert len(world.prompt_split("pair")[1]) > 50


def test_parse_caption_rejects_foreign_text():
    with pytest.raises(ValueError, match="not a tiny-world caption"):
        world.parse_caption("a photo of a dog")
    with pytest.raises(ValueError, match="not a tiny-world caption"):
        world.parse_caption("a red circle next to a blue square")


def test_rendering_is_seeded():
    scene = world.parse_caption("a red circle left of a blue square")
    assert np.array_equal(world.render(scene, 7), world.render(scene, 7))
    assert not np.array_equal(world.render(scene, 7), world.render(scene, 8))
    a, _ = world.sample_batch(seed=5, n=4)
    b, _ = world.sample_batch(seed=5, n=4)
    assert np.array_equal(a, b)


def test_oracle_is_exact_on_ground_truth(ground_truth):
    images, captions = ground_truth
    metrics = oracle.accuracy(images, captions)
    assert metrics["correct"] >= 0.98, metrics
    assert metrics["valid"] >= 0.98, metrics


@pytest.mark.parametrize("blur, noise, floor", [(0.6, 0.06, 0.97), (0.6, 0.1, 0.96), (0.8, 0.06, 0.93)])
def test_oracle_judges_noisy_blurred_speckled_images_as_a_person_would(ground_truth, blur, noise, floor):
    images, captions = ground_truth
    rng = np.random.default_rng(0)
    x = _blur(images.astype(np.float32) / 255, blur) + rng.normal(0, noise, images.shape)
    for im in x:  # stray specks a partly trained model leaves behind
        for _ in range(3):
            y, xx = rng.integers(0, 31, 2)
            im[y:y + 2, xx:xx + 2] = rng.random(3)
    metrics = oracle.accuracy(np.clip(x, 0, 1), captions)
    assert metrics["correct"] >= floor, metrics
    # ...but such an image is not a clean one
    assert metrics["valid"] <= 0.2, metrics


def test_oracle_is_near_chance_on_noise_and_on_mismatched_captions(ground_truth):
    images, captions = ground_truth
    noise = np.random.default_rng(1).random(images.shape)
    assert oracle.accuracy(noise, captions)["correct"] <= 0.02
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    # chance of a random caption of the mix matching an image is about 1-2%
    assert oracle.accuracy(images, shuffled)["correct"] <= 0.04


def test_oracle_counts_copies_and_reads_relations():
    scene = world.parse_caption("a red circle left of a blue square")
    image = world.render(scene, 3)
    assert oracle.judge(image, "a red circle left of a blue square").correct
    assert not oracle.judge(image, "a red circle right of a blue square").correct
    assert oracle.judge(image, "a blue square right of a red circle").correct
    verdict = oracle.judge(image, "a red circle")          # two objects where one was asked for
    assert not verdict.count_ok and not verdict.correct
    with pytest.raises(ValueError, match="one prompt per image"):
        oracle.accuracy(image[None], ["a red circle", "a blue square"])


def test_captions_may_leave_a_colour_out_and_the_oracle_then_accepts_any_colour():
    scene = world.parse_caption("a circle left of a red square")
    assert scene.objects[0] == world.Obj(None, "circle") and world.caption(scene) == "a circle left of a red square"
    image = world.render(world.parse_caption("a blue circle left of a red square"), 4)
    assert oracle.judge(image, "a circle left of a red square").correct
    assert not oracle.judge(image, "a circle left of a blue square").correct     # a named colour still counts
    assert not oracle.judge(image, "a square left of a red square").correct      # and the shape
    assert world.describes(scene, world.parse_caption("a green circle left of a red square"))
    assert not world.describes(scene, world.parse_caption("a green circle right of a red square"))
    assert not world.describes(world.parse_caption("a red circle"), world.parse_caption("a red circle on the left"))
    drawn = [world.render(scene, seed) for seed in range(12)]           # any colour but the other object's
    assert all(oracle.judge(im, "a circle left of a red square").correct for im in drawn)
    circles = {d.colour for im in drawn for d in oracle.judge(im, scene).detections if d.shape == "circle"}
    assert len(circles) >= 3 and "red" not in circles, circles


def test_nonsense_words_are_spelled_from_word_pieces_and_mean_nothing():
    pool = world.nonsense_words()
    assert len(pool) == len(set(pool)) == world.NONSENSE_POOL_SIZE
    assert set(world.SUBJECT_TOKENS) <= set(pool)
    assert not set(pool) & set(world.vocabulary())
    assert pool == world.nonsense_words()   # seeded: the same pool every time


def test_augmented_captions_vary_as_configured_and_ask_for_what_they_say():
    rng = random.Random(0)
    scenes = [world.parse_caption(c) for c in world.training_captions()]
    drawn = [(s, *world.augment_caption(s, rng)) for s in rng.choices(scenes, k=4000)]
    pool = set(world.nonsense_words())
    with_word = [t for _, t, _ in drawn if pool & set(t.split())]
    colourless = [a for _, _, a in drawn if any(o.colour is None for o in a.objects)]
    assert abs(len(with_word) / len(drawn) - world.NONSENSE_SHARE) < 0.03
    assert abs(len(colourless) / len(drawn) - world.COLOURLESS_SHARE) < 0.03
    for shown, text, asked in drawn:
        plain = " ".join(w for w in text.split() if w not in pool)
        assert world.parse_caption(plain) == asked and world.describes(asked, shown)
        words = text.split()
        # a nonsense word only ever stands right before a shape noun, as "sks" in "a sks dog"
        assert all(words[i + 1] in world.SHAPES for i, w in enumerate(words) if w in pool)
