"""Load Stable-Diffusion-family pipelines from local files only: diffusers folders, single-file checkpoints
(with configs this package bundles) and the built-in tiny world, all through one function, `load_pipeline`.

Nothing here reaches a model hub: every call passes `local_files_only=True`, and single-file checkpoints are
matched to a bundled config folder by their keys, so diffusers never asks the hub which model it is.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from typing import Optional

import torch

logger = logging.getLogger(__name__)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(PACKAGE_DIR, "configs")
TINY_PIPELINE_DIR = os.path.join(PACKAGE_DIR, "tiny", "weights", "tiny-sd")
TINY_CLIP_DIR = os.path.join(PACKAGE_DIR, "tiny", "weights", "tiny-clip")
# the tiny reward stack (r0_core.tiny.reward_stack): each main file with its companions in the same folder
TINY_HPS = os.path.join(PACKAGE_DIR, "tiny", "weights", "tiny-hps", "HPS_tiny.safetensors")
TINY_IMAGE_REWARD = os.path.join(PACKAGE_DIR, "tiny", "weights", "tiny-image-reward", "ImageReward.safetensors")
TINY_AESTHETIC = os.path.join(PACKAGE_DIR, "tiny", "weights", "tiny-aesthetic", "aesthetic.safetensors")  # on tiny-clip
TINY_R0_LORA = os.path.join(PACKAGE_DIR, "tiny", "weights", "tiny-r0-lora.safetensors")  # benchmarks/mini_table1.py
TINY = "tiny"  # the name that selects the built-in tiny world
# the world drawn by the other families' architectures (r0_core.tiny.families), by name
TINY_FAMILIES = {f"tiny-{f}": os.path.join(PACKAGE_DIR, "tiny", "weights", f"tiny-{f}") for f in ("sdxl", "sd3")}
TINY_NAMES = (TINY, *TINY_FAMILIES)
# where an SD3 config would be bundled; until one is, SD3 single files need config_dir=<a diffusers SD3 folder>
SD3_CONFIG_DIR = os.path.join(CONFIGS_DIR, "sd3")
# the parts an SD3 single file must hold (key prefix, what it is); T5-XXL (text_encoders.t5xxl.*) is optional
SD3_PARTS = (("model.diffusion_model.joint_blocks.", "the MMDiT (model.diffusion_model.*)"),
             ("first_stage_model.", "the VAE (first_stage_model.*)"),
             ("text_encoders.clip_l.transformer.", "the CLIP-L text encoder (text_encoders.clip_l.*)"),
             ("text_encoders.clip_g.transformer.", "the CLIP-G text encoder (text_encoders.clip_g.*)"))
SD3_T5_KEY = "text_encoders.t5xxl.transformer.shared.weight"   # diffusers' test for a T5 inside the file

# model_index.json `_class_name` -> diffusers pipeline class name
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline": "StableDiffusion3Pipeline",
}
SUPPORTED_FAMILIES = "Stable Diffusion 1.x/2.x (text-to-image), SDXL base or SD3"
# families a user may bring that the pack does not take yet, by diffusers class name
UNSUPPORTED_PIPELINES = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner (or SDXL img2img) pipeline",
    "StableDiffusionInpaintPipeline": "an inpainting pipeline",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting pipeline",
    "StableDiffusionImg2ImgPipeline": "an img2img pipeline",
    "FluxPipeline": "a Flux pipeline (rectified flow)",
}


class ModelLoadError(ValueError):
    """A model file or folder is missing, corrupt, or of an architecture this package does not know."""


def pick_device_dtype(device: Optional[str | torch.device] = None, dtype: Optional[torch.dtype] = None):
    """fp32 on the CPU; bf16 on CUDA where the GPU supports it, else fp16; fp16 on Apple's MPS."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "mps":
            dtype = torch.float16
        else:
            dtype = torch.float32
    return device, dtype


# ----------------------------------------------------------------------------------------------- folders

def _check_folder(folder: str, components: bool = True) -> tuple[str, dict]:
    """The pipeline class named by a diffusers folder and its model_index.json, after checking each component's
    files exist."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ModelLoadError(f"{index_path} not found: a diffusers pipeline folder needs model_index.json "
                             f"beside unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index_path} is not valid JSON ({e}); re-copy the model folder") from e
    class_name = index.get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        found = f"{UNSUPPORTED_PIPELINES[class_name]} ({class_name})" if class_name in UNSUPPORTED_PIPELINES \
            else f"a {class_name!r}"
        raise ModelLoadError(f"{index_path} describes {found}, which the pack does not support yet; supported: "
                             f"{SUPPORTED_FAMILIES} ({' or '.join(sorted(SUPPORTED_PIPELINES))})")
    for component, spec in index.items():
        if not components or component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = os.path.join(folder, component)
        if not os.path.isdir(sub) or not os.listdir(sub):
            raise ModelLoadError(f"{sub} is missing or empty: model_index.json lists the component "
                                 f"{component!r} ({spec[1]}); copy the whole pipeline folder")
    return class_name, index


def _load_folder(folder: str, device, dtype):
    import diffusers

    class_name, index = _check_folder(folder)
    pipeline_class = getattr(diffusers, SUPPORTED_PIPELINES[class_name])
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" \
        else {}
    if class_name == "StableDiffusion3Pipeline":
        # parts the folder leaves out (SD3 without its T5 encoder, no IP-Adapter image encoder) are passed as None
        kwargs = {name: None for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
                  if index.get(name, [None])[0] is None}
    try:
        pipe = pipeline_class.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    except Exception as e:  # diffusers and transformers raise many types on damaged or refused files
        raise load_failure("the diffusers pipeline", folder, e) from e
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------- single files

def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors file, or of a .ckpt/.pt/.pth/.bin file read with weights_only=True."""
    _require_file(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state)
    except Exception as e:  # safetensors and pickle raise many types on damaged files
        raise _corrupt(path, e) from e


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint; for safetensors read from the header alone, without loading tensors."""
    if not path.endswith(".safetensors"):
        return {k: tuple(v.shape) for k, v in read_checkpoint(path).items() if hasattr(v, "shape")}
    _require_file(path)
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise _corrupt(path, e) from e


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint {path} not found; expected a .safetensors file "
                             f"(or .ckpt/.pt/.pth/.bin) in the model folder")


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickled_files(path: str) -> list[str]:
    """The pickled weight files in a model folder (or the file itself), for messages."""
    if os.path.isfile(path):
        return [path] if path.lower().endswith(PICKLED) else []
    found = []
    for root, _, files in os.walk(path):
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(PICKLED)]
    return found


def _detail(error: Exception) -> str:
    """The line of an error message that says what went wrong (torch's refusals put it after a long preamble)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest.split(" was not an allowed global")[0]   # "Unsupported global: GLOBAL posix.system"
    return lines[0] if lines else repr(error)


REFUSED = ("the safe loader (torch.load with weights_only=True) refused it: it is damaged, or a pickle holding more "
           "than tensors, which could run code when loaded")


def _corrupt(path: str, error: Exception) -> ModelLoadError:
    detail = _detail(error)
    if isinstance(error, pickle.UnpicklingError):
        return ModelLoadError(f"checkpoint {path}: {REFUSED} ({detail}); use its .safetensors version")
    return ModelLoadError(f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}: {detail}); "
                          f"expected a complete .safetensors file: re-download or re-export it")


def load_failure(what: str, path: str, error: Exception) -> ModelLoadError:
    """A loader's foreign exception as a ModelLoadError naming the model, its path and the likely fix."""
    detail = _detail(error)
    if isinstance(error, pickle.UnpicklingError):
        files = _pickled_files(path)
        return ModelLoadError(f"could not load {what} from {path}: of its pickled weight file(s) "
                              f"{', '.join(files[:3]) or '(none found)'}, {REFUSED} ({detail}); replace it with its "
                              f".safetensors version")
    return ModelLoadError(f"could not load {what} from {path} ({type(error).__name__}: {detail}); check that "
                          f"its files are complete (re-download or re-copy the folder)")


def detect_architecture(shapes: dict[str, tuple[int, ...]], path: str = "<state dict>") -> str:
    """Which config fits an original-layout (LDM) checkpoint, from its keys and shapes: 'sd15', 'sd2', 'sdxl',
    'tiny' (bundled configs) or 'sd3'; a family the pack does not support yet is named and refused."""
    def refuse(found: str):
        raise ModelLoadError(f"checkpoint {path} is {found}, which the pack does not support yet; supported: "
                             f"{SUPPORTED_FAMILIES} single-file checkpoints, or their diffusers folders")

    if any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in shapes):
        missing = [what for prefix, what in SD3_PARTS if not any(k.startswith(prefix) for k in shapes)]
        if missing:
            refuse(f"an SD3 (MMDiT, rectified flow) checkpoint without {', '.join(missing)}; an SD3 single file "
                   f"loads with its MMDiT, VAE and both CLIPs inside (like sd3_medium_incl_clips.safetensors), or "
                   f"load the diffusers folder")
        return "sd3"
    if any(k.startswith(("model.diffusion_model.double_blocks.", "double_blocks.")) for k in shapes):
        refuse("a Flux (rectified flow) checkpoint")
    unet_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if unet_in is not None and len(unet_in) == 4 and unet_in[1] != 4:
        refuse(f"an inpainting (or other image-conditioned) checkpoint: its UNet takes {unet_in[1]} input channels "
               f"where text-to-image takes 4")
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in shapes):
            refuse("an SDXL refiner checkpoint (one OpenCLIP text encoder, no CLIP ViT-L)")
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    embedding = shapes.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    if embedding is not None and any(k.startswith("model.diffusion_model.") for k in shapes):
        if embedding[1] == 768:
            return "sd15"
        tiny_config = os.path.join(TINY_PIPELINE_DIR, "text_encoder", "config.json")
        if os.path.isfile(tiny_config):
            with open(tiny_config) as f:
                tiny = json.load(f)
            if tuple(embedding) == (tiny["vocab_size"], tiny["hidden_size"]):
                return "tiny"
    sample = ", ".join(sorted(shapes)[:3])
    raise ModelLoadError(f"checkpoint {path} has an unknown architecture (first keys: {sample}); expected a "
                         f"Stable Diffusion 1.x, 2.x, SDXL or SD3 checkpoint in the original single-file layout "
                         f"(keys model.diffusion_model.*, first_stage_model.*, cond_stage_model.*, conditioner.* or "
                         f"text_encoders.*)")


def _has_tokenizer_files(folder: Optional[str]) -> bool:
    return folder is not None and (
        os.path.isfile(os.path.join(folder, "tokenizer.json"))
        or all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")))


def _load_tokenizer(folder: Optional[str], architecture: str):
    from transformers import CLIPTokenizer

    if not _has_tokenizer_files(folder):
        # checked here because transformers turns a folder without vocabulary into a useless 2-token tokenizer
        raise ModelLoadError(
            f"a {architecture} single-file checkpoint holds no tokenizer; pass tokenizer_dir=<folder with the "
            f"CLIP tokenizer files vocab.json + merges.txt (or tokenizer.json)>, for example the tokenizer/ "
            f"folder of any diffusers SD pipeline or ComfyUI's comfy/sd1_tokenizer (got {folder!r})")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"tokenizer folder {folder} has no readable CLIP tokenizer ({e})") from e
    if len(tokenizer) != 49408:
        raise ModelLoadError(f"tokenizer in {folder} has {len(tokenizer)} tokens; {architecture} needs CLIP's "
                             f"49408-token vocabulary")
    # every SD text encoder reads 77 tokens; some tokenizer folders (ComfyUI's) declare a longer limit
    tokenizer.model_max_length = min(tokenizer.model_max_length, 77)
    return tokenizer


def _load_single_file(path: str, device, dtype, tokenizer_dir: Optional[str], config_dir: Optional[str] = None):
    import diffusers

    shapes = checkpoint_shapes(path)
    architecture = detect_architecture(shapes, path)
    if architecture == "sd3":
        return _load_sd3_single_file(path, shapes, device, dtype, tokenizer_dir, config_dir)
    if config_dir is not None and architecture != "sdxl":
        raise ModelLoadError(f"config_dir is for SD3 and SDXL single-file checkpoints; {path} is a {architecture} "
                             f"checkpoint, which loads with the bundled config (got config_dir={config_dir!r})")
    if architecture == "tiny":
        config, extra = TINY_PIPELINE_DIR, {}
    elif config_dir is not None:   # an SDXL file of other sizes than SDXL base's (the tiny SDXL, say)
        config, extra = config_dir, {}
        index = _family_config(path, config, "StableDiffusionXLPipeline", "SDXL")
        if tokenizer_dir is not None or not all(_has_tokenizer_files(os.path.join(config, t))
                                                for t in ("tokenizer", "tokenizer_2")):
            extra = {"tokenizer": _load_tokenizer(tokenizer_dir, architecture),
                     "tokenizer_2": _load_tokenizer(tokenizer_dir, architecture)}
        widths = (shapes.get("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"),
                  shapes.get("conditioner.embedders.1.model.positional_embedding"))
        if None not in widths and widths[0][-1] == widths[1][-1]:
            extra["text_encoder_2"] = _sdxl_open_clip(path, config, index, dtype)
    else:
        config = os.path.join(CONFIGS_DIR, architecture)
        extra = {"tokenizer": _load_tokenizer(tokenizer_dir, architecture)}
        if architecture == "sdxl":
            extra["tokenizer_2"] = _load_tokenizer(tokenizer_dir, architecture)
            extra["tokenizer_2"].pad_token = "!"  # SDXL's OpenCLIP tokenizer pads with "!"
    # bundled configs hold no tokenizer
    class_name, _ = _check_folder(config, components=architecture == "tiny" or config_dir is not None)
    pipeline_class = getattr(diffusers, SUPPORTED_PIPELINES[class_name])
    if "XL" not in class_name:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    source = "the bundled config" if config_dir is None else "the configs of"
    try:
        pipe = pipeline_class.from_single_file(path, config=config, local_files_only=True, dtype=dtype,
                                               **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"could not build a {architecture} pipeline from {path} with {source} "
                             f"{config}: {e}") from e
    _refuse_unloaded(pipe, ("unet", "vae", "text_encoder", "text_encoder_2"), path, config)
    return pipe.to(device)


def _refuse_unloaded(pipe, parts, path: str, config: str) -> None:
    """diffusers leaves the weights a single file lacks unloaded (on the meta device), without a word."""
    for part in parts:
        module = getattr(pipe, part, None)
        unloaded = [name for name, t in module.state_dict().items() if t.is_meta] if module is not None else []
        if unloaded:
            raise ModelLoadError(f"checkpoint {path} lacks {len(unloaded)} weight(s) of the {part} that the config "
                                 f"{config} describes (first: {unloaded[0]}); the file is incomplete, or the "
                                 f"folder describes a larger model")


def _family_config(path: str, config_dir: str, pipeline_class: str, family: str) -> dict:
    """model_index.json of a single file's config folder, after checking the folder is of the file's family."""
    if not os.path.isdir(config_dir):
        raise ModelLoadError(f"config_dir {config_dir} is not a folder; an {family} single-file checkpoint ({path}) "
                             f"needs a local diffusers {family} folder whose configs describe it")
    class_name, index = _check_folder(config_dir, components=False)
    if class_name != pipeline_class:
        raise ModelLoadError(f"config_dir {config_dir} describes a {class_name}, but checkpoint {path} is {family}; "
                             f"pass an {family} ({pipeline_class}) diffusers folder")
    return index


def _sd3_config(path: str, config_dir: Optional[str], has_t5: bool) -> tuple[str, dict]:
    """The SD3 config folder for a single file and its model_index.json, after checking it describes every part
    the file holds."""
    config = config_dir if config_dir is not None else SD3_CONFIG_DIR if os.path.isdir(SD3_CONFIG_DIR) else None
    if config is None:
        raise ModelLoadError(
            f"checkpoint {path} is an SD3 single-file checkpoint, and the pack bundles no SD3 config; pass "
            f"config_dir=<a local diffusers SD3 folder: model_index.json and the config.json of transformer/, vae/, "
            f"text_encoder/, text_encoder_2/ (text_encoder_3/ for a file with T5) and scheduler/, for example a copy "
            f"of stabilityai/stable-diffusion-3-medium-diffusers; its weights are not needed> (got config_dir=None)")
    index = _family_config(path, config, "StableDiffusion3Pipeline", "SD3")
    needed = ["transformer", "vae", "text_encoder", "text_encoder_2"] + (["text_encoder_3"] if has_t5 else [])
    for part in needed + ["scheduler"]:
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        if index.get(part, [None])[0] is None or not os.path.isfile(os.path.join(config, part, name)):
            why = "holds a T5-XXL text encoder" if part == "text_encoder_3" else "is SD3"
            raise ModelLoadError(f"config_dir {config} has no {part}/{name} (or model_index.json lists no {part}), "
                                 f"which checkpoint {path} needs because it {why}; pass a diffusers SD3 folder "
                                 f"with every part's config")
    return config, index


def _nonempty_dir(folder: str) -> bool:
    return os.path.isdir(folder) and bool(os.listdir(folder))


def _read_prefixed(path: str, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose keys start with `prefix` (full keys)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return {k: v for k, v in read_checkpoint(path).items() if k.startswith(prefix)}


def _second_text_encoder(config: str, index: dict, dtype, state_of):
    """text_encoder_2 built from the config folder's config and loaded strictly from `state_of(model)` (its keys
    in transformers' names). Needed where the file's two CLIPs have one width: diffusers tells them apart by width
    alone, so for small models it would load the first CLIP twice."""
    import transformers

    model_class = getattr(transformers, index["text_encoder_2"][1])
    model = model_class(model_class.config_class.from_pretrained(config, subfolder="text_encoder_2",
                                                                 local_files_only=True))
    state = state_of(model)
    if not hasattr(model, "text_model"):   # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def _sd3_clip_g(path: str, config: str, index: dict, dtype):
    """CLIP-G from the file's text_encoders.clip_g.transformer.* keys (transformers' names already)."""
    prefix = "text_encoders.clip_g.transformer."
    state = {k[len(prefix):]: v for k, v in _read_prefixed(path, prefix).items()}
    return _second_text_encoder(config, index, dtype, lambda model: state)


def _sdxl_open_clip(path: str, config: str, index: dict, dtype):
    """SDXL's second text encoder from the file's OpenCLIP keys, through diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "conditioner.embedders.1.model."
    checkpoint = _read_prefixed(path, prefix)
    return _second_text_encoder(config, index, dtype,
                                lambda model: convert_open_clip_checkpoint(model, checkpoint, prefix=prefix))


def _load_sd3_single_file(path: str, shapes: dict, device, dtype, tokenizer_dir: Optional[str],
                          config_dir: Optional[str]):
    """An SD3 single file (the MMDiT, VAE and both CLIPs inside; T5-XXL when it has one) through diffusers'
    StableDiffusion3Pipeline.from_single_file, with the configs of a local diffusers SD3 folder."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    has_t5 = SD3_T5_KEY in shapes
    config, index = _sd3_config(path, config_dir, has_t5)
    extra = {"image_encoder": None, "feature_extractor": None}
    if not has_t5:
        extra.update(text_encoder_3=None, tokenizer_3=None)   # SD3 runs on its two CLIPs alone
    elif index.get("tokenizer_3", [None])[0] is None or not _nonempty_dir(os.path.join(config, "tokenizer_3")):
        raise ModelLoadError(f"checkpoint {path} holds a T5-XXL text encoder, which needs its tokenizer: config_dir "
                             f"{config} has no tokenizer_3/ folder; pass a diffusers SD3 folder with tokenizer_3/")
    # tokenizers: tokenizer_dir when given (as for SD/SDXL files), else the config folder's own
    if tokenizer_dir is not None or not all(_has_tokenizer_files(os.path.join(config, t))
                                            for t in ("tokenizer", "tokenizer_2")):
        if tokenizer_dir is None:
            raise ModelLoadError(
                f"an SD3 single-file checkpoint holds no tokenizer, and config_dir {config} has none (tokenizer/ and "
                f"tokenizer_2/); pass tokenizer_dir=<folder with the CLIP tokenizer files vocab.json + merges.txt (or "
                f"tokenizer.json)>, for example the tokenizer/ folder of any diffusers SD pipeline or ComfyUI's "
                f"comfy/sd1_tokenizer (got tokenizer_dir=None)")
        extra["tokenizer"] = _load_tokenizer(tokenizer_dir, "SD3")
        extra["tokenizer_2"] = _load_tokenizer(tokenizer_dir, "SD3")
        extra["tokenizer_2"].pad_token = "!"  # CLIP-G's tokenizer pads with "!", as SDXL's does
    width = "text_encoders.{}.transformer.text_model.embeddings.position_embedding.weight"
    try:
        if shapes[width.format("clip_l")][-1] == shapes[width.format("clip_g")][-1]:
            # diffusers tells the file's two CLIPs apart by width alone, so at equal widths (small test models)
            # it would load CLIP-L twice; CLIP-G is read here instead
            extra["text_encoder_2"] = _sd3_clip_g(path, config, index, dtype)
        pipe = StableDiffusion3Pipeline.from_single_file(path, config=config, local_files_only=True, dtype=dtype,
                                                         **extra)
    except (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError) as e:
        raise ModelLoadError(f"could not build an SD3 pipeline from {path} with the configs of {config} "
                             f"({type(e).__name__}: {_detail(e)}); check that the checkpoint is complete and that "
                             f"the folder describes the same model (its sizes and number of blocks)") from e
    t5 = pipe.text_encoder_3
    if t5 is not None:
        t5.eval()   # diffusers' single-file T5 reader leaves it in training mode: its dropout would be on
        if t5.encoder.embed_tokens.weight.is_meta and not t5.shared.weight.is_meta:
            # a file with T5's `shared` embedding alone (its input embedding, tied to it): tie them again
            t5.encoder.embed_tokens = t5.shared
    _refuse_unloaded(pipe, ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), path, config)
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------- entry point

def load_pipeline(path: str = TINY, *, device=None, dtype=None, tokenizer_dir: Optional[str] = None,
                  prediction_type: Optional[str] = None, config_dir: Optional[str] = None):
    """A diffusers Stable Diffusion (1.x/2.x), SDXL or SD3 pipeline from a local path, on `device` in `dtype`.

    path: "tiny" for the built-in tiny world ("tiny-sdxl", "tiny-sd3": the same world in those architectures), a
    diffusers pipeline folder (with model_index.json), or a single-file checkpoint in the original layout
    (.safetensors, or .ckpt read with weights_only=True).
    tokenizer_dir: for single-file SD checkpoints, a folder with CLIP's tokenizer files (they are not inside).
    config_dir: for single-file SD3 checkpoints, and SDXL ones of other sizes than SDXL base (the tiny SDXL), a
    local diffusers folder of that family whose configs describe the file (model_index.json and each part's
    config; its weights are not read); its tokenizer/ and tokenizer_2/ serve when tokenizer_dir is not given, and
    its tokenizer_3/ for an SD3 file with T5-XXL.
    device, dtype: default to `pick_device_dtype()`.
    prediction_type: override what the scheduler config says ("epsilon" or "v_prediction"); single-file SD 2.x
    checkpoints are assumed to be 768-v models, so pass "epsilon" for the 512-px base ones.
    """
    pipe = _load(path, device, dtype, tokenizer_dir, config_dir)
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type={prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


def _load(path, device, dtype, tokenizer_dir, config_dir=None):
    device, dtype = pick_device_dtype(device, dtype)
    if path == TINY:
        path = TINY_PIPELINE_DIR
        if not os.path.isdir(path):
            raise ModelLoadError(f"the built-in tiny model is missing at {path}; reinstall the package or "
                                 f"rebuild it with `python -m r0_core.tiny.build`")
    elif path in TINY_FAMILIES:
        name, path = path, TINY_FAMILIES[path]
        if not os.path.isdir(path):
            raise ModelLoadError(f"the built-in {name} model is missing at {path}; reinstall the package or "
                                 f"rebuild it with `python -m r0_core.tiny.families --family {name[5:]}`")
    if os.path.isdir(path):
        return _load_folder(path, device, dtype)
    if os.path.splitext(path)[1].lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return _load_single_file(path, device, dtype, tokenizer_dir, config_dir)
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} not found; expected 'tiny', a diffusers folder with "
                             f"model_index.json, or a .safetensors checkpoint")
    raise ModelLoadError(f"model path {path} is neither a diffusers folder nor a checkpoint file; expected a "
                         f"folder with model_index.json or a .safetensors/.ckpt file")
