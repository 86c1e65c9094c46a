"""The tiny world's RPO subjects: prompts, references, the DreamBench layout and the subject oracle."""
import numpy as np
import pytest

from r0_core.loading import TINY, load_pipeline
from r0_core.tiny import subjects, world
from rpo_core.dreambench import read_dreambench


def test_prompt_lists_are_dreambench_like_and_disjoint():
    for subject in subjects.SUBJECTS:
        evaluation, training = subjects.evaluation_prompts(subject), subjects.training_prompts(subject)
        assert len(evaluation) == len(set(evaluation)) == 25 and len(training) == 8
        assert not set(evaluation) & set(training)
        assert all(subject.token in p.split() and subject.shape in p.split() for p in evaluation + training)
        kinds = [subjects.parse(p, subject) for p in evaluation]
        assert sum(k.position is not None for k in kinds) == 5
        assert sum(k.relation is not None for k in kinds) == 16
        assert sum(k.colour is not None for k in kinds) == 4


def test_rare_tokens_are_known_word_pieces_never_seen_as_words():
    tokenizer = load_pipeline(TINY).tokenizer
    unknown = tokenizer.unk_token
    for subject in subjects.SUBJECTS:
        pieces = tokenizer.tokenize(subject.prompt())
        assert unknown not in pieces and len(pieces) > 3   # the token splits into known pieces
        assert subject.token not in world.training_captions() and all(
            subject.token not in c.split() for c in world.training_captions())


def test_oracle_passes_true_renders_and_fails_plain_shapes_and_noise():
    passed = total = 0
    for subject in subjects.SUBJECTS:
        for seed, prompt in enumerate(subjects.evaluation_prompts(subject) * 2):
            verdict = subjects.judge(subjects.render(subject, prompt, seed), prompt, subject)
            passed += verdict.subject_ok and verdict.prompt_ok and verdict.valid
            total += 1
    assert passed / total >= 0.98
    rng = np.random.default_rng(0)
    for subject in subjects.SUBJECTS:
        plain = [world.render(world.Scene((world.Obj(c, subject.shape),)), seed)
                 for seed, c in enumerate(list(world.COLOURS) * 4)]
        assert not any(subjects.judge(im, subject.prompt(), subject).subject_ok for im in plain)
        noise = rng.random((20, 32, 32, 3)).astype(np.float32)
        assert np.mean([subjects.judge(im, subject.prompt(), subject).subject_ok for im in noise]) <= 0.05


def test_oracle_checks_the_rest_of_the_prompt():
    subject = subjects.SUBJECTS[1]
    left = subjects.render(subject, subject.prompt("on the left"), 3)
    assert subjects.judge(left, subject.prompt("on the left"), subject).prompt_ok
    assert not subjects.judge(left, subject.prompt("on the right"), subject).prompt_ok
    pair = subjects.render(subject, subject.prompt("above a blue circle"), 4)
    assert subjects.judge(pair, subject.prompt("above a blue circle"), subject).prompt_ok
    assert not subjects.judge(pair, subject.prompt("below a blue circle"), subject).prompt_ok
    assert not subjects.judge(pair, subject.prompt("above a red circle"), subject).prompt_ok
    with pytest.raises(ValueError, match="not a prompt for subject"):
        subjects.judge(pair, "a red circle", subject)


def test_references_in_the_dreambench_layout_read_back(tmp_path):
    dataset = subjects.write_dreambench(str(tmp_path))
    bench = read_dreambench(dataset)
    assert sorted((s.name, s.class_name, len(s.image_paths)) for s in bench.subjects) == sorted(
        (s.name, s.shape, subjects.REFERENCES_PER_SUBJECT) for s in subjects.SUBJECTS)
    subject = subjects.SUBJECTS[0]
    assert bench.prompts_for(subject.name, subject.token) == subjects.evaluation_prompts(subject)
