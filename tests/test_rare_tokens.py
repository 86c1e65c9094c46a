"""The subjects' rare tokens behave as "sks" does in Stable Diffusion: the shipped base model ignores them (the
image is what the caption without the token asks for), the text encoder still tells them apart (so fine-tuning
can give them a meaning), and every nonsense word of the world is spelled from known word pieces.
benchmarks/rare_tokens.py measures the same at full size."""
import numpy as np
import pytest
import torch

from r0_core.generate import generate
from r0_core.loading import TINY, load_pipeline
from r0_core.tiny import oracle, subjects, world

from benchmarks.rare_tokens import insert_token, token_difference

SEEDS = 8
STEPS = 4
GUIDANCE = 2.0
# one caption per subject, its token before its own class; plain captions the base model draws well
CAPTIONS = ["a red circle on the left", "a green square on the right", "a blue triangle at the top"]
RELATION = ("a vum circle left of a red square", "a circle left of a red square", "a circle left of a blue square")


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return load_pipeline(TINY)


@pytest.fixture(scope="module")
def images(pipe):
    """Every image of the module in one sampler call: the plain captions, the captions with their subject's token
    and the three relation prompts, each from the same SEEDS noise seeds (so two prompts differ only by text)."""
    with_token = [insert_token(c, s.token) for c, s in zip(CAPTIONS, subjects.SUBJECTS)]
    prompts = list(CAPTIONS) + with_token + list(RELATION)
    with torch.no_grad():
        out, _ = generate(pipe, [p for p in prompts for _ in range(SEEDS)], steps=STEPS, guidance=GUIDANCE,
                          seeds=list(range(SEEDS)) * len(prompts))
    out = out.permute(0, 2, 3, 1).numpy()
    return dict(zip(prompts, out.reshape(len(prompts), SEEDS, *out.shape[1:])))


def test_a_rare_token_before_the_noun_keeps_the_caption_drawn(images):
    """'a red vum circle on the left' judged as 'a red circle on the left' must be about as accurate as the plain
    caption (SD draws 'a sks dog' as a dog); the old world's model, which never saw such words, derails."""
    plain = np.mean([oracle.judge(im, c).correct for c in CAPTIONS for im in images[c]])
    token = np.mean([oracle.judge(im, c).correct for c, s in zip(CAPTIONS, subjects.SUBJECTS)
                     for im in images[insert_token(c, s.token)]])
    assert plain >= 0.5, f"the plain captions are drawn right only {plain:.0%} of the time: nothing to compare"
    # the old world's model: 17% with the tokens against 96% without
    assert token >= 0.8 * plain, f"with the rare tokens {token:.0%} against {plain:.0%} without"


def test_a_rare_token_changes_the_image_less_than_a_colour_does(images):
    """The images of 'a vum circle left of a red square' are nearer those of the prompt without the token than
    those of the prompt without it and with the other colour."""
    token, same, changed = (images[p] for p in RELATION)
    d_same, d_changed = np.abs(token - same).mean(), np.abs(token - changed).mean()
    # the margin matters: the old world's model, which the token derails, still gives 0.063 against 0.073
    assert d_same < 0.8 * d_changed, f"distance to {RELATION[1]!r} {d_same:.3f}, to {RELATION[2]!r} {d_changed:.3f}"


def test_the_text_encoder_still_tells_the_token_apart(pipe):
    """Fine-tuning can only give the token a meaning if the UNet's conditioning differs with it."""
    for subject in subjects.SUBJECTS:
        plain = [f"a red {subject.shape} on the left", f"a {subject.shape} above a blue square"]
        figures = token_difference(pipe, [insert_token(c, subject.token) for c in plain], plain)
        # 0.50-0.58 on the old world's encoder; a few percent would still let fine-tuning find the token
        assert figures["relative_l2_after_token"] > 0.05, (subject.token, figures)


def test_nonsense_words_are_known_pieces_and_no_world_word(pipe):
    tokenizer = pipe.tokenizer
    vocab, words = tokenizer.get_vocab(), world.nonsense_words()
    assert {s.token for s in subjects.SUBJECTS} <= set(words)
    assert not set(words) & set(world.vocabulary())
    for word in words:
        pieces = tokenizer.tokenize(word)
        assert len(pieces) > 1 and all(p in vocab for p in pieces), (word, pieces)   # spelled, never a whole word
        assert tokenizer.unk_token_id not in tokenizer(word, add_special_tokens=False).input_ids, (word, pieces)
