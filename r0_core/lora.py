"""LoRA adapters on a diffusers `UNet2DConditionModel` (or an SD3 transformer): train one (peft, through diffusers'
`unet.add_adapter`), measure how far it moves the weights, export it as ONE safetensors file that both diffusers'
`pipe.load_lora_weights` and ComfyUI's LoraLoader read, load such files back as named adapters, and choose which
adapters a cached pipeline applies.

File format (kohya / sd-scripts LoRA, UNet only): for each adapted module, with `<m>` its diffusers module path
with "." replaced by "_" (e.g. `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`):

    lora_unet_<m>.lora_down.weight   A: [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    lora_unet_<m>.lora_up.weight     B: [out, r] or [out, r, 1, 1]
    lora_unet_<m>.alpha              0-dim float32; ΔW = alpha / r · B·A

A flow transformer (SD3) is saved in diffusers' own layout instead (`lora_layout`), the one diffusers' SD3 loader
reads (it converts no kohya keys) and ComfyUI maps too: `transformer.<path>.lora_A.weight` / `.lora_B.weight`,
with the scale alpha / r folded into B, since neither reader takes an alpha there.

Tensors are float32 by default (`save_lora(..., dtype=torch.float16)` halves the file): LoRA files are small (an
SD 1.5 attention LoRA at rank 8 is 6.4 MB in fp32, ALL at rank 4 16 MB) and fp32 makes save -> load reproduce the
trained adapter exactly. ComfyUI maps `lora_unet_<diffusers path>` through its diffusers->LDM UNet key map
(comfy.utils.unet_to_diffusers); diffusers converts kohya names back to module paths on load
(lora_conversion_utils._convert_unet_lora_key).

Targets (`targets=` of add_lora; peft matches each as a suffix of module paths):

- ATTENTION: to_q, to_k, to_v, to_out.0 of every self- and cross-attention.
- ALL: ATTENTION + the transformer blocks' feed-forward (ff.net.0.proj, the GEGLU input Linear, and ff.net.2),
  the transformers' proj_in/proj_out, and the resnets' conv1, conv2, conv_shortcut and time_emb_proj: what
  sd-scripts' LoRA with conv layers ("LoCon") adapts inside transformer and resnet blocks.
- EXTRA (not in ALL, but loadable, opt-in): conv_in, conv_out, time_embedding.linear_1/2, downsamplers.0.conv,
  upsamplers.0.conv. They act on the whole latent (conv_in/conv_out), on the global time signal (time
  embedding) or on resolution changes (the samplers' stride-2 convs) rather than on content features inside the
  blocks; sd-scripts' LoRA leaves the first three out and adds the samplers only in its conv mode. ALL follows
  that common practice; pass targets=ALL + EXTRA to adapt them too.
- Every name in SUPPORTED_TARGETS (ALL + EXTRA) was checked under its kohya name in both programs: diffusers
  (tests/test_lora.py: identical images after save -> load_lora on the tiny UNet; tests/test_sdxl.py: an SDXL
  UNet's file through StableDiffusionXLPipeline.load_lora_weights) and ComfyUI 0.3.64 (scripts/comfy_lora_keys.py,
  SD 1.5 and SDXL UNets: every key mapped by LoraLoader, no "lora key not loaded", patched weight = W +
  alpha/r·up·down). The same kohya names serve SDXL: ComfyUI maps `lora_unet_<diffusers path>` for every UNet
  family. Other names are refused by add_lora: a file holding them is not known to load in both. Norm layers take
  no LoRA (no matrix).

Adapter state (applies to every function below): peft keeps a list of active adapters per layer and a scale
(weight · alpha / r) per adapter. `add_lora` and `load_lora` leave a well-defined active set, and `use_loras`
replaces it; none of them changes which LoRA tensors are trainable except `add_lora` (only the new adapter is).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import warnings
from typing import Iterable, Optional, Sequence

import torch

from .family import backbone, is_flow, is_sdxl
from .files import atomic_write
from .loading import ModelLoadError

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
PROJECTIONS = ("proj_in", "proj_out")
RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
ALL = ATTENTION + FEED_FORWARD + PROJECTIONS + RESNET
EXTRA = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "downsamplers.0.conv",
         "upsamplers.0.conv")
SUPPORTED_TARGETS = frozenset(ALL + EXTRA)  # kohya keys diffusers and ComfyUI both load (see the module docstring)

INITS = ("gaussian", True, False)  # peft init_lora_weights: A ~ N(0, 1/r) and B = 0; kaiming A and B = 0; random A, B
KOHYA_PREFIX = "lora_unet_"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class LoraError(ModelLoadError):
    """A LoRA file is missing, unreadable, not a LoRA, or made for a UNet of another architecture."""


# ----------------------------------------------------------------------------------------------- adapters

def _lora_layers(model, name: Optional[str] = None):
    """(module path, peft LoraLayer) of every LoRA-wrapped layer, optionally only those holding adapter `name`."""
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and (name is None or name in module.lora_A):
            yield path, module


def _adapter_names(model) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def _require_adapter(unet, name: str) -> list:
    layers = list(_lora_layers(unet, name))
    if not layers:
        have = _adapter_names(unet)
        raise ValueError(f"this UNet has no LoRA adapter {name!r} (it has {have or 'none'}); add one with "
                         f"add_lora(unet, name={name!r}) or load one with load_lora")
    return layers


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name {name!r}: expected a non-empty string of letters, digits, '_' and '-' "
                         f"(peft uses it as a module key, so no '.')")
    if hasattr(torch.nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is a torch.nn.Module attribute, which peft cannot use as an "
                         f"adapter key; choose another name (e.g. {name + '_lora'!r})")
    return name


def _set_requires_grad(param: torch.Tensor, flag: bool) -> None:
    """requires_grad_, also for tensors created in inference mode (a pipeline loaded inside a ComfyUI node)."""
    if param.requires_grad == flag:
        return
    if param.is_inference():
        with torch.inference_mode():
            param.requires_grad_(flag)
    else:
        param.requires_grad_(flag)


def _base(module):
    """The layer a peft LoRA layer wraps, or the module itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _is_target(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


@contextlib.contextmanager
def _quiet_peft():
    """Silence peft's notes on intended behaviour: several adapters on one model, deleting the active one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


def add_lora(unet, rank: int = 8, alpha: float | None = None, targets: Sequence[str] = ATTENTION, name: str = "r0",
             init="gaussian", *, dtype: Optional[torch.dtype] = torch.float32) -> str:
    """Add a trainable LoRA adapter `name` to a diffusers UNet, make it the only active one, and return its name.

    rank, alpha: ΔW = alpha / rank · B·A per adapted layer (alpha defaults to rank, a scale of 1).
    targets: module-name suffixes from SUPPORTED_TARGETS (ATTENTION, ALL, or with EXTRA ones).
    init: "gaussian" (A ~ N(0, 1/r), B = 0), True (peft's kaiming-uniform A, B = 0) or False (A and B random,
    so ΔW ≠ 0 from the start: for tests). With B = 0 the adapted UNet starts equal to the base one.
    dtype: of the LoRA tensors; float32 by default (as peft does for fp16/bf16 base models), so that a bf16 UNet
    trains fp32 adapters; peft casts activations to it and the layer output back. None: the base weights' dtype.

    Calling again with a name that exists replaces that adapter by a freshly initialised one (its old tensors
    are deleted); other adapters are kept but made inactive. Every UNet parameter other than this adapter's
    LoRA tensors ends with requires_grad False.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}; expected a positive integer")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r}; expected a positive number (default: the rank)")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in SUPPORTED_TARGETS]
    if not targets or unknown:
        raise ValueError(f"targets={targets!r}: {unknown or 'empty'}; expected names from {sorted(SUPPORTED_TARGETS)}"
                         f" (ATTENTION, ALL, EXTRA): their kohya keys load in both diffusers and ComfyUI")
    if init not in INITS or isinstance(init, int) and not isinstance(init, bool):
        raise ValueError(f"init={init!r}; expected 'gaussian', True (kaiming A, zero B) or False (random A and B)")
    _check_name(name)
    base_paths = [p for p, m in unet.named_modules() if ".base_layer" not in p and ".lora_" not in p
                  and isinstance(_base(m), (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in targets if not any(_is_target(p, t) for p in base_paths)]
    if missing:
        raise ValueError(f"targets {missing} match no Linear/Conv2d layer of this {type(unet).__name__}")

    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; trainable tensors must be normal
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init,
                            lora_dropout=0.0, bias="none")
        with _quiet_peft():
            if name in _adapter_names(unet):
                unet.delete_adapters(name)
            unet.add_adapter(config, adapter_name=name)  # diffusers: inject, then set_adapter(name)
        unet.enable_lora()  # layers that existed before may have been disabled by use_loras(pipe, [])
        ours = set()
        for _, layer in _lora_layers(unet, name):
            if dtype is not None:
                layer.lora_A[name].to(dtype)
                layer.lora_B[name].to(dtype)
            ours.update(layer.lora_A[name].parameters())
            ours.update(layer.lora_B[name].parameters())
        for p in unet.parameters():
            _set_requires_grad(p, p in ours)
    return name


def lora_parameters(unet, name: str) -> list[torch.nn.Parameter]:
    """The tensors of adapter `name` (A then B of each layer, in module order: stable across runs)."""
    params = []
    for _, layer in _require_adapter(unet, name):
        for attribute in layer.adapter_layer_names:
            holder = getattr(layer, attribute)
            if name in holder:
                item = holder[name]
                params.extend(item.parameters() if isinstance(item, torch.nn.Module) else [item])
    return params


def _matrices(layer, name: str):
    """A as [r, in·kh·kw] and B as [out, r] of one layer (a conv LoRA's B is 1×1, so ΔW = B·A reshaped)."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if b.dim() > 2 and any(s != 1 for s in b.shape[2:]):
        raise NotImplementedError(f"LoRA B with a {tuple(b.shape[2:])} kernel: ΔW is not a matrix product")
    return a.flatten(1), b.flatten(1)


def lora_delta_norm2(unet, name: str) -> torch.Tensor:
    """Σ over adapted layers of ‖ΔW‖_F², ΔW = scale · B·A, as a differentiable float32 scalar.

    scale is the layer's current one: alpha / r times the weight use_loras gave the adapter (1 after add_lora).
    Computed as scale² · Σ (BᵀB) ⊙ (AAᵀ) (= trace(BᵀB·AAᵀ) = ‖BA‖²), r×r matrices only, in fp32 with autocast off.
    """
    layers = _require_adapter(unet, name)
    device = layers[0][1].lora_A[name].weight.device
    with torch.autocast(device.type, enabled=False):
        total = torch.zeros((), device=device, dtype=torch.float32)
        for _, layer in layers:
            a, b = (m.float() for m in _matrices(layer, name))
            total = total + layer.scaling[name] ** 2 * ((b.T @ b) * (a @ a.T)).sum()
    return total


# ----------------------------------------------------------------------------------------------- export

def _kohya_alpha(layer, name: str) -> float:
    """The kohya alpha giving this layer's configured scale (weight 1): alpha / r, or alpha / √r with rsLoRA."""
    alpha, rank = float(layer.lora_alpha[name]), layer.r[name]
    return alpha * math.sqrt(rank) if layer.use_rslora.get(name, False) else alpha


def lora_layout(model) -> str:
    """The file layout both diffusers and ComfyUI read for this backbone: "kohya-unet" for a UNet;
    "diffusers-transformer" for a flow transformer (SD3), whose diffusers loader reads no kohya keys."""
    return "kohya-unet" if hasattr(model, "down_blocks") else "diffusers-transformer"


def targets_for(model, which: str) -> tuple[str, ...]:
    """"attention" or "all" on this backbone: ATTENTION, or a UNet's ALL and a flow transformer's attention and
    feed-forward layers (it has no resnets or convolutions to adapt)."""
    if which == "attention":
        return ATTENTION
    return ALL if lora_layout(model) == "kohya-unet" else ATTENTION + FEED_FORWARD


def transformer_state_dict(model, name: str, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Adapter `name` of a flow transformer as diffusers-format tensors (CPU copies):
    transformer.<path>.lora_A.weight / .lora_B.weight, with the layer's scale (alpha / r) folded into B, so that
    both readers' default scale of 1 gives the trained ΔW."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in _require_adapter(model, name):
        if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
            raise NotImplementedError(f"{path}: adapter {name!r} is a DoRA/variant adapter; only plain LoRA exports")
        scale = _kohya_alpha(layer, name) / layer.r[name]
        with torch.no_grad():
            down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
            out[f"transformer.{path}.lora_A.weight"] = down.detach().to("cpu", dtype, copy=True).contiguous()
            out[f"transformer.{path}.lora_B.weight"] = (up.detach().float() * scale).to("cpu", dtype).contiguous()
    return out


def kohya_state_dict(unet, name: str, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Adapter `name` as kohya-format tensors (CPU copies): lora_unet_<path>.lora_down.weight / .lora_up.weight
    in `dtype`, and .alpha as a float32 scalar, for every adapted layer."""
    out: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    for path, layer in _require_adapter(unet, name):
        if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
            raise NotImplementedError(f"{path}: adapter {name!r} is a DoRA/variant adapter; only plain LoRA exports")
        if getattr(layer.lora_B[name], "bias", None) is not None:
            raise NotImplementedError(f"{path}: adapter {name!r} has LoRA biases, which kohya files cannot hold")
        key = KOHYA_PREFIX + path.replace(".", "_")
        if key in owners:
            raise ValueError(f"modules {owners[key]} and {path} share the kohya name {key}")
        owners[key] = path
        with torch.no_grad():
            down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
            out[f"{key}.lora_down.weight"] = down.detach().to("cpu", dtype, copy=True).contiguous()
            out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype, copy=True).contiguous()
            out[f"{key}.alpha"] = torch.tensor(_kohya_alpha(layer, name), dtype=torch.float32)
    return out


def _metadata(unet, name: str, dtype: torch.dtype, tensors: dict, extra: Optional[dict]) -> dict[str, str]:
    config = unet.peft_config[name]
    layout = lora_layout(unet)
    ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith((".lora_down.weight", ".lora_A.weight"))}
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")} if layout == "kohya-unet" else set(ranks)
    rank = ranks.pop() if len(ranks) == 1 else int(config.r)
    alpha = alphas.pop() if len(alphas) == 1 else float(config.lora_alpha)
    targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else [config.target_modules]
    meta = {
        "format": "pt",
        "ss_network_module": "networks.lora",  # sd-scripts' keys: shown by LoRA managers
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "r0_lora_format": layout,
        "r0_lora_rank": str(rank),
        "r0_lora_alpha": f"{alpha:g}",
        "r0_lora_targets": json.dumps(targets),
        "r0_lora_modules": str(sum(k.endswith((".alpha", ".lora_A.weight")) for k in tensors)),
        "r0_lora_dtype": str(dtype).removeprefix("torch."),
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"metadata key {key!r}: safetensors metadata keys are strings")
        if key in meta or key == "lora_adapter_metadata":  # the latter is read by diffusers as a LoraConfig
            raise ValueError(f"metadata key {key!r} is reserved by save_lora; choose another name")
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return meta


def save_lora(unet, path: str | os.PathLike, name: str, metadata: Optional[dict] = None, *,
              dtype: torch.dtype = torch.float32) -> str:
    """Write adapter `name` as one .safetensors file (atomically: temp file in the same folder, then os.replace),
    loadable by ComfyUI's LoraLoader and by diffusers' `load_lora_weights` / `load_lora`: kohya format for a
    UNet, diffusers format for a flow transformer (lora_layout).

    metadata: extra safetensors metadata; non-string values are stored as JSON. The file also records rank,
    alpha, targets, module count and dtype (r0_lora_*, and sd-scripts' ss_network_* keys). No timestamp: the
    same adapter saves to the same tensors and metadata.
    dtype: of the down/up tensors: float32 (exact round trip) or float16/bfloat16 (half the size).
    Returns `path`.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"LoRA path {path!r}: expected a file name ending in .safetensors")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype}; expected torch.float32, torch.float16 or torch.bfloat16")
    export = kohya_state_dict if lora_layout(unet) == "kohya-unet" else transformer_state_dict
    tensors = export(unet, name, dtype=dtype)
    meta = _metadata(unet, name, dtype, tensors, metadata)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# ----------------------------------------------------------------------------------------------- loading

_LORA_WEIGHT = re.compile(r"(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.(down|up))"
                          r"\.weight$")


def _components(pipe):
    """The pipeline's models that can hold LoRA layers (unet or transformer, text encoders), or [model] for a
    bare model."""
    if not hasattr(pipe, "unet") and not hasattr(pipe, "transformer"):
        return [pipe]
    names = getattr(pipe, "_lora_loadable_modules", ["unet", "text_encoder"])
    return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]


def active_loras(pipe) -> list[tuple[str, float]]:
    """The adapters a pipeline (or a bare UNet) applies now, with their weights; [] when LoRA is off.
    use_loras(pipe, active_loras(pipe)) changes nothing."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[str, Optional[float]] = {}
    for model in _components(pipe):
        for module in model.modules():
            if not isinstance(module, BaseTunerLayer) or module.disable_adapters:
                continue
            for adapter in module.active_adapters:
                if found.get(adapter) is None and adapter in getattr(module, "scaling", {}):
                    base = _kohya_alpha(module, adapter) / module.r[adapter]
                    found[adapter] = round(module.scaling[adapter] / base, 12)
                else:
                    found.setdefault(adapter, None)
    return [(adapter, 1.0 if weight is None else weight) for adapter, weight in found.items()
            if any(adapter in _adapter_names(m) for m in _components(pipe))]


def use_loras(pipe, loras: Iterable[tuple[str, float]]) -> None:
    """Apply exactly these adapters with these weights (pipe.set_adapters), or no LoRA at all when the list is
    empty (pipe.disable_lora), so that one cached pipeline can serve several graph branches. Works on a
    pipeline or a bare diffusers model. Never changes which LoRA tensors are trainable."""
    loras = [(str(n), float(w)) for n, w in loras]
    names = [n for n, _ in loras]
    if len(set(names)) != len(names):
        raise ValueError(f"use_loras: an adapter appears twice in {names}")
    bad = [(n, w) for n, w in loras if not math.isfinite(w)]
    if bad:
        raise ValueError(f"use_loras: weights must be finite numbers, got {bad}")
    present = sorted({a for m in _components(pipe) for a in _adapter_names(m)})
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"use_loras: no adapter named {missing} (loaded: {present or 'none'}); load it with "
                         f"load_lora(pipe, path, name) first")
    if not present:
        return  # no LoRA layers anywhere: nothing to switch off
    trainable = {p: p.requires_grad for m in _components(pipe) for p in m.parameters()}
    try:
        if not loras:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(names, [w for _, w in loras])
    finally:
        for p, grad in trainable.items():
            _set_requires_grad(p, grad)


def _check_lora_file(pipe, path: str) -> None:
    """Raise LoraError unless `path` is a safetensors LoRA whose UNet part fits pipe.unet, key by key."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise LoraError(f"LoRA file {path} not found; expected a .safetensors LoRA (kohya lora_unet_* keys or "
                        f"diffusers unet.*.lora_A/B keys), e.g. in ComfyUI's models/loras/")
    if not path.lower().endswith(".safetensors"):
        raise LoraError(f"LoRA file {path}: only .safetensors LoRA files are read (pickled .bin/.pt/.ckpt files "
                        f"can run code when loaded)")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises several types on damaged files
        raise LoraError(f"LoRA file {path} is unreadable or corrupt ({type(e).__name__}: {e}); expected a "
                        f"complete .safetensors file") from e
    if not any(_LORA_WEIGHT.search(k) for k in keys):
        hint = ("; it looks like a full model checkpoint: load it as a checkpoint instead"
                if any(k.startswith(("model.diffusion_model.", "down_blocks.", "conv_in.")) for k in keys) else "")
        raise LoraError(f"{path} is not a LoRA file: none of its {len(keys)} tensors is a LoRA down/up (A/B) weight "
                        f"(first keys: {', '.join(sorted(keys)[:3]) or 'none'}){hint}")
    try:
        # SDXL's load_lora_weights passes its UNet config (to rename sgm-layout kohya keys); SD 1.x/2.x's does not
        extra = {"unet_config": pipe.unet.config} if is_sdxl(pipe) else {}
        state = pipe.lora_state_dict(path, local_files_only=True, **extra)
        state = state[0] if isinstance(state, tuple) else state   # SD 1.x/SDXL also return network alphas
    except Exception as e:
        raise LoraError(f"{path} holds LoRA weights in a layout diffusers cannot convert ({type(e).__name__}: "
                        f"{e}); expected a kohya (lora_unet_*) or diffusers (unet.* / transformer.*) LoRA for this "
                        f"model family") from e
    bad = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                 and not torch.isfinite(v).all())
    if bad:
        raise LoraError(f"LoRA file {path} holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}): the training "
                        f"that wrote it diverged; use an earlier checkpoint or retrain with a lower learning rate")
    prefix = "transformer." if is_flow(pipe) else "unet."
    _check_unet_part(backbone(pipe), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, path,
                     set(keys))


def _check_unet_part(unet, state: dict[str, torch.Tensor], path: str, file_keys: set[str]) -> None:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not state:
        raise LoraError(f"{path} holds no UNet LoRA weights (only text-encoder ones?); expected lora_unet_* or "
                        f"unet.* keys")
    state = convert_unet_state_dict_to_peft(state)
    modules = dict(unet.named_modules())
    for key in sorted(state):
        match = re.match(r"^(.*)\.lora_([AB])\.weight$", key)
        if match is None:
            continue  # DoRA magnitudes, biases: left to diffusers
        path_in_unet, part = match.groups()
        kohya = f"{KOHYA_PREFIX}{path_in_unet.replace('.', '_')}.lora_{'down' if part == 'A' else 'up'}.weight"
        shown = kohya if kohya in file_keys else f"unet.{key}"
        module = modules.get(path_in_unet)
        if module is None:
            close = difflib.get_close_matches(path_in_unet, list(modules), n=1)
            raise LoraError(f"{path} is a LoRA for another UNet architecture: its key {shown} adapts "
                            f"{path_in_unet}, which this {type(unet).__name__} does not have"
                            f"{f' (nearest: {close[0]})' if close else ''}")
        module = _base(module)
        weight = getattr(module, "weight", None)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or weight is None:
            raise LoraError(f"{path}: key {shown} adapts {path_in_unet}, a {type(module).__name__} in this UNet, "
                            f"which takes no LoRA (expected a Linear or Conv2d)")
        shape, have = tuple(state[key].shape), tuple(weight.shape)
        ok = (len(shape) == len(have) and shape[1:] == have[1:]) if part == "A" else \
            (len(shape) == len(have) and shape[0] == have[0] and all(s == 1 for s in shape[2:]))
        if not ok:
            expected = ("[rank, " + ", ".join(map(str, have[1:])) + "]") if part == "A" else \
                (f"[{have[0]}, rank" + ", 1" * (len(have) - 2) + "]")
            raise LoraError(f"{path} is a LoRA for another UNet architecture: its key {shown} has shape "
                            f"{list(shape)}, but this UNet's {path_in_unet}.weight is {list(have)} (so the LoRA "
                            f"{'down/A' if part == 'A' else 'up/B'} weight should be {expected})")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet_missing_text_encoder_keys():
    """Drop diffusers' "No LoRA keys associated to CLIPTextModel" warning (a UNet-only LoRA is the normal case)."""
    logger, drop = logging.getLogger("diffusers.loaders.lora_base"), _DropMessage("No LoRA keys associated to")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_lora(pipe, path: str | os.PathLike, name: Optional[str] = None, weight: float = 1.0) -> str:
    """Load a LoRA file onto pipe.unet (and the text encoder, if the file holds text-encoder weights) as adapter
    `name` through diffusers' `pipe.load_lora_weights`, and return the name.

    path: a .safetensors LoRA: ours (save_lora), or any kohya / diffusers SD-family LoRA diffusers understands.
    name: default the file name without extension, with characters other than letters, digits, '_', '-'
    replaced by '_' (and '_lora' appended where that is a torch Module attribute such as 'half'). A name
    already loaded (or added by add_lora) is replaced.
    weight: the new adapter is applied with this weight, on top of the adapters active before (with theirs);
    use_loras sets the active set exactly. The loaded tensors are frozen (requires_grad False).

    Raises LoraError for a missing file, a file that is not a LoRA, or a LoRA whose keys or shapes do not fit this
    UNet (naming the first mismatching key and what the UNet has); these checks run before the pipeline is touched.
    """
    path = os.fspath(path)
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", os.path.splitext(os.path.basename(path))[0]) or "lora"
        if hasattr(torch.nn.ModuleDict(), name):  # e.g. a file named half.safetensors or train.safetensors
            name += "_lora"
    _check_name(name)
    weight = float(weight)
    _check_lora_file(pipe, path)
    before = [(n, w) for n, w in active_loras(pipe) if n != name]
    trainable = {p: p.requires_grad for m in _components(pipe) for p in m.parameters()}

    def restore(loras):
        for p, grad in trainable.items():
            _set_requires_grad(p, grad)
        use_loras(pipe, loras)

    with torch.inference_mode(False), _quiet_peft():
        if any(name in _adapter_names(m) for m in _components(pipe)):
            pipe.delete_adapters(name)
        try:
            with _quiet_missing_text_encoder_keys():
                pipe.load_lora_weights(path, adapter_name=name, local_files_only=True)
        except Exception as e:
            if any(name in _adapter_names(m) for m in _components(pipe)):
                pipe.delete_adapters(name)
            restore([(n, w) for n, w in before if any(n in _adapter_names(m) for m in _components(pipe))])
            raise LoraError(f"diffusers could not load the LoRA {path} ({type(e).__name__}: {e})") from e
        for m in _components(pipe):
            for _, layer in _lora_layers(m, name):
                for attribute in layer.adapter_layer_names:
                    if name in getattr(layer, attribute):
                        for p in getattr(layer, attribute)[name].parameters():
                            _set_requires_grad(p, False)
        restore(before + [(name, weight)])
    return name
