"""The one place that touches ComfyUI services: progress bar, cancel, model folders.

Each service falls back to a standalone version when ComfyUI is absent (tests, scripts), so node classes import
and run anywhere. Outside ComfyUI, model folders live under $R0_MODELS_DIR (default ./models).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

try:  # inside ComfyUI
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
except ImportError:  # standalone
    _comfy_utils = _folder_paths = None

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def progress_callback(total: int) -> Callable[[dict], None]:
    """A core-library callback that advances ComfyUI's progress bar; ComfyUI's progress hook raises there when the
    user cancels, so this is also the cancel check."""
    if _comfy_utils is None:
        return lambda info: None
    bar = _comfy_utils.ProgressBar(total)
    return lambda info: bar.update_absolute(info["i"] + 1, total)


def cancellable_progress(total: int) -> Callable[[dict], None]:
    """Like progress_callback, but a Cancel in ComfyUI raises the core library's `Cancelled`, so a trainer can
    save what it has before the node re-raises the interrupt with `interrupt()`."""
    update = progress_callback(total)
    if _comfy_utils is None:
        return update
    import comfy.model_management as mm

    def callback(info):
        try:
            update(info)
        except mm.InterruptProcessingException:
            from r0_core.sampler import Cancelled
            raise Cancelled
    return callback


def interrupt() -> None:
    """Stop the rest of the ComfyUI run as a Cancel does (outside ComfyUI, raise Cancelled)."""
    if _comfy_utils is not None:
        import comfy.model_management as mm
        raise mm.InterruptProcessingException()
    from r0_core.sampler import Cancelled
    raise Cancelled


def free_memory() -> None:
    """After the pack drops a model: return the freed GPU memory to the driver, as ComfyUI does."""
    import torch

    if _comfy_utils is not None:
        import comfy.model_management as mm
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def output_dir() -> str:
    """ComfyUI's output folder (standalone: $R0_OUTPUT_DIR, default ./out)."""
    if _folder_paths is not None:
        return _folder_paths.get_output_directory()
    return os.environ.get("R0_OUTPUT_DIR", "out")


def input_dir() -> str:
    """ComfyUI's input folder (standalone: $R0_INPUT_DIR, default ./input)."""
    if _folder_paths is not None:
        return _folder_paths.get_input_directory()
    return os.environ.get("R0_INPUT_DIR", "input")


def list_input_folders() -> list[str]:
    """Sub-folders of the input folder, as relative paths: where users put a subject's reference photos."""
    root = input_dir()
    found = []
    for base, dirs, _ in os.walk(root):
        found += [os.path.relpath(os.path.join(base, d), root) for d in dirs]
    return sorted(found)


def resolve_input(name: str) -> str:
    """The full path of a sub-folder of the input folder; refuses anything that escapes it."""
    root = os.path.realpath(input_dir())
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"folder {name!r} points outside the input folder; pick one from the list")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name!r} is not a folder in the input folder ({root}); put the subject's images "
                                f"in input/<name>/ and refresh")
    return path


# ----------------------------------------------------------------------------------------------- model folders

def folder_roots(folder: str) -> list[str]:
    """The directories of a model folder kind ("checkpoints", "diffusers", ...)."""
    if _folder_paths is not None:
        return list(_folder_paths.get_folder_paths(folder))
    return [os.path.join(os.environ.get("R0_MODELS_DIR", "models"), folder)]


def list_files(folder: str) -> list[str]:
    """Model files under a folder kind, as relative paths."""
    if _folder_paths is not None:
        return [f for f in _folder_paths.get_filename_list(folder) if f.lower().endswith(MODEL_EXTENSIONS)]
    found = []
    for root in folder_roots(folder):
        for base, _, files in os.walk(root):
            found += [os.path.relpath(os.path.join(base, f), root) for f in files if f.lower().endswith(
                MODEL_EXTENSIONS)]
    return sorted(found)


def list_model_folders(folder: str, marker: str) -> list[str]:
    """Sub-folders holding a transformers/diffusers model (`marker`: config.json, model_index.json), as relative
    paths; ComfyUI's own file lists hold files only."""
    found = set()
    for root in folder_roots(folder):
        for base, _, files in os.walk(root):
            if marker in files:
                found.add(os.path.relpath(base, root))
    return sorted(found)


def list_subfolders(folder: str) -> list[str]:
    """Every directory under a folder kind, as relative paths (companion files such as tokenizers live in them)."""
    found = set()
    for root in folder_roots(folder):
        for base, dirs, _ in os.walk(root):
            found.update(os.path.relpath(os.path.join(base, d), root) for d in dirs)
    return sorted(found)


def register_folder(folder: str) -> None:
    """Add models/<folder> to ComfyUI's model folders, keeping paths that extra_model_paths.yaml already gave it."""
    if _folder_paths is None:
        return
    default = os.path.join(_folder_paths.models_dir, folder)
    paths, _ = _folder_paths.folder_names_and_paths.get(folder, ([], set()))
    _folder_paths.folder_names_and_paths[folder] = ([default] + [p for p in paths if p != default],
                                                    set(MODEL_EXTENSIONS))


def resolve(folder: str, name: str) -> str:
    """The full path of `name` inside one of the folder's roots; refuses a name that escapes them ("..", an
    absolute path). Symlinks the user placed inside a model folder are followed, as ComfyUI's own lists do."""
    for root in folder_roots(folder):
        root = os.path.abspath(root)
        path = os.path.normpath(os.path.join(root, name))
        if not name or os.path.isabs(name) or os.path.commonpath([root, path]) != root:
            raise ValueError(f"model name {name!r} points outside models/{folder}; pick a name from the list")
        if os.path.exists(path):
            return os.path.realpath(path)
    raise FileNotFoundError(f"{name!r} not found in models/{folder} (looked in {folder_roots(folder)}); "
                            f"put the file or folder there and refresh")


def sd_tokenizer_dir() -> Optional[str]:
    """ComfyUI ships CLIP's tokenizer files (comfy/sd1_tokenizer); single-file SD checkpoints need them."""
    if _comfy_utils is None:
        return None
    path = os.path.join(os.path.dirname(os.path.dirname(_comfy_utils.__file__)), "comfy", "sd1_tokenizer")
    return path if os.path.isdir(path) else None
