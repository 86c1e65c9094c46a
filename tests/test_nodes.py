"""The ComfyUI node layer, run without ComfyUI through the bridge's standalone fallbacks."""
import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, bridge
from nodes.r0_nodes import (_CACHE, R0FewStepGenerate, R0LoadPipeline, comfy_sample_r0, get_pipeline,
                            parse_timesteps, resolve_model)
from r0_core.denoisers import DiffusersDenoiser
from r0_core.family import encode_prompts
from r0_core.loading import TINY, TINY_NAMES
from r0_core.sampler import sample_r0
from r0_core.schedule import r0_sigmas, sigmas_from_alphas_cumprod

# Saved workflows store widget values by position: these ids and orders may only ever grow at the end.
PUBLIC_API = {
    "R0LoadPipeline": ["model", "dtype", "device"],
    "R0FewStepGenerate": ["pipeline", "prompt", "steps", "eta", "guidance", "seed", "batch_size", "width",
                          "height", "offload"],
    "R0Sampler": ["eta"],
    "R0Sigmas": ["model", "steps", "timesteps"],
    "RewardLoader": ["family", "model", "support", "device", "dtype"],
    "RewardScore": ["reward_model", "images", "prompts", "batch_size", "offload", "references"],
    "RewardRankSelect": ["reward_model", "images", "prompts", "k", "threshold", "batch_size", "offload",
                         "references"],
    "RewardCombine": ["reward_1", "weight_1", "weight_2", "weight_3", "weight_4", "normalize_gradients",
                      "reward_2", "reward_3", "reward_4"],
    "RewardLambdaHarmonic": ["encoder", "references", "lam"],
    "R0Train": ["pipeline", "reward_model", "prompts", "steps", "lr", "lora_rank", "reg_weight", "eta_min", "eta_max",
                "mode", "seed", "save_name", "batch_size", "sampler_steps", "guidance", "width", "height",
                "cfg_reward_weight", "eta_per_image", "ema_decay"],
    "R0ApplyLoRA": ["pipeline", "lora_name", "strength"],
    "R0TestTimeRefine": ["pipeline", "reward_model", "prompt", "iterations", "lr", "seed", "steps", "guidance",
                         "batch_size", "width", "height", "cfg_reward_weight"],
    "RPOLoadReferences": ["source", "size"],
    "RPOTrain": ["pipeline", "references", "encoder", "token", "class_name", "prompts", "steps", "lambda_val", "beta",
                 "tau", "lr", "lora_rank", "validate_every", "seed", "save_name", "preference", "sampler_steps",
                 "guidance"],
}


def test_node_ids_and_input_order_are_stable():
    for node_id, inputs in PUBLIC_API.items():
        cls = NODE_CLASS_MAPPINGS[node_id]
        names = list(cls.INPUT_TYPES()["required"]) + list(cls.INPUT_TYPES().get("optional", {}))
        assert names[:len(inputs)] == inputs, node_id
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith(("R0", "RPO", "Reward")) and node_id in NODE_DISPLAY_NAME_MAPPINGS
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY and isinstance(cls.RETURN_TYPES, tuple)


def test_loader_caches_by_path_dtype_device():
    assert set(TINY_NAMES) <= set(R0LoadPipeline.INPUT_TYPES()["required"]["model"][0])
    first = R0LoadPipeline().load("tiny", "auto", "auto")[0]
    assert R0LoadPipeline().load("tiny", "auto", "auto")[0] is first
    # ComfyUI runs nodes in inference mode; the loader leaves it so trainers can use the cached weights
    _CACHE.pop((TINY, "fp32", "cpu", None), None)
    with torch.inference_mode():
        other = R0LoadPipeline().load("tiny", "fp32", "cpu")[0]
    assert other is not first
    assert not any(p.is_inference() for p in other["pipe"].unet.parameters())


def test_model_names_resolve_only_inside_model_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("R0_MODELS_DIR", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "a.safetensors").write_bytes(b"")
    assert bridge.list_files("checkpoints") == ["a.safetensors"]
    assert resolve_model("checkpoints/a.safetensors") == str(tmp_path / "checkpoints" / "a.safetensors")
    with pytest.raises(ValueError, match="outside models/checkpoints"):
        resolve_model("checkpoints/../../etc/passwd")
    with pytest.raises(FileNotFoundError, match="models/checkpoints"):
        resolve_model("checkpoints/missing.safetensors")
    with pytest.raises(ValueError, match="expected one of tiny, tiny-sdxl, tiny-sd3"):
        resolve_model("loras/x.safetensors")
    # a model the user keeps elsewhere and links into the folder is listed, and what is listed resolves
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "b.safetensors").symlink_to(tmp_path / "elsewhere" / "b.safetensors")
    assert bridge.list_files("checkpoints") == ["a.safetensors", "b.safetensors"]
    assert resolve_model("checkpoints/b.safetensors") == str(tmp_path / "elsewhere" / "b.safetensors")


def test_every_node_input_has_a_tooltip():
    missing = [f"{node}.{name}" for node, cls in NODE_CLASS_MAPPINGS.items()
               for section in cls.INPUT_TYPES().values() for name, spec in section.items()
               if len(spec) < 2 or "tooltip" not in spec[1]]
    assert not missing, missing


def test_generate_node_outputs_comfy_image_and_raw_latent():
    pipeline = get_pipeline("tiny")
    node = R0FewStepGenerate()
    image, latent = node.generate(pipeline, "a red circle", 4, 0.0, 2.0, 5, 3, 32, 32, False)
    assert image.shape == (3, 32, 32, 3) and 0 <= image.min() and image.max() <= 1
    pipe = pipeline["pipe"]
    samples = latent["samples"]
    assert samples.shape == (3, 4, 16, 16)
    # LATENT is raw VAE space (ComfyUI's convention): decoding it directly gives the image
    with torch.no_grad():
        decoded = ((pipe.vae.decode(samples).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(decoded, image, atol=1e-4)
    again, _ = node.generate(pipeline, "a red circle", 4, 0.0, 2.0, 5, 3, 32, 32, True)
    assert torch.equal(image, again)
    assert pipe.unet.device.type == "cpu"
    # the widgets' default size, 0, is the model's own (32 px here), not a fixed 512
    assert R0FewStepGenerate.INPUT_TYPES()["required"]["width"][1]["default"] == 0
    native, _ = node.generate(pipeline, "a red circle", 4, 0.0, 2.0, 5, 3, 0, 0, False)
    assert torch.equal(native, image)


def test_native_sampler_function_runs_on_a_denoiser_and_is_seeded():
    pipe = get_pipeline("tiny")["pipe"]
    cond, uncond = encode_prompts(pipe, ["a blue triangle"], 2.0)
    den = DiffusersDenoiser.from_pipeline(pipe)
    model = lambda x, sigma, seed=None, **kw: den(x, sigma, **kw)  # noqa: E731 - ComfyUI passes the seed along
    sigmas = r0_sigmas(sigmas_from_alphas_cumprod(pipe.scheduler.alphas_cumprod), 4)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    args = {"cond": cond, "uncond": uncond, "guidance": 2.0, "seed": 11}
    steps = []
    a = comfy_sample_r0(model, x, sigmas, dict(args), lambda info: steps.append(info["i"]), True, eta=1.0)
    b = comfy_sample_r0(model, x, sigmas, dict(args), None, True, eta=1.0)
    assert torch.equal(a, b) and steps == [0, 1, 2, 3]
    deterministic = sample_r0(den, x, sigmas, {k: v for k, v in args.items() if k != "seed"}, disable=True)
    assert torch.allclose(comfy_sample_r0(model, x, sigmas, dict(args), None, True, eta=0.0), deterministic)


def test_sigmas_node_schedule():
    table = sigmas_from_alphas_cumprod(get_pipeline("tiny")["pipe"].scheduler.alphas_cumprod)
    sigmas = r0_sigmas(table, 4, parse_timesteps("999, 749,499,249"))
    assert torch.equal(sigmas, r0_sigmas(table, 4))
    assert len(sigmas) == 5 and sigmas[-1] == 0 and (sigmas[:-1].diff() < 0).all()
    assert parse_timesteps("") is None
    with pytest.raises(ValueError, match="comma-separated"):
        parse_timesteps("999;500")


def test_the_pipeline_cache_keeps_the_most_recently_used(monkeypatch):
    """R0_MAX_PIPELINES bounds what the pack keeps loaded outside ComfyUI's model management."""
    monkeypatch.setenv("R0_MAX_PIPELINES", "1")
    first = get_pipeline("tiny", "fp32", "cpu")
    assert get_pipeline("tiny", "fp32", "cpu") is first and len(_CACHE) == 1
    other = get_pipeline("tiny", "auto", "cpu")   # another key: the older pipeline is dropped
    assert other is not first and list(_CACHE) == [(TINY, "auto", "cpu", None)]
    monkeypatch.setenv("R0_MAX_PIPELINES", "2")
    assert get_pipeline("tiny", "fp32", "cpu") is not first and len(_CACHE) == 2
    get_pipeline("tiny", "auto", "cpu")            # used again: now the most recent
    assert list(_CACHE)[-1] == (TINY, "auto", "cpu", None)
    monkeypatch.setenv("R0_MAX_PIPELINES", "0")
    with pytest.raises(ValueError, match="R0_MAX_PIPELINES='0'"):
        get_pipeline("tiny", "fp16", "cpu")
