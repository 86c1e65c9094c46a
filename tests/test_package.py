"""The pack's shape: installable cores that never import ComfyUI, the ComfyUI entry point, shipped weights,
and a build command that reproduces the tiny world from a seed."""
import ast
import importlib.util
import json
import os
import pathlib
import sys
import tomllib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_extras", "folder_paths", "nodes", "server", "execution", "latent_preview"}


def _imported_modules(package: str):
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield path, [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                yield path, [node.module.split(".")[0]]


def test_cores_never_import_comfyui_and_imports_point_one_way():
    for package, forbidden in (("r0_core", COMFY_MODULES | {"rpo_core"}), ("rpo_core", COMFY_MODULES)):
        for path, modules in _imported_modules(package):
            assert not set(modules) & forbidden, f"{path} imports {set(modules) & forbidden}"


def test_comfyui_entry_point_exposes_the_mappings():
    spec = importlib.util.spec_from_file_location("reward_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["reward_pack"] = module  # ComfyUI imports the pack as a package too, so relative imports work
    spec.loader.exec_module(module)
    assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(module.NODE_DISPLAY_NAME_MAPPINGS, dict)


def test_pyproject_and_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["project"]["dependencies"]}
    assert {"torch", "diffusers", "transformers", "safetensors", "peft", "accelerate", "numpy", "pillow"} <= names
    assert any(d.startswith("pytest") for d in project["project"]["optional-dependencies"]["test"])
    assert "comfy" in project["tool"]
    assert {"r0_core", "rpo_core"} <= set(project["tool"]["setuptools"]["packages"])
    requirements = [line.split(">")[0].split("=")[0].strip() for line in (ROOT / "requirements.txt").read_text()
                    .splitlines() if line.strip() and not line.startswith("#")]
    assert "torch" not in requirements and "diffusers" in requirements


def test_shipped_weights_are_small_safetensors():
    weights = ROOT / "r0_core" / "tiny" / "weights"
    files = [p for p in weights.rglob("*") if p.is_file()]
    tensors = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert tensors and all(p.suffix == ".safetensors" for p in tensors)
    assert sum(p.stat().st_size for p in files) < 60 * 2 ** 20
    assert max(p.stat().st_size for p in files) < 20 * 2 ** 20
    # no config records the machine it was built on (a build must not ship its own absolute paths)
    configs = [p for p in files if p.suffix == ".json" and '"/' in p.read_text()]
    assert not configs, configs


def test_build_command_is_seeded_and_resumes_exactly(tmp_path, monkeypatch):
    from r0_core.loading import load_pipeline
    from r0_core.tiny import build

    small = ["--num-images", "200", "--vae-steps", "4", "--clip-steps", "2", "--unet-steps", "2",
             "--vae-batch", "4", "--clip-batch", "8", "--unet-batch", "4", "--threads", "1",
             "--reward-steps", "2", "--reward-batch", "8", "--checkpoint-every", "2",
             "--only", "save"]   # every stage up to the saved pipeline; tests/test_tiny_rewards.py builds the stack
    build.main(["--out", str(tmp_path / "a" / "out"), "--work", str(tmp_path / "a" / "work"), *small])

    # run b stops after the VAE's second step (as Ctrl-C would), then the same command resumes it
    real_tqdm = build.tqdm

    def stop_after_two(iterable, **kwargs):
        bar = real_tqdm(iterable, **kwargs)
        if kwargs.get("desc") == "vae":
            def two_steps_then_interrupt():
                yield from list(iterable)[:2]
                raise KeyboardInterrupt
            bar.iterable = two_steps_then_interrupt()
        return bar

    monkeypatch.setattr(build, "tqdm", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        build.main(["--out", str(tmp_path / "b" / "out"), "--work", str(tmp_path / "b" / "work"), *small])
    assert torch.load(tmp_path / "b" / "work" / "vae.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(build, "tqdm", real_tqdm)
    build.main(["--out", str(tmp_path / "b" / "out"), "--work", str(tmp_path / "b" / "work"), *small])

    for component in ("unet", "vae", "text_encoder"):
        folder_a, folder_b = (tmp_path / run / "out" / "tiny-sd" / component for run in ("a", "b"))
        file = next(f for f in os.listdir(folder_a) if f.endswith(".safetensors"))
        assert (folder_a / file).read_bytes() == (folder_b / file).read_bytes(), component
    clip_a, clip_b = (tmp_path / run / "out" / "tiny-clip" / "model.safetensors" for run in ("a", "b"))
    assert clip_a.read_bytes() == clip_b.read_bytes(), "reward CLIP"
    pipe = load_pipeline(str(tmp_path / "a" / "out" / "tiny-sd"))
    assert pipe.unet.config.in_channels == 4 and pipe.vae.config.scaling_factor > 0
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "a" / "out").iterdir())
    info = json.loads((tmp_path / "b" / "out" / "tiny-sd" / "build_info.json").read_text())
    assert set(info["stage_seconds"]) == {"vae", "clip", "unet", "reward_clip"}   # summed over b's two runs
    assert all(isinstance(v, int) and v >= 0 for v in info["stage_seconds"].values())
