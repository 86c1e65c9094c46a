"""ALIGN reward (RPO's encoder): exact against AlignModel + the real ALIGN processor on tiny random weights of the
real architecture (EfficientNet + BERT), differentiable, clear folder errors, and usable by λ-Harmonic."""
import shutil

import pytest
import torch
from transformers import AlignModel, AlignProcessor, BertTokenizer, EfficientNetImageProcessor

from r0_core.loading import TINY_CLIP_DIR
from r0_core.rewards.align import AlignScore, image_settings
from r0_core.rewards.composite import LambdaHarmonic, lambda_harmonic
from tests.reward_weights import ALIGN_BASE_PREPROCESSOR, save_align

PROMPTS = ["a photo of a dog", "a red circle on the left", "a green triangle above a blue square"]


@pytest.fixture(scope="module")
def random_align(tmp_path_factory):
    """A tiny random AlignModel (tiny EfficientNet + tiny BERT), align-base's image processor scaled down (346/289
    -> 38/32), and a BERT WordPiece vocab.txt of a few dozen words, as align-base ships them."""
    folder = tmp_path_factory.mktemp("align")
    save_align(folder)
    return folder


def reference_scores(folder, images, prompts, **processor_kwargs):
    """cos(image, text) from AlignModel.forward, with inputs from the real AlignProcessor (0..255 float pixels)."""
    processor = AlignProcessor(EfficientNetImageProcessor.from_pretrained(folder),
                               BertTokenizer.from_pretrained(folder))
    inputs = processor(text=prompts, images=list(images * 255), return_tensors="pt", **processor_kwargs)
    model = AlignModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal() * model.temperature, inputs


def test_align_base_preprocessing_is_resize_346_crop_289_and_2x_minus_1():
    settings = image_settings(ALIGN_BASE_PREPROCESSOR)
    assert settings["size"] == (346, 346) and settings["crop"] == 289 and settings["mode"] == "bilinear"
    assert torch.allclose(torch.tensor(settings["mean"]), torch.full((3,), 0.5))
    assert torch.allclose(torch.tensor(settings["std"]), torch.full((3,), 0.5))


def test_align_score_equals_align_model_with_the_real_processor(random_align):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 38, 38)  # already at `size`: the processor only centre-crops to 32, then rescales
    scorer = AlignScore.from_pretrained(str(random_align)).eval()
    ours = scorer(images, PROMPTS)
    reference, inputs = reference_scores(random_align, images, PROMPTS, do_resize=False)

    assert inputs.input_ids.shape[1] == 64  # AlignProcessor pads to 64 tokens, as the scorer does
    assert torch.allclose(scorer.pixels(images), inputs.pixel_values, rtol=1e-5, atol=1e-6)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    rel = ((ours - reference).abs() / reference.abs()).max().item()
    print(f"max relative parity error {rel:.3g}")
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-7), (ours, reference)
    assert (ours != ours[0]).any()  # not a constant


def test_resize_path_matches_the_processor_and_gradients_reach_the_images(random_align):
    scorer = AlignScore.from_pretrained(str(random_align)).eval()
    torch.manual_seed(2)
    # exact 38x38 resize (aspect not kept), then crop 32; 8-bit values so the processor's PIL path takes them
    images = ((torch.rand(2, 3, 48, 40) * 255).round() / 255).requires_grad_(True)
    scores = scorer(images, "a photo of a dog")
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    # the processor resizes 8-bit images with PIL's antialiased bilinear and rounds to 8 bits; ours stays float
    reference, inputs = reference_scores(random_align, images.detach(), ["a photo of a dog"] * 2)
    assert inputs.pixel_values.shape[-2:] == (32, 32)
    pixel_error = (scorer.pixels(images.detach()) - inputs.pixel_values).abs()
    print(f"resize path: max |pixel diff| {pixel_error.max():.3g} (8-bit step = {2 / 255:.3g}), "
          f"mean {pixel_error.mean():.3g}; scores {scores.tolist()} vs {reference.tolist()}")
    assert pixel_error.max() < 3 / 255 and pixel_error.mean() < 1 / 255
    assert torch.allclose(scores.detach(), reference, rtol=1e-2, atol=1e-3)
    assert (scores[0] - scores[1]).abs() > 1e-3  # the image tower reads the image


def test_other_file_formats_load_the_same_model(random_align, tmp_path):
    """pytorch_model.bin instead of model.safetensors, tokenizer.json instead of vocab.txt."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(random_align / name, folder / name)
    model = AlignModel.from_pretrained(random_align)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    BertTokenizer.from_pretrained(random_align).save_pretrained(folder)
    (folder / "vocab.txt").unlink(missing_ok=True)
    assert (folder / "tokenizer.json").exists() and not (folder / "model.safetensors").exists()
    images = torch.rand(2, 3, 38, 38)
    a = AlignScore.from_pretrained(str(random_align)).eval()(images, PROMPTS[:2])
    b = AlignScore.from_pretrained(str(folder)).eval()(images, PROMPTS[:2])
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_wrong_folder_and_missing_files_are_named(random_align, tmp_path):
    with pytest.raises(ValueError, match="model_type 'clip'.*ALIGN"):
        AlignScore.from_pretrained(TINY_CLIP_DIR)
    (tmp_path / "config.json").write_text('{"model_type": "align"}')
    with pytest.raises(FileNotFoundError, match="lacks preprocessor_config.json; model.safetensors.*; vocab.txt"):
        AlignScore.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        AlignScore.from_pretrained(str(tmp_path / "nowhere"))
    scorer = AlignScore.from_pretrained(str(random_align))
    with pytest.raises(ValueError, match="one per image"):
        scorer(torch.rand(2, 3, 38, 38), ["a", "b", "c"])


def test_lambda_harmonic_over_align(random_align):
    scorer = AlignScore.from_pretrained(str(random_align)).eval().requires_grad_(False)
    torch.manual_seed(3)
    images = torch.rand(2, 3, 38, 38, requires_grad=True)
    references = torch.rand(4, 3, 44, 36)  # the subject's photos, any size
    reward = LambdaHarmonic(scorer, 0.5)(images, PROMPTS[:2], references)

    with torch.no_grad():
        image, refs = scorer.image_embeds(images), scorer.image_embeds(references)
        text = scorer.text_embeds(PROMPTS[:2])
        expected = lambda_harmonic((image @ refs.T).mean(1), scorer(images, PROMPTS[:2]), 0.5)
    assert torch.allclose((image * text).sum(-1), scorer(images, PROMPTS[:2]).detach(), atol=1e-6)
    assert torch.allclose(reward.detach(), expected, atol=1e-6)
    assert ((reward > 0) & (reward <= 1)).all()
    reward.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reference images"):
        LambdaHarmonic(scorer, 0.5)(images, PROMPTS[:2])
