"""LoRA on the tiny UNet: peft adapters, the kohya-format file (names, round trip through diffusers' loader),
adapter switching, the ‖ΔW‖² regulariser, and clear errors for files that do not fit."""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from r0_core import lora
from r0_core.generate import generate
from r0_core.loading import TINY, load_pipeline

PROMPTS = ["a red circle left of a blue square"]
KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def fresh():
    return load_pipeline(TINY)


def images(pipe):
    with torch.no_grad():
        return generate(pipe, PROMPTS, steps=2, guidance=2.0, seeds=[0])[0]


def perturb(unet, name, seed=0, std=0.05):
    """A train-like step: give every LoRA B (and A) non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(unet, name):
            p.copy_(torch.randn(p.shape, generator=gen) * std + p)


_PLAIN = {}


def plain():
    """An un-adapted tiny pipeline (shared, never modified)."""
    if "pipe" not in _PLAIN:
        _PLAIN["pipe"] = fresh()
    return _PLAIN["pipe"]


def plain_unet():
    return plain().unet


def matching_modules(targets):
    """Module paths of the plain UNet's Linear/Conv2d layers whose name ends with one of `targets`."""
    return {n for n, m in plain_unet().named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in targets)}


@pytest.fixture(scope="module")
def base_images():
    return images(plain())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pipeline with a perturbed rank-4 LoRA on every supported target, its images and its saved file."""
    pipe = fresh()
    lora.add_lora(pipe.unet, rank=4, alpha=2.0, targets=lora.ALL + lora.EXTRA, name="r0")
    perturb(pipe.unet, "r0")
    path = str(tmp_path_factory.mktemp("lora") / "trained.safetensors")
    assert lora.save_lora(pipe.unet, path, "r0", metadata={"lr": 1e-3, "note": "test"}) == path
    return pipe, images(pipe), path


def test_add_lora_freezes_the_base_and_starts_at_the_base_model(base_images):
    pipe = fresh()
    assert lora.add_lora(pipe.unet, rank=4) == "r0"
    params = lora.lora_parameters(pipe.unet, "r0")
    adapted = matching_modules(lora.ATTENTION)
    assert len(params) == 2 * len(adapted) and len(adapted) == 4 * 2 * 7  # q k v out, 2 attentions, 7 transformers
    ours = {id(p) for p in params}
    assert all(p.requires_grad == (id(p) in ours) for p in pipe.unet.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert pipe.unet.peft_config["r0"].lora_alpha == 4  # alpha defaults to the rank
    assert torch.equal(images(pipe), base_images), "gaussian init has B = 0: the adapted UNet is the base one"
    assert lora.lora_delta_norm2(pipe.unet, "r0").item() == 0.0


def test_add_lora_again_replaces_the_adapter_and_checks_its_arguments():
    pipe = fresh()
    lora.add_lora(pipe.unet, rank=2, name="other")
    lora.add_lora(pipe.unet, rank=4, name="r0")
    perturb(pipe.unet, "r0")
    old = [p.detach().clone() for p in lora.lora_parameters(pipe.unet, "r0")]
    lora.add_lora(pipe.unet, rank=8, targets=lora.ALL, name="r0")
    new = lora.lora_parameters(pipe.unet, "r0")
    assert sorted(pipe.unet.peft_config) == ["other", "r0"] and pipe.unet.peft_config["r0"].r == 8
    assert len(new) == 2 * len(matching_modules(lora.ALL)) and new[0].shape[0] == 8
    assert lora.lora_delta_norm2(pipe.unet, "r0").item() == 0.0 != float((old[1] ** 2).sum())
    assert lora.active_loras(pipe) == [("r0", 1.0)]
    assert all(p.requires_grad for p in new)
    assert not any(p.requires_grad for p in lora.lora_parameters(pipe.unet, "other"))
    for bad in (dict(rank=0), dict(alpha=-1.0), dict(targets=("norm1",)), dict(targets=()), dict(name="a.b"),
                dict(name="train"), dict(init="pissa")):
        with pytest.raises(ValueError):
            lora.add_lora(pipe.unet, **bad)
    with pytest.raises(ValueError, match="no LoRA adapter 'missing'"):
        lora.lora_parameters(pipe.unet, "missing")


def test_kohya_keys_name_real_unet_modules(trained):
    pipe, _, path = trained
    state = load_file(path)
    assert all(KEY.match(k) for k in state), [k for k in state if not KEY.match(k)][:3]
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert all(f"{m}.{s}" in state for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert len(state) == 3 * len(modules)
    # resolve kohya names against the diffusers module names of an un-adapted UNet, independently of r0_core.lora
    plain = dict(plain_unet().named_modules())
    by_kohya = {name.replace(".", "_"): name for name in plain if name}
    assert len(by_kohya) == len(plain) - 1, "the underscore form must be unambiguous"
    resolved = {by_kohya[m[len("lora_unet_"):]] for m in modules}
    assert resolved == matching_modules(lora.ALL + lora.EXTRA)
    for target in lora.ALL + lora.EXTRA:
        assert any(r.endswith("." + target) or r == target for r in resolved), target
    for m in modules:
        weight = plain[by_kohya[m[len("lora_unet_"):]]].weight
        down, up, alpha = state[f"{m}.lora_down.weight"], state[f"{m}.lora_up.weight"], state[f"{m}.alpha"]
        assert down.shape[0] == up.shape[1] == 4 and alpha.dim() == 0 and float(alpha) == 2.0
        assert down.shape[1:] == weight.shape[1:] and up.shape[0] == weight.shape[0] and up.dim() == weight.dim()
        assert down.dtype == up.dtype == alpha.dtype == torch.float32
    assert any(state[k].dim() == 4 for k in state), "conv layers are adapted too"


def test_round_trip_through_load_lora_gives_the_same_images(trained, base_images):
    pipe, adapted, path = trained
    assert (adapted - base_images).abs().max() > 1e-2, "the perturbed LoRA must change the images"
    loaded = fresh()
    assert lora.load_lora(loaded, path) == "trained"
    assert lora.active_loras(loaded) == [("trained", 1.0)]
    torch.testing.assert_close(images(loaded), adapted, atol=1e-5, rtol=0)
    # every layer's ΔW arrived on the same module
    def deltas(unet, name):
        return {n: m.scaling[name] * m.lora_B[name].weight.flatten(1) @ m.lora_A[name].weight.flatten(1)
                for n, m in unet.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}

    ours, theirs = deltas(pipe.unet, "r0"), deltas(loaded.unet, "trained")
    assert ours.keys() == theirs.keys() and len(ours) == len(matching_modules(lora.ALL + lora.EXTRA))
    for module in ours:
        torch.testing.assert_close(theirs[module], ours[module], atol=0, rtol=0)
    for p in lora.lora_parameters(loaded.unet, "trained"):
        assert not p.requires_grad
    lora.use_loras(loaded, [])
    assert lora.active_loras(loaded) == []
    torch.testing.assert_close(images(loaded), base_images, atol=1e-6, rtol=0)
    lora.use_loras(loaded, [("trained", 1.0)])
    torch.testing.assert_close(images(loaded), adapted, atol=1e-5, rtol=0)
    with torch.inference_mode():  # as inside a ComfyUI node
        again = fresh()
        assert lora.load_lora(again, path, name="node") == "node"
        torch.testing.assert_close(images(again), adapted, atol=1e-5, rtol=0)
    lora.use_loras(loaded, [("trained", 0.5)])
    assert lora.active_loras(loaded) == [("trained", 0.5)]
    half = images(loaded)
    assert (half - adapted).abs().max() > 1e-3 and (half - base_images).abs().max() > 1e-3


def test_diffusers_format_files_load_too(trained, tmp_path):
    from peft.utils import get_peft_model_state_dict

    pipe, adapted, _ = trained
    layers = get_peft_model_state_dict(pipe.unet, adapter_name="r0")
    type(pipe).save_lora_weights(str(tmp_path), unet_lora_layers=layers,
                                 unet_lora_adapter_metadata=pipe.unet.peft_config["r0"].to_dict())
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") for k in load_file(path))
    loaded = fresh()
    assert lora.load_lora(loaded, path) == "pytorch_lora_weights"
    torch.testing.assert_close(images(loaded), adapted, atol=1e-5, rtol=0)


def test_saving_twice_gives_identical_files_with_metadata(trained, tmp_path):
    pipe, _, path = trained
    again = lora.save_lora(pipe.unet, str(tmp_path / "again.safetensors"), "r0",
                           metadata={"lr": 1e-3, "note": "test"})
    a, b = load_file(path), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == ["again.safetensors"], "no temporary file is left behind"
    with safe_open(path, "pt") as f, safe_open(again, "pt") as g:
        meta = f.metadata()
        assert meta == g.metadata()
    assert meta["r0_lora_rank"] == "4" and meta["r0_lora_alpha"] == "2" and meta["ss_network_dim"] == "4"
    assert set(json.loads(meta["r0_lora_targets"])) == set(lora.ALL + lora.EXTRA)
    assert meta["lr"] == "0.001" and meta["note"] == "test" and meta["r0_lora_dtype"] == "float32"
    with pytest.raises(ValueError, match="reserved"):
        lora.save_lora(pipe.unet, str(tmp_path / "x.safetensors"), "r0", metadata={"r0_lora_rank": "9"})
    with pytest.raises(ValueError, match=".safetensors"):
        lora.save_lora(pipe.unet, str(tmp_path / "x.pt"), "r0")


def test_fp16_files_are_half_size_and_load_closely(trained, tmp_path):
    pipe, adapted, path = trained
    half = lora.save_lora(pipe.unet, str(tmp_path / "half.safetensors"), "r0", dtype=torch.float16)
    state = load_file(half)
    assert {v.dtype for k, v in state.items() if not k.endswith(".alpha")} == {torch.float16}
    assert os.path.getsize(half) < 0.6 * os.path.getsize(path)
    loaded = fresh()
    assert lora.load_lora(loaded, half) == "half_lora"  # "half" is a Module attribute
    torch.testing.assert_close(images(loaded), adapted, atol=5e-3, rtol=0)


def test_delta_norm2_is_the_brute_force_sum_and_differentiable():
    pipe = fresh()
    with torch.inference_mode():  # a node may call it in inference mode: the adapter is still trainable
        lora.add_lora(pipe.unet, rank=3, alpha=5.0, targets=lora.ALL + lora.EXTRA, init=False)
    unet = pipe.unet
    brute = torch.zeros((), dtype=torch.float64)
    for _, layer in lora._lora_layers(unet, "r0"):
        a, b = layer.lora_A["r0"].weight, layer.lora_B["r0"].weight
        delta = 5.0 / 3 * (b.flatten(1).double() @ a.flatten(1).double())
        brute += (delta ** 2).sum()
    value = lora.lora_delta_norm2(unet, "r0")
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value.double(), brute, rtol=1e-5, atol=0)
    value.backward()
    grads = [p.grad for p in lora.lora_parameters(unet, "r0")]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    lora.use_loras(pipe, [("r0", 0.5)])  # the weight scales ΔW as applied
    torch.testing.assert_close(lora.lora_delta_norm2(unet, "r0").double(), brute / 4, rtol=1e-5, atol=0)


def test_use_loras_combines_adapters_and_keeps_the_trainable_one_trainable(trained, tmp_path):
    _, adapted, path = trained
    pipe = fresh()
    lora.add_lora(pipe.unet, rank=2, name="mine")
    perturb(pipe.unet, "mine", seed=1)
    ours = lora.lora_parameters(pipe.unet, "mine")
    only_train = images(pipe)
    lora.load_lora(pipe, path, name="style", weight=0.7)
    assert lora.active_loras(pipe) == [("mine", 1.0), ("style", 0.7)], "load_lora adds to the active set"
    assert all(p.requires_grad for p in ours)
    assert not any(p.requires_grad for p in lora.lora_parameters(pipe.unet, "style"))
    both = images(pipe)
    lora.use_loras(pipe, [("style", 1.0)])
    torch.testing.assert_close(images(pipe), adapted, atol=1e-5, rtol=0)
    lora.use_loras(pipe, [("mine", 1.0)])
    torch.testing.assert_close(images(pipe), only_train, atol=1e-6, rtol=0)
    lora.use_loras(pipe, [("mine", 1.0), ("style", 0.7)])
    torch.testing.assert_close(images(pipe), both, atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in ours)
    with pytest.raises(ValueError, match="no adapter named"):
        lora.use_loras(pipe, [("nope", 1.0)])
    with pytest.raises(ValueError, match="twice"):
        lora.use_loras(pipe, [("mine", 1.0), ("mine", 0.5)])
    lora.use_loras(plain(), [])  # no adapters at all: nothing to do
    assert not hasattr(plain().unet, "peft_config")


def test_reloading_a_name_replaces_it(trained, tmp_path):
    _, adapted, path = trained
    other = str(tmp_path / "other.safetensors")
    save_file({k: -v if k.endswith("up.weight") else v for k, v in load_file(path).items()}, other)
    target = fresh()
    lora.load_lora(target, other, name="x")
    lora.load_lora(target, path, name="x")
    assert target.unet.peft_config.keys() == {"x"} and lora.active_loras(target) == [("x", 1.0)]
    torch.testing.assert_close(images(target), adapted, atol=1e-5, rtol=0)


def test_bad_files_give_clear_errors(trained, base_images, tmp_path):
    pipe, _, path = trained
    target = fresh()
    with pytest.raises(lora.LoraError, match="not found"):
        lora.load_lora(target, str(tmp_path / "missing.safetensors"))
    (tmp_path / "lora.bin").write_bytes(b"x")
    with pytest.raises(lora.LoraError, match="only .safetensors"):
        lora.load_lora(target, str(tmp_path / "lora.bin"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(lora.LoraError, match="unreadable or corrupt"):
        lora.load_lora(target, str(tmp_path / "junk.safetensors"))
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in list(target.unet.state_dict().items())[:4]},
              str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(lora.LoraError, match="not a LoRA file.*full model checkpoint"):
        lora.load_lora(target, str(tmp_path / "ckpt.safetensors"))
    # a module this UNet does not have
    state = load_file(path)
    renamed = {k.replace("lora_unet_down_blocks_1_", "lora_unet_down_blocks_7_"): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(lora.LoraError, match=r"another UNet architecture.*lora_unet_down_blocks_7_.*does not have"):
        lora.load_lora(target, str(tmp_path / "renamed.safetensors"))
    # a LoRA trained on a UNet with other widths: same names, other shapes
    from diffusers import UNet2DConditionModel
    narrow = UNet2DConditionModel.from_config({**target.unet.config, "block_out_channels": [32, 64, 64]})
    lora.add_lora(narrow, rank=8, name="n")
    save = lora.save_lora(narrow, str(tmp_path / "narrow.safetensors"), "n")
    with pytest.raises(lora.LoraError, match=r"key lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_"
                                             r"to_k\.lora_down\.weight has shape \[8, 64\].*is \[128, 128\]"):
        lora.load_lora(target, save)
    assert not hasattr(target.unet, "peft_config") or not target.unet.peft_config, "failed loads leave no adapter"
    assert torch.equal(images(target), base_images)
