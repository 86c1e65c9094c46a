"""R0 training: a few-step generator trained by regularized reward maximization, from prompts alone.

The generator is the pipeline's own UNet run through the K-step R0 sampler (r0_core.sampler). One iteration:
  1. draw prompts, start noise, η per step (and R0+'s step k), all seeded by (seed, iteration), so a resumed run
     repeats exactly what an uninterrupted one would have done;
  2. R0: run all K steps with grad; R0+: run the steps before k without grad, then step k with grad and take its
     x̂0 (a short backward graph: less memory, as in the paper);
  3. decode with the VAE, with grad (every UNet call and the decode are checkpointed);
  4. reward loss: with normalize_gradients each reward's image gradient is scaled to unit norm per image before
     weighting (WeightedReward.r0_surrogate), else −mean reward; the implicit CFG reward (cfg_reward_weight > 0,
     r0_core.rewards.implicit_cfg) adds the frozen pretrained model's guidance direction on the latents, as one
     more normalised, weighted reward;
  5. + reg_weight · ‖θ − θ0‖² (LoRA: ‖ΔW‖² of the adapter), then one AdamW step (and the EMA, if ema_decay).

The paper's recipe: the generator runs without CFG (guidance 1: one UNet call a step, K NFE), guidance enters
only through the implicit CFG reward, and several rewards share the push with normalised gradients.

`python -m r0_core.train --help` (or `accelerate launch -m r0_core.train ...` on several GPUs) runs it from the
shell; `train_r0(pipe, reward, config, out_dir)` from Python.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import checks, cli, lora, memory
from .files import atomic_save, atomic_write
from .family import backbone, conditioning, decode, denoiser, is_flow, latent_shape, sampler_sigmas, start_latents
from .generate import checkpointed
from .rewards import RewardModel, WeightedReward
from .rewards.implicit_cfg import ImplicitCFG
from .sampler import Cancelled, flow_noise_scaling, sample_r0, vp_noise_scaling



logger = logging.getLogger(__name__)

# options added after the first trainer, and the value of each that does what the first trainer did
LATER_OPTIONS = {"eta_per_image": False, "plus_step_weights": None, "cfg_reward_weight": 0.0,
                 "cfg_reward_t_range": (0.02, 0.98), "adam_beta1": 0.9, "ema_decay": 0.0}


@dataclass
class R0Config:
    prompts: list[str]                    # training prompts (--prompts: a text file, one per line)
    iterations: int = 400                 # optimizer steps
    batch_size: int = 8                   # images generated and scored per step
    steps: int = 4                        # K, the generator's sampler steps
    mode: str = "r0"                      # "r0": reward on the final image; "r0+": on x̂0 at a random step k
    lr: float = 1e-3                      # AdamW learning rate of the trained weights
    lora_rank: int = 8                    # 0 trains the full UNet
    lora_targets: str = "attention"       # "attention" or "all" (see r0_core.lora)
    reg_weight: float = 1e-2              # weight of ‖θ − θ0‖², the pull towards the pretrained model
    eta_range: tuple[float, float] = (0.0, 1.0)  # η ~ U(eta_range) per sampler step
    eta_per_image: bool = False           # draw η per step and per image instead of per step
    plus_step_weights: Optional[tuple[float, ...]] = None  # R0+: P(k) for k = 0..K-1 (None: uniform)
    guidance: float = 1.0                 # classifier-free guidance inside the generator (1: off, one UNet call)
    cfg_reward_weight: float = 0.0        # weight of the implicit CFG reward (0: off)
    cfg_reward_t_range: tuple[float, float] = (0.02, 0.98)  # its re-noising levels, fractions of the timesteps
    normalize_gradients: Optional[bool] = None   # None: the reward's own setting (WeightedReward), else True
    grad_clip: float = 1.0                # gradient-norm clip (0: none)
    adam_beta1: float = 0.9               # AdamW's first-moment decay
    ema_decay: float = 0.0                # EMA of the trained weights, saved instead of them (0: off)
    seed: int = 0                         # the same seed gives the same weights
    height: Optional[int] = None          # training image height in pixels (None: the model's own)
    width: Optional[int] = None           # training image width in pixels (None: the model's own)
    checkpoint_every: int = 50            # iterations between resumable checkpoints
    mixed_precision: str = "auto"         # "no", "fp16", "bf16"; auto: bf16 on CUDA, else no
    gradient_checkpointing: bool = True   # recompute UNet activations in backward: less memory, more time

    def __post_init__(self):
        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError("prompts: expected one or more non-empty prompts (one per line in a prompts file)")
        if self.mode not in ("r0", "r0+"):
            raise ValueError(f"mode={self.mode!r}; expected 'r0' or 'r0+'")
        lo, hi = self.eta_range
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"eta_range={self.eta_range}; expected 0 <= low <= high <= 1")
        if self.iterations < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("iterations, batch_size and steps must be at least 1")
        checks.number("lr", self.lr, 0, low_open=True)
        checks.number("reg_weight", self.reg_weight, 0)
        checks.number("guidance", self.guidance, 1)
        checks.number("grad_clip", self.grad_clip, 0)
        checks.lora_targets(self.lora_targets)
        checks.seed(self.seed)
        checks.whole("lora_rank", self.lora_rank, 0)   # 0 trains the full UNet
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={self.checkpoint_every}; expected a whole number >= 1")
        ImplicitCFG(self.cfg_reward_weight, self.cfg_reward_t_range)  # validates both
        if self.plus_step_weights is not None:
            w = self.plus_step_weights
            if len(w) != self.steps or not all(math.isfinite(v) and v >= 0 for v in w) or not sum(w) > 0:
                raise ValueError(f"plus_step_weights={w}; expected {self.steps} weights >= 0 (one per sampler "
                                 f"step k = 0..{self.steps - 1}), not all 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay}; expected 0 <= ema_decay < 1 (0: no EMA)")
        if not 0 <= self.adam_beta1 < 1:
            raise ValueError(f"adam_beta1={self.adam_beta1}; expected 0 <= adam_beta1 < 1")

    @property
    def implicit_cfg(self) -> Optional[ImplicitCFG]:
        return ImplicitCFG(self.cfg_reward_weight, self.cfg_reward_t_range) if self.cfg_reward_weight else None

    def fingerprint(self) -> str:
        """What a resumed run must share with the saved one to continue it exactly. Options added later are left
        out at the value that reproduces the earlier trainer, so runs saved before them still resume."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("iterations", "checkpoint_every")
                and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    lora_path: Optional[str]      # the LoRA file (partial if cancelled); None in full fine-tune mode
    curve_path: str
    history: list[dict] = field(default_factory=list)
    cancelled: bool = False


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:   # -sig: a byte-order mark some editors write is not a prompt
            prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
                         ) from e
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts; write one per line")
    return prompts


def _rng(config, iteration: int) -> torch.Generator:
    """The iteration's generator, the same on every process (see `share`)."""
    return torch.Generator("cpu").manual_seed((config.seed * 1_000_003 + iteration) * 64)


def share(accelerator, batch_size: int) -> slice:
    """This process's rows of a global batch. Every process draws the whole batch from the same generator and
    keeps its own share, so a run gives the same weights whatever the number of processes (the gradients, averaged
    over processes, are the whole batch's mean)."""
    processes, index = accelerator.num_processes, accelerator.process_index
    if batch_size % processes:
        raise ValueError(f"batch_size={batch_size} does not split evenly over {processes} processes; use a "
                         f"multiple of {processes}")
    rows = batch_size // processes
    return slice(index * rows, (index + 1) * rows)


def generator_latents(model, config: R0Config, c: dict, shape, sigmas, gen: torch.Generator,
                      part: slice = slice(None), flow: bool = False, start: Optional[Callable] = None,
                      noise_scaling: Optional[Callable] = None) -> torch.Tensor:
    """Clean latents from the K-step generator, differentiable w.r.t. the trainable weights: the `part` rows of
    a global batch of `shape` (its noise and η drawn for all of it), conditioned on `c` (family.conditioning);
    flow: a rectified-flow model's start and re-noising, unless `start(ε)` and `noise_scaling(σ, ε, x0)` are
    given (a host application's own, as R0Generator carries them)."""
    lo, hi = config.eta_range
    etas = lo + (hi - lo) * torch.rand(config.steps, *(shape[:1] if config.eta_per_image else ()), generator=gen)
    etas = etas[:, part] if config.eta_per_image else etas
    if config.mode == "r0+":
        weights = config.plus_step_weights
        k = int(torch.multinomial(torch.tensor(weights, dtype=torch.float), 1, generator=gen) if weights
                else torch.randint(config.steps, (1,), generator=gen))
    like = c["cond"]
    start = start or (lambda eps: start_latents(eps, sigmas, flow))
    scaling = noise_scaling or (flow_noise_scaling if flow else vp_noise_scaling)
    x = start(torch.randn(shape, generator=gen)[part].to(like))
    noise = lambda sigma, sigma_next: torch.randn(shape, generator=gen)[part].to(like)  # noqa: E731
    extra = {**c, "guidance": config.guidance}
    if config.mode == "r0":
        return sample_r0(model, x, sigmas, extra, eta=etas, noise_sampler=noise, disable=True, noise_scaling=scaling)
    if k > 0:  # R0+: the path to step k carries no gradient
        with torch.no_grad():
            x = sample_r0(model, x, sigmas[:k + 1], extra, eta=etas[:k], noise_sampler=noise, disable=True,
                          noise_scaling=scaling)
    return model(x, sigmas[k] * x.new_ones(len(x)), **extra)  # x̂0 at step k


def reward_loss(reward: Optional[RewardModel], images: torch.Tensor, prompts: list[str], normalize: bool,
                cfg: Optional[ImplicitCFG] = None, latents: Optional[torch.Tensor] = None,
                cfg_direction: Optional[torch.Tensor] = None):
    """(loss, per-reward mean scores). Normalised: −Σ_i w_i <ĝ_i, x> / B, so each reward pushes with unit
    strength per image whatever its scale; else −mean Σ_i w_i r_i. The implicit CFG reward, given its direction
    d on the latents, adds −w <d̂, latents> / B (normalised) or −w <d, latents> / B, and reports its CFG gap."""
    loss, scores = images.new_zeros(()), []
    if reward is not None:
        weighted = reward if isinstance(reward, WeightedReward) else WeightedReward([reward])
        if normalize:
            surrogate, per_image = weighted.r0_surrogate(images, prompts)
            loss, scores = surrogate / len(images), list(per_image.mean(1))
        else:
            per_image = torch.stack([s(images, prompts) for s in weighted.scorers])
            loss = -sum(w * s.mean() for w, s in zip(weighted.weights, per_image))
            scores = list(per_image.detach().mean(1))
    if cfg is not None:
        loss = loss + cfg.surrogate(cfg_direction, latents, normalize) / len(latents)
        scores.append(cfg.gap(cfg_direction).mean())
    return loss, torch.stack(scores)


def pretrained(trainable):
    """The model as it was before training (the implicit CFG reward's and LCM's teacher), while inside: a
    Trainable's LoRA adapters switched off (or the frozen copy a full fine-tune keeps), a LowRankWeights'
    deltas switched off."""
    return trainable.switched_off()


def optimizer_step(accelerator, trainable: "Trainable", optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, clip the trained weights' gradient norm (0: no clip), step, clear: every trainer's step."""
    accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(trainable.params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reward_names(reward: Optional[RewardModel], cfg: Optional[ImplicitCFG]) -> list[str]:
    """Names of the scores a trainer logs, in order: each reward's, then the implicit CFG reward's gap."""
    scorers = [] if reward is None else reward.scorers if isinstance(reward, WeightedReward) else [reward]
    return [type(s).__name__ for s in scorers] + (["implicit CFG gap (RMS)"] if cfg is not None else [])


def freeze_encoders(pipe) -> None:
    """The VAE and every text encoder (SDXL and SD3 have two) stay frozen in every trainer."""
    for module in (pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None),
                   getattr(pipe, "text_encoder_3", None)):
        if module is not None:
            module.requires_grad_(False)


class TrainedWeights:
    """What every trainer's loop asks of the weights it moves: `params`, `delta_norm2()` (the pull towards the
    pretrained weights), `switched_off()` (the pretrained model, inside) and a state dict for resuming."""
    params: list

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): p.detach().cpu().clone() for i, p in enumerate(self.params)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(state[str(i)])


class LowRankWeights(TrainedWeights):
    """A LoRA that a host application applies itself (the pack's native-MODEL trainer: ComfyUI's weight
    wrappers): per adapted weight W an (up [out, r], down [r, in]) pair, W' = W + scale · up·down (a conv's
    kernel flattened into `in`). The host's wrappers read `on`, so switched off the model is the pretrained one."""
    full = False

    def __init__(self, pairs: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]], scale: float):
        if not pairs:
            raise ValueError("LowRankWeights: no weights to adapt (the target rule matched no layer)")
        self.pairs, self.scale, self.on = pairs, float(scale), True
        self.params = [p for up, down in pairs.values() for p in (up, down)]

    def delta(self, name: str) -> torch.Tensor:
        up, down = self.pairs[name]
        return self.scale * (up @ down)

    def delta_norm2(self) -> torch.Tensor:
        return sum((self.delta(name) ** 2).sum() for name in self.pairs)

    @contextlib.contextmanager
    def switched_off(self):
        self.on = False
        try:
            yield None
        finally:
            self.on = True


class Trainable(TrainedWeights):
    """The weights R0 moves in a diffusers backbone (a LoRA adapter, or the whole UNet) and their pull towards
    the pretrained ones."""

    def __init__(self, unet, config, adapter: str, keep_pretrained: bool = False):
        self.unet, self.full, self.adapter = unet, config.lora_rank == 0, adapter
        unet.requires_grad_(False)
        if self.full:
            # keep_pretrained: a frozen copy for whoever asks the pretrained UNet (2x the UNet's memory); a
            # LoRA's pretrained UNet is the same one with the adapter off
            self.frozen = copy.deepcopy(unet).eval() if keep_pretrained else None
            unet.float().requires_grad_(True)  # fp32 master weights: bf16 steps would round small updates away
            self.params = list(unet.parameters())
            self.initial = [p.detach().clone() for p in self.params]
        else:
            targets = lora.targets_for(unet, config.lora_targets)
            with torch.random.fork_rng(devices=[]):  # the LoRA's random init depends on the seed alone
                torch.manual_seed(config.seed)
                lora.add_lora(unet, rank=config.lora_rank, targets=targets, name=adapter)
            self.params = lora.lora_parameters(unet, adapter)

    def delta_norm2(self) -> torch.Tensor:
        if self.full:
            return sum(((p - p0) ** 2).sum() for p, p0 in zip(self.params, self.initial))
        return lora.lora_delta_norm2(self.unet, self.adapter)

    @contextlib.contextmanager
    def switched_off(self):
        if self.full:
            yield self.frozen
            return
        self.unet.disable_lora()
        try:
            yield self.unet
        finally:
            self.unet.enable_lora()


def save_curve(path: str, top: dict[str, tuple[list, list]], bottom: dict[str, tuple[list, list]],
               top_label: str = "reward (batch mean)", x_label: str = "iteration", write: bool = True) -> str:
    """Two panels of named (x, y) series, each drawn faintly with its moving average over it, as a PNG.
    write=False (the other processes of a data-parallel run) only returns the path."""
    if not write:
        return path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values):
        n = max(1, len(values) // 20)
        return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1])
                for i in range(len(values))]

    fig, axes = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for axis, series, label in ((axes[0], top, top_label), (axes[1], bottom, None)):
        for j, (name, (xs, ys)) in enumerate(series.items()):
            axis.plot(xs, ys, alpha=0.3, color=f"C{j}")
            axis.plot(xs, smooth(ys), color=f"C{j}", label=name)
        if series:
            axis.legend(loc="best")
        if label:
            axis.set_ylabel(label)
    axes[1].set_xlabel(x_label)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def resolve_precision(mixed_precision: str, device_type: str) -> str:
    """The one "auto" rule, for the nodes and the command lines alike: bf16 on CUDA where supported, else none."""
    if mixed_precision == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return mixed_precision


def make_accelerator(mixed_precision: str, device: torch.device):
    """An accelerate Accelerator for a trainer on `device`, with resolve_precision's rule."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    precision = resolve_precision(mixed_precision, device.type)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision and PartialState().num_processes == 1:
        # accelerate keeps one precision per process, but a long-lived host (ComfyUI's server) runs trainers with
        # different ones in turn: start its state afresh (a launched multi-process run keeps its own)
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def saved_name(lora_path: str, cancelled: bool) -> str:
    """Where a trainer writes its LoRA: lora_path, or <name>_partial beside it when the run was cancelled."""
    if not cancelled:
        return lora_path
    stem, ext = os.path.splitext(lora_path)
    return f"{stem}_partial{ext}"


def save_trained(pipe, trainable: Trainable, accelerator, out_dir: str, lora_path: str, adapter: str,
                 cancelled: bool, metadata: dict) -> Optional[str]:
    """Save what a trainer trained: the LoRA (as <name>_partial when cancelled), or the full UNet in
    out_dir/unet (a flow model's transformer in out_dir/transformer). Returns the LoRA's path (None for a full
    fine-tune or off the main process)."""
    if not accelerator.is_main_process:
        return None
    if trainable.full:
        backbone(pipe).save_pretrained(os.path.join(out_dir, "transformer" if is_flow(pipe) else "unet"))
        return None
    return lora.save_lora(backbone(pipe), saved_name(lora_path, cancelled), adapter, metadata=metadata)


class OtherRun(ValueError):
    """The output folder holds a run made with other settings, another model, other rewards or references."""


def module_fingerprint(*modules, adapters: Sequence[str] = ()) -> str:
    """A short hash of modules' weights (each tensor's name, shape and two sums; LoRA tensors only for the named
    `adapters`), so a run resumes only on the model and rewards it started with. About a second for SD 1.5."""
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if ".lora_" in name and not any(f".{a}." in name for a in adapters):
                continue
            t, name = tensor.detach(), name.replace(".base_layer", "")   # the same name with or without LoRAs
            h.update(f"{name}{tuple(t.shape)}{float(t.double().sum()):.6e}{float(t.double().abs().sum()):.6e}"
                     .encode())
    return h.hexdigest()[:16]


def run_fingerprint(config, *modules, adapters: Sequence[str] = (), extra: str = "") -> str:
    """What a saved run must match to be resumed: the config's fingerprint, the weights it trains on and scores
    with (module_fingerprint) and anything else it depends on (`extra`, e.g. a hash of reference images)."""
    whole = config.fingerprint() + module_fingerprint(*modules, adapters=adapters) + extra
    return hashlib.sha256(whole.encode()).hexdigest()[:16]


def check_target(lora_path: Optional[str], out_dir: str, overwrite: bool) -> None:
    """Refuse to overwrite a LoRA file that no run in out_dir made, unless told to."""
    if lora_path and os.path.exists(lora_path) and not overwrite \
            and not os.path.exists(os.path.join(out_dir, "trainer_state.pt")):
        raise FileExistsError(f"lora_path {lora_path} exists and was not made by the run in {out_dir}; pass "
                              f"overwrite=True to replace it, or choose another lora_path")


def load_state(state_path: str, fingerprint: str) -> Optional[dict]:
    """A run's saved state if there is one; OtherRun if it was made with other settings, weights or data."""
    if not os.path.exists(state_path):
        return None
    try:
        saved = torch.load(state_path, weights_only=True, map_location="cpu")
    except Exception as error:   # a file cut short by a kill, or not a trainer state at all
        raise OtherRun(f"{state_path} cannot be read ({type(error).__name__}: {error}); it is not a complete "
                       f"trainer state, so the run cannot resume: delete it to start over") from error
    if saved.get("fingerprint") != fingerprint:
        raise OtherRun(f"{os.path.dirname(state_path)} holds a run with other settings, another model, other "
                       f"rewards or other references; choose another output folder (save name) or delete "
                       f"{state_path} to start over")
    return saved


def run_iterations(config, trainable: Trainable, optimizer, accelerator, out_dir: str, fingerprint: str,
                   step: Callable[[int, torch.Generator], dict], callback: Optional[Callable[[dict], None]] = None,
                   extra: Optional[dict] = None) -> tuple[list[dict], bool]:
    """The loop every trainer shares. Resumes from out_dir/trainer_state.pt when it holds the run
    `fingerprint` names (run_fingerprint), then calls step(iteration, gen) -> that iteration's history entry for each
    iteration left, with gen seeded by (seed, iteration) so a resumed run repeats what an uninterrupted
    one would have done. Saves the state (trainable weights, optimizer, `extra` objects with state_dict, the
    history) every config.checkpoint_every iterations and at the end. callback({"i", "total", **entry}) after
    each iteration; raising Cancelled there saves the state and stops. Returns (history, cancelled)."""
    extra = extra or {}
    state_path = os.path.join(out_dir, "trainer_state.pt")
    start, history = 0, []
    saved = load_state(state_path, fingerprint)
    if saved is not None:
        trainable.load_state_dict(saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        missing = [key for key in extra if key not in saved]
        if missing:
            raise OtherRun(f"{state_path} lacks {', '.join(missing)}: it was written by an earlier version of this "
                           f"trainer; train into another folder, or delete it to start over")
        for key, item in extra.items():
            item.load_state_dict(saved[key])
        start, history = saved["iteration"], json.loads(saved["history"])

    def save_state(iteration):
        if accelerator.is_main_process:
            atomic_save({"fingerprint": fingerprint, "iteration": iteration,
                         "trainable": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                         **{key: item.state_dict() for key, item in extra.items()},
                         "history": json.dumps(history)}, state_path)

    bar = tqdm(total=config.iterations, initial=start, desc=os.path.basename(os.path.normpath(out_dir)),
               unit="it", disable=not accelerator.is_main_process, leave=False)
    try:
        for iteration in range(start, config.iterations):
            history.append(step(iteration, _rng(config, iteration)))
            entry = {k: v for k, v in history[-1].items() if k != "iteration"}
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4g}")
            if (iteration + 1) % config.checkpoint_every == 0:
                save_state(iteration + 1)
                logger.info("%s: iteration %d/%d, %s", out_dir, iteration + 1, config.iterations,
                            ", ".join(f"{k} {v}" for k, v in entry.items()))
            try:
                if callback is not None:
                    callback({"i": iteration, "total": config.iterations, **entry})
            except Cancelled:
                save_state(iteration + 1)
                return history, True
        save_state(config.iterations)
        return history, False
    finally:
        bar.close()


def check_inputs(pipe, reward: Optional[RewardModel], config: R0Config) -> None:
    """Everything about the inputs that can be refused before any work."""
    if reward is None and not config.cfg_reward_weight:
        raise ValueError("reward is None and cfg_reward_weight is 0: nothing to maximise; pass a reward "
                         "(load_reward, or a WeightedReward of several) or a cfg_reward_weight > 0")
    if any(p.is_inference() for p in backbone(pipe).parameters()):
        raise ValueError("the pipeline's weights were made in torch.inference_mode(), so they cannot be trained; "
                         "load it outside inference mode (load_pipeline and the R0 Load Pipeline node do)")
    memory.images_per_chunk(pipe, config.batch_size, config.height, config.width, cfg=config.guidance != 1,
                            training=True, what="R0 training")


def save_r0_curve(out_dir: str, history: list[dict], names: list[str], write: bool) -> str:
    steps = [h["iteration"] for h in history]
    rewards = {names[j]: (steps, [h["rewards"][j] for h in history])
               for j in range(len(history[0]["rewards"]) if history else 0)}
    return save_curve(os.path.join(out_dir, "curve.png"), rewards,
                      {"loss": (steps, [h["loss"] for h in history]),
                       "reg_weight·‖θ−θ0‖²": (steps, [h["reg"] for h in history])}, write=write)


@dataclass
class R0Generator:
    """What R0 trains through, whoever holds the model: `pipeline_generator` makes it from a diffusers pipeline,
    the pack's native-MODEL node from ComfyUI's MODEL, CLIP and VAE (the core never sees ComfyUI)."""
    trainable: TrainedWeights       # the weights moved (Trainable, LowRankWeights)
    denoiser: Callable              # σ-denoiser through them: denoiser(x, σ, cond=, [uncond=, added_cond=, …,]
                                    # guidance=) -> x̂0, with encode's keywords
    base: Optional[Callable]        # the pretrained σ-denoiser, asked inside pretrained(trainable): the implicit
                                    # CFG reward's (None: not used)
    encode: Callable                # encode(prompts, with_uncond) -> the denoiser's conditioning keywords
    decode: Callable                # latents -> images [B, 3, H, W] in [0, 1], differentiable
    sigmas: torch.Tensor            # the K-step schedule σ_0 > … > σ_K
    latent_shape: tuple             # [B, C, h, w] of the global batch
    start: Callable                 # ε -> the start latents at σ_0
    noise_scaling: Callable         # (σ, ε, x0) -> x at level σ: the sampler's re-noising
    alphas_cumprod: Optional[torch.Tensor]   # the implicit CFG reward's levels (None: a flow model's)
    save: Callable                  # save(out_dir, lora_path, cancelled, metadata) -> the LoRA's path (or None)
    train_module: Optional[torch.nn.Module] = None   # switched to train() while stepping, eval() after


def pipeline_generator(pipe, config: R0Config, accelerator, adapter: str) -> R0Generator:
    """A diffusers pipeline as an R0Generator: freeze what stays frozen, add the trained weights (a LoRA adapter
    or the whole backbone) and hand over the pipeline's denoisers, encoders, decode and schedule."""
    freeze_encoders(pipe)
    # R0 trains on the base backbone alone (add_lora leaves only the new adapter active): say so if LoRAs were on
    others = [n for n, _ in lora.active_loras(pipe) if n != adapter]
    if others:
        logger.warning("R0 trains on the base UNet: the active LoRA(s) %s take no part in training or in the "
                       "saved LoRA; apply them again beside it afterwards", ", ".join(others))
    net, flow = backbone(pipe), is_flow(pipe)
    trainable = Trainable(net, config, adapter, keep_pretrained=config.cfg_reward_weight > 0)
    unet = accelerator.prepare(net)
    sigmas = sampler_sigmas(pipe, config.steps).to(net.device)
    return R0Generator(
        trainable=trainable, denoiser=denoiser(pipe, unet),
        base=denoiser(pipe, trainable.frozen if trainable.full else unet) if config.cfg_reward_weight else None,
        encode=lambda prompts, with_uncond: conditioning(pipe, prompts, config.guidance, config.height,
                                                         config.width, with_uncond=with_uncond),
        decode=lambda latents: decode(pipe, latents), sigmas=sigmas,
        latent_shape=latent_shape(pipe, config.batch_size, config.height, config.width),
        start=lambda eps: start_latents(eps, sigmas, flow),
        noise_scaling=flow_noise_scaling if flow else vp_noise_scaling,
        alphas_cumprod=None if flow else pipe.scheduler.alphas_cumprod,
        save=lambda out_dir, lora_path, cancelled, metadata: save_trained(
            pipe, trainable, accelerator, out_dir, lora_path, adapter, cancelled, metadata),
        train_module=unet)


@dataclass
class R0Run:
    """Everything an R0 step uses, made once by `prepare_r0`."""
    generator: R0Generator
    reward: Optional[RewardModel]
    config: R0Config
    accelerator: object
    optimizer: torch.optim.Optimizer
    ema: Optional[EMAModel]
    model: Callable                       # the generator's σ-denoiser, checkpointed if asked: its steps
    cfg: Optional[ImplicitCFG]
    part: slice                           # this process's rows of the global batch
    normalize: bool


def prepare_r0(generator: R0Generator, reward: Optional[RewardModel], config: R0Config, accelerator) -> R0Run:
    """The optimizer and EMA of the trained weights, and the settings every step reads."""
    params = generator.trainable.params
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, 0.999), weight_decay=0.0)
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay else None
    optimizer = accelerator.prepare(optimizer)
    normalize = config.normalize_gradients
    if normalize is None:
        normalize = getattr(reward, "normalize_gradients", True)
    model = checkpointed(generator.denoiser) if config.gradient_checkpointing else generator.denoiser
    return R0Run(generator, reward, config, accelerator, optimizer, ema, model, config.implicit_cfg,
                 share(accelerator, config.batch_size), normalize)


def r0_step(run: R0Run, iteration: int, gen: torch.Generator) -> dict:
    """One R0 iteration (the module docstring's steps 1-5); returns its history entry."""
    config, g = run.config, run.generator
    picks = torch.randint(len(config.prompts), (config.batch_size,), generator=gen).tolist()
    prompts = [config.prompts[i] for i in picks][run.part]
    with torch.no_grad():
        c = g.encode(prompts, run.cfg is not None)
    if g.train_module is not None:
        g.train_module.train()
    with run.accelerator.autocast():
        latents = generator_latents(run.model, config, c, g.latent_shape, g.sigmas, gen, run.part,
                                    start=g.start, noise_scaling=g.noise_scaling)
        images = (checkpointed(g.decode) if config.gradient_checkpointing else g.decode)(latents)
        direction = None
        if run.cfg is not None:
            with pretrained(g.trainable):
                direction = run.cfg.direction(g.base, latents, c, g.alphas_cumprod, gen, run.part,
                                              config.batch_size)
        loss, rewards = reward_loss(run.reward, images, prompts, run.normalize, run.cfg, latents, direction)
        reg = config.reg_weight * g.trainable.delta_norm2()
    optimizer_step(run.accelerator, g.trainable, run.optimizer, loss + reg, config.grad_clip)
    if run.ema is not None:
        run.ema.step(g.trainable.params)  # diffusers' EMA: decay min(ema_decay, (1 + n) / (10 + n)) at update n
    return {"iteration": iteration + 1, "loss": float(loss.detach()), "reg": float(reg.detach()),
            "rewards": [float(r) for r in rewards]}


def fit_r0(generator: R0Generator, reward: Optional[RewardModel], config: R0Config, accelerator, out_dir: str,
           lora_path: str, fingerprint: str, callback: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """The R0 loop on any R0Generator: resume from out_dir if it holds the run `fingerprint` names
    (run_fingerprint), run the iterations left, then save the curve and the LoRA (generator.save)."""
    os.makedirs(out_dir, exist_ok=True)
    run = prepare_r0(generator, reward, config, accelerator)
    history, cancelled = run_iterations(config, generator.trainable, run.optimizer, accelerator, out_dir,
                                        fingerprint, lambda iteration, gen: r0_step(run, iteration, gen), callback,
                                        {"ema": run.ema} if run.ema is not None else {})
    if generator.train_module is not None:
        generator.train_module.eval()
    if run.ema is not None:
        run.ema.copy_to(generator.trainable.params)  # what is saved and left in the model: the averaged weights
    curve = save_r0_curve(out_dir, history, reward_names(reward, run.cfg), accelerator.is_main_process)
    metadata = {"r0_config": json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "prompts"},
                                        default=str),
                "r0_iterations": str(len(history))}
    return TrainResult(generator.save(out_dir, lora_path, cancelled, metadata), curve, history, cancelled)


def train_r0(pipe, reward: Optional[RewardModel], config: R0Config, out_dir: str, lora_path: Optional[str] = None,
             callback: Optional[Callable[[dict], None]] = None, accelerator=None, adapter: str = "r0",
             overwrite: bool = False) -> TrainResult:
    """Train, checkpointing to out_dir every `checkpoint_every` iterations and resuming from it if present.
    The LoRA is trained as adapter `adapter` of the pipeline's backbone (its UNet, or an SD3 pipeline's
    transformer; left active) and saved to lora_path.
    callback({"i", "total", "loss", "rewards"}) after each iteration; raising Cancelled there stops the run,
    saves its state (so calling again resumes it) and a partial LoRA beside lora_path.
    A run resumes only with the same settings, base UNet and rewards (OtherRun otherwise), and never replaces a
    LoRA file it did not make unless overwrite=True (FileExistsError)."""
    check_inputs(pipe, reward, config)
    accelerator = accelerator or make_accelerator(config.mixed_precision, backbone(pipe).device)
    lora_path = lora_path or os.path.join(out_dir, "r0_lora.safetensors")
    check_target(lora_path, out_dir, overwrite)
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        fingerprint = run_fingerprint(config, backbone(pipe), reward)   # before any adapter is added
        generator = pipeline_generator(pipe, config, accelerator, adapter)
        return fit_r0(generator, reward, config, accelerator, out_dir, lora_path, fingerprint, callback)


# ----------------------------------------------------------------------------------------------- command line

def parse_reward(spec: str):
    """'family:path[:support][@weight]', e.g. 'clip:tiny' or 'hpsv2:/m/HPS_v2.1_compressed.pt@2'."""
    from .rewards import load_reward

    spec, _, weight = spec.partition("@")
    family, _, rest = spec.partition(":")
    path, _, support = rest.partition(":")
    if not family or not path:
        raise ValueError(f"--reward {spec!r}; expected family:path[:support][@weight], e.g. clip:tiny")
    return load_reward(family, path, support or None), float(weight or 1.0)


def main(argv=None):
    from accelerate import Accelerator

    from .loading import load_pipeline

    parser = cli.make_parser("r0_core.train", __doc__)
    cli.add_model_arguments(parser)
    parser.add_argument("--reward", action="append", default=[],
                        help="family:path[:support][@weight]; repeat to combine rewards (normalised gradients)")
    parser.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    parser.add_argument("--out", required=True, help="folder for checkpoints, the curve and the LoRA")
    parser.add_argument("--no-normalize", action="store_true", help="plain weighted reward sum")
    parser.add_argument("--overwrite", action="store_true", help="replace a LoRA file this run did not make")
    names = cli.add_config_arguments(parser, R0Config, R0Config(prompts=["x"]),
                                     skip=("prompts", "normalize_gradients"))
    args = parser.parse_args(argv)
    cli.setup_logging()   # a line per checkpoint, beside the bar
    if not args.reward and not args.cfg_reward_weight:
        parser.error("give at least one --reward, or --cfg-reward-weight > 0 (the implicit CFG reward)")

    config = R0Config(prompts=read_prompts(args.prompts), normalize_gradients=not args.no_normalize,
                      **cli.config_values(args, names))
    # under `accelerate launch` each process gets its own device; "auto" follows the nodes' rule
    accelerator = Accelerator(mixed_precision=resolve_precision(config.mixed_precision,
                                                                "cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(args.model, device=accelerator.device, **cli.model_kwargs(args))
    rewards = [parse_reward(spec) for spec in args.reward]
    reward = WeightedReward([r for r, _ in rewards], [w for _, w in rewards]) if rewards else None
    for scorer in reward.scorers if reward is not None else []:
        scorer.to(accelerator.device)
    result = train_r0(pipe, reward, config, args.out, accelerator=accelerator, overwrite=args.overwrite)
    if accelerator.is_main_process:
        print(json.dumps({"lora": result.lora_path, "curve": result.curve_path,
                          "final": result.history[-1] if result.history else None}))


if __name__ == "__main__":
    main()
