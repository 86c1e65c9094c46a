"""Reference images: every file mode becomes upright RGB on white, fit keeps the centre at the asked size, folders
and ComfyUI IMAGE batches load as [N, 3, h, w], and bad files are named."""
import numpy as np
import pytest
import torch
from PIL import Image

from rpo_core.references import fit, image_batch, image_files, load_image, load_references

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def colour_at(image: torch.Tensor, y: int, x: int) -> list[float]:
    return [round(v, 2) for v in image[:, y, x].tolist()]


def thirds(width: int, height: int) -> Image.Image:
    """Red, green and blue vertical thirds (or horizontal ones for a tall image)."""
    image = np.zeros((height, width, 3), np.uint8)
    long, tall = max(width, height), height > width
    for i, colour in enumerate((RED, GREEN, BLUE)):
        part = slice(i * long // 3, (i + 1) * long // 3)
        image[(part, slice(None)) if tall else (slice(None), part)] = colour
    return Image.fromarray(image)


def test_transparent_png_is_composited_onto_white(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)  # left half: transparent black, the colour a cut-out often hides
    rgba[:, 10:] = (0, 255, 0, 255)
    rgba[0, 10] = (255, 0, 0, 128)  # half-transparent red over white: pink
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    image = load_image(tmp_path / "cutout.png")
    assert image.shape == (3, 10, 20) and image.dtype == torch.float32
    assert torch.equal(image[:, :, :10], torch.ones(3, 10, 10))
    assert colour_at(image, 5, 15) == [0.0, 1.0, 0.0]
    assert colour_at(image, 0, 10) == pytest.approx([1.0, 0.5, 0.5], abs=0.01)


def test_palette_png_with_a_transparent_index_is_white_there(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png", transparency=0)
    image = load_image(tmp_path / "palette.png")
    assert colour_at(image, 0, 0) == [1.0, 1.0, 1.0] and colour_at(image, 3, 3) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("mode, value, suffix, expected", [
    ("L", 128, ".jpg", [0.5, 0.5, 0.5]),  # greyscale JPEG
    ("CMYK", (0, 255, 255, 0), ".jpg", [1.0, 0.0, 0.0]),  # print-ready JPEGs: red without black
    ("LA", (0, 0), ".png", [1.0, 1.0, 1.0]),  # transparent grey
    ("I;16", 32768, ".png", [0.5, 0.5, 0.5]),  # 16-bit greyscale: 0..65535, not 0..255
])
def test_every_mode_becomes_rgb(tmp_path, mode, value, suffix, expected):
    path = tmp_path / f"image{suffix}"
    Image.new(mode, (12, 8), value).save(path, quality=95)  # PNG ignores quality
    image = load_image(path)
    assert image.shape == (3, 8, 12)
    assert colour_at(image, 4, 6) == pytest.approx(expected, abs=0.03)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape: red left half, blue right half
    stored[:, :20], stored[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": how phones save portrait shots
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "phone.jpg")
    # rotated clockwise, the left edge becomes the top: a portrait with red above blue
    assert image.shape == (3, 40, 20)
    assert colour_at(image, 5, 10) == pytest.approx([1.0, 0.0, 0.0], abs=0.05)
    assert colour_at(image, 35, 10) == pytest.approx([0.0, 0.0, 1.0], abs=0.05)


@pytest.mark.parametrize("width, height", [(90, 30), (30, 90)])
def test_fit_keeps_the_centre_of_a_non_square_image(width, height):
    image = torch.from_numpy(np.asarray(thirds(width, height), np.float32) / 255).permute(2, 0, 1)
    fitted = fit(image, 15)  # shortest side 30 -> 15, the long side 90 -> 45, its middle 15 kept: the green third
    assert fitted.shape == (3, 15, 15)
    assert colour_at(fitted, 7, 7) == [0.0, 1.0, 0.0]
    assert fitted[1].mean() > 0.9 and fitted[0].mean() < 0.1 and fitted[2].mean() < 0.1


def test_fit_to_height_and_width_covers_then_crops():
    batch = torch.rand(2, 3, 30, 90)
    fitted = fit(batch, (10, 20))  # covering 10 x 20 needs 30 x 90 -> 10 x 30, then 5 columns off each side
    assert fitted.shape == (2, 3, 10, 20)
    assert torch.allclose(fitted, fit(batch, (10, 30))[..., 5:25])
    upscaled = fit((torch.rand(3, 6, 6) > 0.5).float(), 40)  # bicubic overshoots at sharp edges: clamped
    assert upscaled.shape == (3, 40, 40) and upscaled.min() >= 0 and upscaled.max() <= 1
    with pytest.raises(ValueError, match=r"expected float \[3, H, W\]"):
        fit(torch.rand(32, 32, 3), 16)
    with pytest.raises(ValueError, match="size=0"):
        fit(batch, 0)


def test_corrupt_truncated_and_missing_files_are_named(tmp_path):
    (tmp_path / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    with pytest.raises(ValueError, match="not_an_image.jpg is unreadable or corrupt"):
        load_image(tmp_path / "not_an_image.jpg")
    thirds(64, 64).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg is unreadable or corrupt"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png not found"):
        load_image(tmp_path / "missing.png")


def test_references_from_a_folder_or_a_list(tmp_path):
    thirds(40, 30).save(tmp_path / "b.png")
    thirds(30, 40).save(tmp_path / "a.jpg")
    Image.new("L", (16, 16), 255).save(tmp_path / "c.WEBP")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is no image
    assert [p.rsplit("/", 1)[-1] for p in image_files(tmp_path)] == ["a.jpg", "b.png", "c.WEBP"]
    batch = load_references(tmp_path, 16)
    assert batch.shape == (3, 3, 16, 16) and batch.min() >= 0 and batch.max() <= 1
    assert torch.allclose(batch[2], torch.ones(3, 16, 16), atol=0.02)  # c.WEBP, white
    assert torch.equal(load_references([tmp_path / "b.png", tmp_path / "a.jpg"], (8, 12))[1],
                       load_references(tmp_path, (8, 12))[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no reference images in .*empty"):
        load_references(tmp_path / "empty", 16)
    with pytest.raises(ValueError, match="the list of files"):
        load_references([], 16)


def test_comfy_image_batches_with_1_3_or_4_channels():
    grey = torch.rand(2, 20, 30, 1)
    out = image_batch(grey, 16)
    assert out.shape == (2, 3, 16, 16) and torch.equal(out[:, 0], out[:, 2])
    rgb = torch.rand(2, 20, 30, 3)
    assert torch.equal(image_batch(rgb), rgb.permute(0, 3, 1, 2))  # no size: kept as it is
    rgba = torch.zeros(1, 8, 8, 4)
    rgba[..., :4, 0], rgba[..., :4, 3] = 1.0, 1.0  # left half opaque red; right half transparent black
    out = image_batch(rgba)
    assert out.shape == (1, 3, 8, 8)
    assert colour_at(out[0], 2, 1) == [1.0, 0.0, 0.0] and colour_at(out[0], 2, 6) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"ComfyUI IMAGE batch \[B, H, W, C\]"):
        image_batch(torch.rand(2, 3, 8, 8))
