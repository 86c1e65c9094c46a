"""DreamBench: the official dataset layout read from the real three-subject subset, and the evaluator end to end on
a tiny dataset in the same layout, with tiny DINO and CLIP encoders and generators whose images are known."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from r0_core import lora
from r0_core.loading import TINY, TINY_R0_LORA, load_pipeline
from r0_core.rewards import load_reward
from rpo_core import dreambench
from rpo_core.dreambench import evaluate, parse_prompts_file, prompt_seeds, read_dreambench, strip_token
from rpo_core.references import load_image, load_references
from tests.reward_weights import save_dino

MINI = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench-mini"

TINY_PROMPTS = """Classes

subject_name,class
red_ball,ball
dog,dog
teapot,teapot

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
"a {0} {1} on the owner's bed".format(unique_token, class_token)
]
"""
N_PROMPTS = {"red_ball": 2, "dog": 3}


# ----------------------------------------------------------------------------------------------- fixtures

def ball(seed: int) -> Image.Image:
    """A red disc on white, placed and sized by the seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:64, :64]
    cy, cx, r = rng.uniform(24, 40), rng.uniform(24, 40), rng.uniform(12, 20)
    image = np.full((64, 64, 3), 255, np.uint8)
    image[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = (220, 30, 30)
    return Image.fromarray(image)


def fur(seed: int) -> Image.Image:
    """Brown and black noise stripes: nothing like a ball."""
    rng = np.random.default_rng(100 + seed)
    stripes = (np.sin(np.arange(64) / rng.uniform(1.5, 3)) > 0)[None, :, None]
    image = np.where(stripes, (120, 70, 30), (20, 15, 10)) + rng.integers(0, 40, (64, 64, 3))
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def write_dataset(root: pathlib.Path) -> pathlib.Path:
    """google/dreambooth's layout: dataset/<subject>/*.jpg|png + dataset/prompts_and_classes.txt."""
    dataset = root / "dataset"
    for name, draw in (("red_ball", ball), ("dog", fur)):
        (dataset / name).mkdir(parents=True)
        for i in range(4):
            draw(i).save(dataset / name / f"{i:02d}.{'png' if i % 2 else 'jpg'}", quality=95)
    (dataset / "prompts_and_classes.txt").write_text(TINY_PROMPTS)
    return dataset


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    return read_dreambench(write_dataset(tmp_path_factory.mktemp("dreambench")).parent)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_dino(tmp_path_factory.mktemp("dino"))[0]


@pytest.fixture(scope="module")
def encoders(dino_dir):
    return load_reward("dino", dino_dir, device="cpu"), load_reward("clip", TINY, device="cpu")


def own_images(subject, prompts, seeds):
    """The subject's own photos, at the size a generator would make them."""
    references = load_references(subject.image_paths, 32)
    return references[[s % len(references) for s in seeds]]


def noise_images(subject, prompts, seeds):
    return torch.stack([torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in seeds])


# ----------------------------------------------------------------------------------------------- reading

def test_reads_the_official_dreambench_subset():
    assert MINI.is_dir(), f"{MINI} is missing: the shared DreamBench subset belongs beside the repository clone"
    bench = read_dreambench(MINI)
    assert read_dreambench(MINI / "dataset") == bench  # the repository folder or dataset/ itself
    assert [(s.name, s.class_name, s.live) for s in bench.subjects] == [
        ("berry_bowl", "bowl", False), ("can", "can", False), ("cat", "cat", True)]
    for subject in bench.subjects:
        assert [pathlib.Path(p).name for p in subject.image_paths] == sorted(
            p.name for p in (MINI / "dataset" / subject.name).glob("*.jpg"))
        prompts = bench.prompts_for(subject)
        assert len(prompts) == 25 and len(set(prompts)) == 25
        assert all(f"sks {subject.class_name}" in p for p in prompts)
    assert bench.prompts_for("cat")[0] == "a sks cat in the jungle"
    assert "a sks cat wearing a santa hat" in bench.prompts_for("cat")  # live prompts for the live subject
    assert "a sks can on top of a mirror" in bench.prompts_for("can")  # object prompts for the others
    assert not any("hat" in p for p in bench.prompts_for("berry_bowl"))
    assert bench.prompts_for("can", "olis")[-1] == "a cube shaped olis can"


def test_the_class_table_lists_all_30_subjects_and_9_live_ones():
    classes, objects, live = parse_prompts_file(str(MINI / "dataset" / "prompts_and_classes.txt"))
    assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
    assert sorted(n for n, c in classes.items() if c in dreambench.LIVE_CLASSES) == [
        "cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert len(objects) == len(live) == 25 and objects[0] == live[0] == "a {0} {1} in the jungle"


def test_tiny_dataset_reading(tiny_bench):
    assert [(s.name, s.class_name, s.live, len(s.image_paths)) for s in tiny_bench.subjects] == [
        ("dog", "dog", True, 4), ("red_ball", "ball", False, 4)]  # teapot is listed but absent: skipped
    assert tiny_bench.prompts_for("dog")[2] == "a sks dog on the owner's bed"  # "..." and an apostrophe
    assert tiny_bench.prompts_for("red_ball", "xyz") == ["a xyz ball in the jungle", "a red xyz ball"]


def test_bad_datasets_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prompts_and_classes.txt in"):
        read_dreambench(tmp_path)
    dataset = write_dataset(tmp_path)
    (dataset / "blue_cup").mkdir()
    with pytest.raises(ValueError, match=r"blue_cup is not listed in .*prompts_and_classes.txt; add a line "
                                         r"'blue_cup,<class noun>'"):
        read_dreambench(dataset)
    (dataset / "blue_cup").rmdir()
    (dataset / "teapot").mkdir()
    (dataset / "teapot" / "notes.txt").write_text("no photos here")
    with pytest.raises(ValueError, match="subject folder .*teapot holds no images"):
        read_dreambench(dataset)
    (dataset / "prompts_and_classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no prompts_and_classes.txt"):
        read_dreambench(dataset)


def test_a_missing_prompt_section_is_named(tmp_path):
    dataset = write_dataset(tmp_path)
    (dataset / "prompts_and_classes.txt").write_text(TINY_PROMPTS.split("Live Subject Prompts")[0])
    with pytest.raises(ValueError, match="no 'Live Subject Prompts' templates"):
        read_dreambench(dataset)


@pytest.mark.parametrize("prompt, token, expected", [
    ("a sks dog in the snow", "sks", "a dog in the snow"),
    ("sks dog", "sks", "dog"),
    ("a red sks can", "sks", "a red can"),
    ("a sksy sks cat", "sks", "a sksy cat"),  # whole words only
    ("a <v1> toy", "<v1>", "a toy"),
    ("a olis sks bowl", "olis sks", "a bowl"),
])
def test_strip_token(prompt, token, expected):
    assert strip_token(prompt, token) == expected


# ----------------------------------------------------------------------------------------------- evaluating

def test_own_images_score_higher_than_noise_or_the_other_subject(tiny_bench, encoders):
    dino, clip = encoders
    swap = {"dog": "red_ball", "red_ball": "dog"}

    def other_images(subject, prompts, seeds):
        return own_images(tiny_bench.subject(swap[subject.name]), prompts, seeds)

    own, noise, other = (evaluate(tiny_bench, g, dino, clip, images_per_prompt=4)["subjects"]
                         for g in (own_images, noise_images, other_images))
    for name in ("dog", "red_ball"):
        for metric in ("dino", "clip_i"):
            assert own[name][metric] > noise[name][metric] + 0.01, (name, metric, own, noise)
            assert own[name][metric] > other[name][metric] + 0.01, (name, metric, own, other)


def test_scores_match_an_independent_computation(tiny_bench, encoders):
    dino, clip = encoders
    summary = evaluate(tiny_bench, own_images, dino, clip, images_per_prompt=4)
    for subject in tiny_bench.subjects:
        result = summary["subjects"][subject.name]
        images = own_images(subject, None, prompt_seeds(0, 4))  # every prompt gets these four
        real = torch.stack([load_image(p) for p in subject.image_paths])  # 64 x 64 photos, resized by the encoders
        with torch.no_grad():
            # DINO, CLIP-I: mean cosine over every (generated, real) pair
            dino_cos = dino.image_embeds(images) @ dino.image_embeds(real).T
            clip_cos = clip.image_embeds(images) @ clip.image_embeds(real).T
            assert result["dino"] == pytest.approx(dino_cos.mean().item(), abs=1e-5)
            assert result["clip_i"] == pytest.approx(clip_cos.mean().item(), abs=1e-5)
            # CLIP-T: max(cos, 0) against the prompt without the token, i.e. torchmetrics' clip_score / 100
            for row, prompt in zip(result["per_prompt"], tiny_bench.prompts_for(subject)):
                stripped = prompt.replace("sks ", "")
                assert row["clip_prompt"] == stripped
                expected = clip.cosine(images, stripped).clamp(min=0).mean().item()
                assert row["clip_t"] == pytest.approx(expected, abs=1e-5)
                assert row["clip_t"] == pytest.approx((clip(images, stripped) / 100).mean().item(), abs=1e-5)
        assert result["n_images"] == 4 * N_PROMPTS[subject.name] and result["n_references"] == 4
        assert result["live"] == (subject.name == "dog")
        assert result["clip_t"] == pytest.approx(np.mean([r["clip_t"] for r in result["per_prompt"]]), abs=1e-6)
    means = {m: np.mean([r[m] for r in summary["subjects"].values()]) for m in ("dino", "clip_i", "clip_t")}
    assert summary["mean"] == pytest.approx({**means, "n_subjects": 2})
    assert summary["live_mean"]["dino"] == pytest.approx(summary["subjects"]["dog"]["dino"])
    assert summary["live_mean"]["n_subjects"] == summary["object_mean"]["n_subjects"] == 1
    assert summary["object_mean"]["clip_i"] == pytest.approx(summary["subjects"]["red_ball"]["clip_i"])


def test_clip_t_reads_the_prompt_without_the_token(tiny_bench, encoders, monkeypatch):
    dino, clip = encoders
    seen = []
    text_embeds = clip.text_embeds
    monkeypatch.setattr(clip, "text_embeds", lambda prompts: seen.extend(prompts) or text_embeds(prompts))
    evaluate(tiny_bench, noise_images, dino, clip, images_per_prompt=1, token="olis", subjects=["red_ball"])
    assert seen == ["a ball in the jungle", "a red ball"]


def test_seeds_prompts_and_progress_are_fixed(tiny_bench, encoders):
    dino, clip = encoders
    calls, progress = [], []

    def recording(subject, prompts, seeds):
        calls.append((subject.name, prompts, seeds))
        return noise_images(subject, prompts, seeds)

    first = evaluate(tiny_bench, recording, dino, clip, images_per_prompt=3, seed=10, callback=progress.append)
    assert calls == [("dog", ["a sks dog in the snow"] * 3, [10, 11, 12]),
                     ("dog", ["a sks dog wearing a red hat"] * 3, [13, 14, 15]),
                     ("dog", ["a sks dog on the owner's bed"] * 3, [16, 17, 18]),
                     ("red_ball", ["a sks ball in the jungle"] * 3, [10, 11, 12]),  # the same seeds per subject
                     ("red_ball", ["a red sks ball"] * 3, [13, 14, 15])]
    assert [(p["i"], p["total"], p["subject"]) for p in progress] == [
        (0, 5, "dog"), (1, 5, "dog"), (2, 5, "dog"), (3, 5, "red_ball"), (4, 5, "red_ball")]
    assert evaluate(tiny_bench, noise_images, dino, clip, images_per_prompt=3, seed=10) == first  # a rerun: same
    assert evaluate(tiny_bench, noise_images, dino, clip, images_per_prompt=3, seed=11) != first


def test_results_are_written(tiny_bench, encoders, tmp_path):
    dino, clip = encoders
    summary = evaluate(tiny_bench, own_images, dino, clip, images_per_prompt=2, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dog.json", "dog.png", "red_ball.json", "red_ball.png", "results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    for name, n in N_PROMPTS.items():
        saved = json.loads((tmp_path / f"{name}.json").read_text())
        assert saved == summary["subjects"][name] and saved["n_images"] == 2 * n
        assert [r["seeds"] for r in saved["per_prompt"]] == [prompt_seeds(i, 2) for i in range(n)]
        with Image.open(tmp_path / f"{name}.png") as grid:  # a row per prompt, 2 px gaps
            assert grid.size == (2 * 34 + 2, n * 34 + 2) and grid.mode == "RGB"
    lines = (tmp_path / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| subject | class | DINO | CLIP-I | CLIP-T |"
    r = summary["subjects"]["red_ball"]
    assert table[3] == f"| red_ball | ball | {r['dino']:.3f} | {r['clip_i']:.3f} | {r['clip_t']:.3f} |"
    assert table[4].startswith("| **mean** (2 subjects) |") and f"{summary['mean']['clip_t']:.3f}" in table[4]
    assert table[5].startswith("| **object mean** (1 subject) |") and table[6].startswith("| **live mean**")
    evaluate(tiny_bench, own_images, dino, clip, images_per_prompt=1, out_dir=tmp_path / "plain", save_grids=False)
    assert not list((tmp_path / "plain").glob("*.png"))


def test_a_stopped_run_resumes_from_its_subject_files(tiny_bench, encoders, tmp_path):
    dino, clip = encoders
    calls = []

    def counted(subject, prompts, seeds):
        calls.append(subject.name)
        return own_images(subject, prompts, seeds)

    key = lambda subject: f"model-a/{subject.name}"  # noqa: E731
    first = evaluate(tiny_bench, counted, dino, clip, images_per_prompt=1, out_dir=tmp_path, run_key=key,
                     subjects=["dog"])                        # as if the run stopped after its first subject
    assert set(calls) == {"dog"}
    calls.clear()
    whole = evaluate(tiny_bench, counted, dino, clip, images_per_prompt=1, out_dir=tmp_path, run_key=key)
    assert set(calls) == {"red_ball"}                         # dog is read back, not generated again
    assert whole["subjects"]["dog"] == first["subjects"]["dog"]
    calls.clear()
    evaluate(tiny_bench, counted, dino, clip, images_per_prompt=2, out_dir=tmp_path, run_key=key)
    assert set(calls) == {"dog", "red_ball"}                  # other settings: measured again
    calls.clear()
    evaluate(tiny_bench, counted, dino, clip, images_per_prompt=2, out_dir=tmp_path,
             run_key=lambda subject: "model-b")
    assert set(calls) == {"dog", "red_ball"}                  # another model or LoRA: measured again


def test_bad_generators_and_settings_are_named(tiny_bench, encoders):
    dino, clip = encoders
    with pytest.raises(ValueError, match=r"generate returned \(2, 32, 32, 3\) .* expected float images \[2, 3"):
        evaluate(tiny_bench, lambda s, p, seeds: torch.rand(len(p), 32, 32, 3), dino, clip, images_per_prompt=2)
    with pytest.raises(ValueError, match=r"expected 0..1 \(map -1..1 images"):
        evaluate(tiny_bench, lambda s, p, seeds: torch.rand(len(p), 3, 32, 32) * 2 - 1, dino, clip)
    with pytest.raises(ValueError, match="subject 'teapot' is not in"):
        evaluate(tiny_bench, noise_images, dino, clip, subjects=["teapot"])
    with pytest.raises(ValueError, match="images_per_prompt=0"):
        evaluate(tiny_bench, noise_images, dino, clip, images_per_prompt=0)
    with pytest.raises(ValueError, match="token=''"):
        evaluate(tiny_bench, noise_images, dino, clip, token="")


def test_the_real_subset_with_tiny_encoders(encoders):
    """Full-size photos of several sizes go to the encoders as they are: 25 prompts for one subject."""
    dino, clip = encoders
    result = evaluate(read_dreambench(MINI), noise_images, dino, clip, images_per_prompt=1,
                      subjects=["cat"])["subjects"]["cat"]
    assert result["n_images"] == 25 and result["n_references"] == 5 and result["live"]
    assert all(-1 <= result[m] <= 1 for m in ("dino", "clip_i")) and 0 <= result["clip_t"] <= 1


# ----------------------------------------------------------------------------------------------- pipelines

def test_pipeline_generator_uses_each_subjects_lora(tiny_bench):
    pipe = load_pipeline(TINY, device="cpu")
    generate = dreambench.pipeline_generator(pipe, {"red_ball": TINY_R0_LORA}, steps=2)
    prompts, seeds = ["a sks ball in the jungle"] * 2, [0, 1]
    with_lora = generate(tiny_bench.subject("red_ball"), prompts, seeds)
    assert lora.active_loras(pipe) == [("dreambench_red_ball", 1.0)]
    bare = generate(tiny_bench.subject("dog"), prompts, seeds)
    assert lora.active_loras(pipe) == []
    assert with_lora.shape == bare.shape == (2, 3, 32, 32) and not torch.allclose(with_lora, bare, atol=1e-3)
    assert torch.equal(generate(tiny_bench.subject("red_ball"), prompts, seeds), with_lora)


def test_command_line_on_the_tiny_dataset(tiny_bench, dino_dir, tmp_path, capsys):
    out = tmp_path / "out"
    summary = dreambench.main(["--data", tiny_bench.root, "--dino", dino_dir, "--clip", TINY, "--model", TINY,
                               "--lora", f"red_ball={TINY_R0_LORA}", "--steps", "4", "--images-per-prompt", "1",
                               "--device", "cpu", "--out", str(out)])
    assert {n: r["n_images"] for n, r in summary["subjects"].items()} == N_PROMPTS
    assert json.loads((out / "results.json").read_text()) == summary
    assert (out / "dog.png").is_file() and "| **mean** (2 subjects) |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="subject 'cup' is not in"):
        dreambench.main(["--data", tiny_bench.root, "--dino", dino_dir, "--clip", TINY, "--model", TINY,
                         "--lora", "cup=x.safetensors", "--out", str(out)])


def test_processes_split_the_subjects_and_join_their_files(tiny_bench, dino_dir, tmp_path):
    """Two processes (torchrun on the CPU; `accelerate launch` on GPUs) give one subject each and the main process
    joins the files: the same results as one process."""
    import os
    import subprocess
    import sys

    args = ["-m", "rpo_core.dreambench", "--data", tiny_bench.root, "--dino", dino_dir, "--clip", TINY, "--model",
            TINY, "--steps", "2", "--images-per-prompt", "1", "--device", "cpu", "--no-grids"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                    *args, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True, timeout=300)
    one = dreambench.main(args[2:] + ["--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(two["subjects"]) == sorted(one["subjects"]) == sorted(N_PROMPTS)
    for name in N_PROMPTS:
        for metric in ("dino", "clip_i", "clip_t"):
            assert two["subjects"][name][metric] == pytest.approx(one["subjects"][name][metric], abs=1e-6)

