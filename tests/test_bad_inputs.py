"""The bad-input catalogue: each bad value is refused with an error that names the input and its value (and, where
one exists, the fix), before any work starts; damaged files and failed writes name the file."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from r0_core import lora
from r0_core.files import atomic_save, atomic_write
from r0_core.generate import generate
from r0_core.lcm import LCMConfig
from r0_core.loading import TINY, ModelLoadError, load_pipeline
from r0_core.rewards import load_reward
from r0_core.rewards.composite import WeightedReward
from r0_core.tiny import subjects
from r0_core.train import R0Config, read_prompts
from rpo_core import references
from rpo_core.train import RPOConfig, train_rpo

PROMPT = ["a red circle"]
TINY_SD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "r0_core", "tiny", "weights",
                       "tiny-sd")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def clip():
    return load_reward("clip", "tiny", device="cpu", dtype=torch.float32)


NAN, INF = float("nan"), float("inf")
GENERATE = [  # (keyword arguments, what the message must say)
    ({"guidance": NAN}, r"guidance=nan; expected a finite number"),
    ({"guidance": INF}, r"guidance=inf; expected a finite number"),
    ({"eta": NAN}, r"eta=nan; expected a value in \[0, 1\]"),
    ({"width": 0}, r"width=0; expected a positive whole multiple of 2, or None for the model's own size \(32\)"),
    ({"width": -8}, r"width=-8; expected a positive whole multiple"),
    ({"height": 32.0}, r"height=32.0; expected a positive whole multiple"),
    ({"seeds": [2 ** 64]}, r"seed=18446744073709551616; expected a whole number >= 0 and <= 9223372036854775807"),
    ({"seeds": [-1]}, r"seed=-1; expected a whole number >= 0"),
    ({"steps": 0}, r"steps=0"),
]


@pytest.mark.parametrize("kwargs, message", GENERATE, ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))
                                                            for k, _ in GENERATE])
def test_generate_refuses(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(pipe, PROMPT, **kwargs)


IMAGES = torch.rand(2, 3, 32, 32)
SCORER = [
    (IMAGES * 255, r"images range from .* to 25\d; expected 0..1 \(they look like 0..255 values: divide by 255\)"),
    ((IMAGES * 255).to(torch.uint8), r"images are torch.uint8; expected float images in 0..1"),
    (IMAGES * 2 - 1, r"images range from -\d.* expected 0..1 \(they look like -1..1 values: use \(x \+ 1\) / 2\)"),
    (IMAGES[:0], r"images is an empty batch \(shape \(0, 3, 32, 32\)\)"),
    (torch.full((1, 3, 32, 32), NAN), r"images contain NaN or inf"),
]


@pytest.mark.parametrize("images, message", SCORER, ids=["0..255", "uint8", "-1..1", "empty", "nan"])
def test_scorers_refuse(clip, images, message):
    with pytest.raises(ValueError, match=message):
        clip(images, "a red circle")


CONFIGS = [
    (R0Config, {"lora_targets": "everything"}, r"lora_targets='everything'; expected one of \('attention', 'all'\)"),
    (R0Config, {"reg_weight": -1.0}, r"reg_weight=-1.0; expected a finite number >= 0"),
    (R0Config, {"reg_weight": NAN}, r"reg_weight=nan"),
    (R0Config, {"lr": INF}, r"lr=inf; expected a finite number > 0"),
    (R0Config, {"seed": 2 ** 64}, r"seed=18446744073709551616"),
    (R0Config, {"lora_rank": -1}, r"lora_rank=-1; expected a whole number >= 0"),
    (RPOConfig, {"tau": NAN}, r"tau=nan; expected a finite number > 0"),
    (RPOConfig, {"beta": NAN}, r"beta=nan; expected a finite number >= 0"),
    (RPOConfig, {"lr": INF}, r"lr=inf; expected a finite number > 0"),
    (RPOConfig, {"lora_targets": "x"}, r"lora_targets='x'"),
    (RPOConfig, {"checkpoint_every": 0}, r"checkpoint_every=0; expected a whole number >= 1"),
    (RPOConfig, {"guidance": NAN}, r"guidance=nan"),
    (LCMConfig, {"lr": NAN}, r"lr=nan; expected a finite number > 0"),
    (LCMConfig, {"checkpoint_every": 0}, r"checkpoint_every=0; expected a whole number >= 1"),
    (LCMConfig, {"lora_targets": "everything"}, r"lora_targets='everything'"),
]


@pytest.mark.parametrize("cls, kwargs, message", CONFIGS, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in CONFIGS])
def test_configs_refuse(cls, kwargs, message):
    base = {R0Config: {"prompts": ["a red circle"]}, RPOConfig: {"token": "vum", "class_name": "circle"},
            LCMConfig: {}}[cls]
    with pytest.raises(ValueError, match=message):
        cls(**base, **kwargs)


def test_reward_weights_must_be_finite(clip):
    with pytest.raises(ValueError, match=r"weights\[1\]=nan; expected a finite number"):
        WeightedReward([clip, clip], [1.0, NAN])


def test_rpo_references_and_prompts_are_checked_before_training(pipe, clip, tmp_path):
    config = RPOConfig(token="vum", class_name="circle", iterations=1,
                       prompts=subjects.training_prompts_for("vum", "circle"))
    refs = torch.rand(2, 3, 32, 32)
    paper = RPOConfig(token="vum", class_name="circle", iterations=1)   # the paper's prompts: past 16 tokens
    with pytest.raises(ValueError, match=r"prompts: 'a vum circle in the style of Van Gogh' is 22 tokens long, "
                                         r"past the text encoder's limit of 16"):
        train_rpo(pipe, clip, refs, paper, str(tmp_path / "c"))
    assert subjects.training_prompts_for("vum", "circle") == subjects.training_prompts(subjects.SUBJECTS[0])
    with pytest.raises(ValueError, match=r"references range from .* expected 0..1 \(they look like 0..255"):
        train_rpo(pipe, clip, refs * 255, config, str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"references are 48x48 pixels; this model trains at 32x32: fit them .*"
                                         r"size=32"):
        train_rpo(pipe, clip, torch.rand(2, 3, 48, 48), config, str(tmp_path / "b"))
    assert not any(os.path.exists(tmp_path / d) for d in "abc")   # nothing started


# ----------------------------------------------------------------------------------------------- files

def test_float_tiff_references_load_with_their_values(tmp_path):
    grey = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    Image.fromarray(grey).save(tmp_path / "photo.tif")      # 32-bit float ("F" mode) TIFF
    loaded = references.load_image(tmp_path / "photo.tif")
    assert torch.allclose(loaded[0], torch.from_numpy(grey)) and abs(loaded.mean() - 0.5) < 0.01
    assert references.load_references(str(tmp_path), 32).shape == (1, 3, 32, 32)   # .tif is not skipped
    Image.fromarray(grey * 3).save(tmp_path / "bright.tif")
    with pytest.raises(ValueError, match=r"bright.tif: a 32-bit float image holds values from 0 to 3; expected 0..1"):
        references.load_image(tmp_path / "bright.tif")


def test_files_a_folder_skips_are_named(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING"):
        assert [os.path.basename(p) for p in references.image_files(tmp_path)] == ["a.png"]
    assert "skipping 1 file(s)" in caplog.text and "notes.txt" in caplog.text


def test_decompression_bombs_are_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # PIL refuses images over twice its limit
    with pytest.raises(ValueError, match=r"huge.png is too large to open safely"):
        references.load_image(tmp_path / "huge.png")


def test_prompts_files_must_be_utf8(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"a red \xff circle\n")
    with pytest.raises(ValueError, match=r"prompts.txt is not UTF-8 text \(byte 6"):
        read_prompts(str(tmp_path / "prompts.txt"))
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\n".encode("utf-8"))
    assert read_prompts(str(tmp_path / "bom.txt")) == ["a red circle"]


def test_saves_get_normal_permissions_and_clear_orphans(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    (tmp_path / "lora.safetensors.tmp999999999").write_text("left by a killed save")   # no such process
    (tmp_path / f"lora.safetensors.tmp{os.getppid()}").write_text("a live process's save in progress")
    atomic_write(path, lambda tmp: save_file({"w": torch.zeros(2)}, tmp))   # safetensors itself writes 0600
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors", f"lora.safetensors.tmp{os.getppid()}"]


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    """A file-size limit makes the disk 'full' for this process: torch.save and safetensors fail mid-write."""
    old = str(tmp_path / "state.pt")
    atomic_save({"w": torch.ones(3)}, old)
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from safetensors.torch import save_file
        from r0_core.files import atomic_save, atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        for write in (lambda: atomic_save({{"w": torch.zeros(100000)}}, {old!r}),
                      lambda: atomic_write({old!r} + ".safetensors",
                                           lambda tmp: save_file({{"w": torch.zeros(100000)}}, tmp))):
            try:
                write()
            except OSError as e:
                print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.splitlines()
    assert len(out) == 2 and all(f"could not write {old}" in line and "check the disk has space" in line
                                 for line in out), out
    assert torch.equal(torch.load(old, weights_only=True)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]


def test_a_lora_holding_nan_is_refused(pipe, tmp_path):
    unet = pipe.unet
    name = lora.add_lora(unet, rank=2, name="bad")
    try:
        path = lora.save_lora(unet, str(tmp_path / "bad.safetensors"), name)
    finally:
        unet.delete_adapters(name)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = NAN
    save_file(tensors, path)
    with pytest.raises(lora.LoraError, match=r"bad.safetensors holds NaN or inf in 1 tensor\(s\)"):
        lora.load_lora(pipe, path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickled_and_damaged_model_files_are_named(tmp_path):
    import shutil
    folder = tmp_path / "tiny-sd"
    shutil.copytree(TINY_SD, folder)
    os.remove(folder / "text_encoder" / "model.safetensors")
    with open(folder / "text_encoder" / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(ModelLoadError, match=r"could not load the diffusers pipeline from .*tiny-sd: of its pickled "
                                             r"weight file\(s\) .*text_encoder.pytorch_model.bin, the safe loader"):
        load_pipeline(str(folder), device="cpu")
    clip_dir = tmp_path / "clip"
    shutil.copytree(os.path.join(os.path.dirname(TINY_SD), "tiny-clip"), clip_dir)
    (clip_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"could not load the clip reward from .*clip \(SafetensorError"):
        load_reward("clip", str(clip_dir), device="cpu")


# ----------------------------------------------------------------------------------------------- memory

def test_requests_too_large_for_memory_are_refused_with_the_estimate(pipe, clip, monkeypatch, tmp_path):
    from r0_core.memory import LIMIT_ENV, per_image_bytes
    from r0_core.test_time import refine_noise
    from r0_core.train import train_r0
    # the node's largest request, 64 images at 4096 x 4096, on this machine's memory
    with pytest.raises(MemoryError, match=r"generation of 1 image\(s\) at 4096x4096 needs about [\d.]+ GB .* free "
                                          r"on cpu; use a smaller width/height"):
        monkeypatch.setenv(LIMIT_ENV, "4")
        generate(pipe, PROMPT * 64, width=4096, height=4096)
    with pytest.raises(MemoryError, match=r"R0 training of 8 image\(s\) at 1024x1024"):
        train_r0(pipe, clip, R0Config(prompts=PROMPT, height=1024, width=1024), str(tmp_path / "r0"))
    with pytest.raises(MemoryError, match=r"test-time refinement of 4 image\(s\) at 2048x2048"):
        refine_noise(pipe, clip, PROMPT[0], batch_size=4, height=2048, width=2048)
    assert not os.path.exists(tmp_path / "r0")
    # estimates grow with the pixels, CFG and training
    small = per_image_bytes(pipe, 32, 32, cfg=False)
    assert per_image_bytes(pipe, 64, 64, cfg=False) == 4 * small < per_image_bytes(pipe, 64, 64, cfg=True)
    assert per_image_bytes(pipe, 32, 32, cfg=False, training=True) > small


def test_batches_beyond_memory_run_in_chunks_with_the_same_images(pipe, monkeypatch):
    from r0_core.memory import LIMIT_ENV, per_image_bytes
    whole, _ = generate(pipe, PROMPT * 5, guidance=2.0, seeds=range(5))
    per_image = per_image_bytes(pipe, 32, 32, cfg=True)
    monkeypatch.setenv(LIMIT_ENV, str(2.5 * per_image / 0.9 / 2 ** 30))   # room for 2 images at a time
    chunked, _ = generate(pipe, PROMPT * 5, guidance=2.0, seeds=range(5))
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_r0_says_it_leaves_active_loras_out(clip, tmp_path, caplog):
    from r0_core.train import train_r0
    pipe = load_pipeline(TINY, device="cpu", dtype=torch.float32)
    lora.add_lora(pipe.unet, rank=2, name="style")
    with caplog.at_level("WARNING", logger="r0_core.train"):
        train_r0(pipe, clip, R0Config(prompts=PROMPT, iterations=1, batch_size=1), str(tmp_path / "r0"))
    assert "active LoRA(s) style take no part in training" in caplog.text
