"""The measurement protocol: a stable validation/test split of the held-out captions, cells of every caption x
seeds, bootstrap intervals over captions, paired differences, spreads over training seeds, and result files
that name their command and commit."""
import collections
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest

from r0_core.tiny import protocol, world

# captions of the held-out sets (world.prompt_split), named here so that a change of the split rule shows up
NAMED = {"positioned": ["a purple square at the top", "a blue circle in the middle", "a yellow square on the right"],
         "pair": ["a green square below a red square", "a purple circle right of a yellow circle",
                  "a green square left of a blue square"]}


def _held_out(kind):
    return [world.caption(s) for s in world.prompt_split(kind)[1]]


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("kind", protocol.KINDS)
def test_halves_are_disjoint_and_together_the_held_out_set(kind):
    halves = protocol.split(kind)
    assert set(halves) == set(protocol.HALVES)
    validation, test = halves["validation"], halves["test"]
    assert not set(validation) & set(test)
    assert sorted(validation + test) == sorted(_held_out(kind))
    assert len(validation) - len(test) in (0, 1) and len(test) > 10
    assert protocol.split(kind) == halves  # the same again: nothing random in the rule


@pytest.mark.parametrize("kind", protocol.KINDS)
def test_named_captions_fall_in_the_half_their_sha256_rank_gives(kind):
    held = _held_out(kind)
    halves = protocol.split(kind)
    for caption in NAMED[kind]:
        assert caption in held, f"{caption!r} is no longer a held-out {kind} caption"
        # rank among the held-out captions by SHA-256 of the text: even ranks validate, odd ranks test
        rank = sum(_digest(other) < _digest(caption) for other in held)
        assert caption in halves["validation" if rank % 2 == 0 else "test"]
    first = min(held, key=_digest)
    assert halves["validation"][0] == first


def test_split_rejects_unknown_kind_and_half():
    with pytest.raises(ValueError, match="'single' has no held-out captions"):
        protocol.split("single")
    with pytest.raises(ValueError, match="choose settings on 'validation'"):
        protocol.captions("pair", "train")
    with pytest.raises(ValueError, match="seeds=0"):
        protocol.cell("pair", "test", 0)


@pytest.mark.parametrize("seeds", [1, 3, protocol.SEEDS])
def test_every_test_caption_appears_seeds_times_in_a_cell(seeds):
    for kind in protocol.KINDS:
        test = protocol.captions(kind, "test")
        prompts, groups = protocol.cell(kind, "test", seeds)
        assert collections.Counter(prompts) == {c: seeds for c in test}
        assert [test[g] for g in groups] == prompts  # each image's group is its caption's index
        assert prompts[:seeds] == [test[0]] * seeds  # caption-major, so image i's seed is seed + i


def _verdicts(rng, captions, seeds, rates=None):
    """1/0 verdicts of `seeds` images per caption, each caption with its own success rate."""
    rates = rng.uniform(0, 1, captions) if rates is None else rates
    return (rng.random((captions, seeds)) < rates[:, None]).astype(float).ravel(), np.repeat(np.arange(captions),
                                                                                             seeds)


def test_summarize_interval_contains_the_mean_and_shrinks_with_more_captions():
    rng = np.random.default_rng(1)
    widths = []
    for captions in (20, 80, 320):
        values, groups = _verdicts(rng, captions, 8)
        s = protocol.summarize(values, groups)
        assert s["low"] <= s["mean"] <= s["high"] and s["low"] < s["high"]
        assert s["mean"] == pytest.approx(values.mean())  # equal group sizes: the plain mean
        assert (s["images"], s["captions"]) == (captions * 8, captions)
        widths.append(s["high"] - s["low"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] > 2.5  # about sqrt(16) = 4 for 16 times the captions


def test_summarize_weighs_captions_not_images():
    s = protocol.summarize([1, 1, 1, 0], [0, 0, 0, 1])
    assert s["mean"] == 0.5 and s["captions"] == 2
    with pytest.raises(ValueError, match="equal-length"):
        protocol.summarize([1, 0], [0])


def test_paired_is_zero_for_identical_settings_and_has_the_right_sign():
    rng = np.random.default_rng(2)
    a, groups = _verdicts(rng, 40, 8)
    same = protocol.paired(a, a, groups)
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0
    better = np.maximum(a, rng.random(len(a)) < 0.3)  # a, with some failures turned into successes
    up, down = protocol.paired(better, a, groups), protocol.paired(a, better, groups)
    assert up["diff"] == pytest.approx(better.mean() - a.mean()) and up["diff"] > 0 and up["low"] > 0
    assert down["diff"] == pytest.approx(-up["diff"]) and down["high"] < 0
    # pairing removes caption difficulty: the paired interval is narrower than either setting's own
    assert up["high"] - up["low"] < protocol.summarize(a, groups)["high"] - protocol.summarize(a, groups)["low"]


def test_across_seeds_needs_two_seeds():
    with pytest.raises(ValueError, match="at least 2"):
        protocol.across_seeds([0.5])
    s = protocol.across_seeds([0.2, 0.4])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert (s["min"], s["max"], s["seeds"]) == (0.2, 0.4, 2)


def test_write_results_writes_json_and_markdown_with_command_and_commit(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()
    argv = [os.path.join(root, "benchmarks", "tiny_quality.py"), "--seeds", "1"]
    paths = protocol.write_results("demo", {"cells": {"a": 0.25}}, "| x |\n|---|\n| 1 |", out=str(tmp_path),
                                   argv=argv)
    assert paths == (str(tmp_path / "demo.json"), str(tmp_path / "demo.md"))
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["cells"] == {"a": 0.25}
    assert data["provenance"]["command"] == "python benchmarks/tiny_quality.py --seeds 1"
    assert data["provenance"]["commit"].split("+")[0] == head
    text = (tmp_path / "demo.md").read_text()
    assert "python benchmarks/tiny_quality.py --seeds 1" in text and head in text and text.endswith("| 1 |\n")
    assert sorted(os.listdir(tmp_path)) == ["demo.json", "demo.md"]  # no temporary files left behind


def test_resample_captions_gives_an_interval_around_a_statistic_and_none_for_a_constant():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(30), 4)
    values = rng.random(len(groups))
    low, high = protocol.resample_captions(lambda idx: values[idx].mean(), groups)
    assert low < values.mean() < high
    assert all(np.isnan(protocol.resample_captions(lambda idx: float("nan"), groups)))


def test_kept_records_round_trip_and_refuse_other_settings(tmp_path, monkeypatch):
    """benchmarks/kept.py: a finished row's outcomes come back as written, only under the settings they were made
    with, and a rewrite leaves no temporary file behind."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import kept
    monkeypatch.setattr(kept, "ROOT", str(tmp_path))
    key = {"row": ("r0", {"eta_range": (0.5, 0.5)}), "seeds": 8, "lr": [3e-4, 1e-3]}
    value = {"cells": {0: {"pair": {"correct": np.array([True, False, True]), "clip": np.float32([0.1234567, 2])}}},
             "train_seconds": {0: 597.36044}}
    assert kept.load("bench", "row", key) is None
    path = kept.save("bench", "row", key, value)
    assert path == os.path.join(str(tmp_path), "bench_runs", "row.json")
    back = kept.load("bench", "row", key)
    assert back["cells"]["0"]["pair"]["correct"] == [1, 0, 1]
    assert back["cells"]["0"]["pair"]["clip"] == [0.123457, 2.0] and back["train_seconds"]["0"] == 597.36
    assert kept.load("bench", "row", key | {"seeds": 4}) is None
    kept.save("bench", "row", key | {"seeds": 4}, {"x": 1})
    assert kept.load("bench", "row", key | {"seeds": 4}) == {"x": 1}
    assert os.listdir(os.path.dirname(path)) == ["row.json"]
