"""RPO: subject fine-tuning from a few reference images with a diffusion loss, a preference loss labelled by the
λ-Harmonic reward, and checkpoint selection by λ_val-Harmonic validation on few-step samples.

Before training:
  1. negatives: the frozen model draws `negatives_per_prompt` images for each training prompt with the K-step
     sampler (the prompts carry the rare token, which the frozen model does not know yet);
  2. rewards with λ_train-Harmonic: r_ref[i, p] for reference i scored against prompt p, r_gen[j] for negative j
     against its own prompt.
One iteration, for a batch of (reference, negative) pairs:
  3. label y ~ Bernoulli(σ((r_ref − r_gen) / τ)), drawn anew for every use of a pair, with r_ref the reference
     scored against the negative's own prompt (token included) and τ = 1 as the official code (no temperature):
     1 prefers the reference, 0 the negative;
  4. one noise and one timestep per pair; ℓ = per-image diffusion MSE, ℓ_θ from the trained model and ℓ_ref
     from the frozen one; Δ = (ℓ_ref − ℓ_θ)(reference) − (ℓ_ref − ℓ_θ)(negative);
  5. L = L_sim + L_pref with L_sim = mean ℓ_θ(reference) (+ prior_weight · ℓ_θ(class image) for DreamBooth with
     prior preservation) and L_pref = −mean[y log σ(βΔ) + (1 − y) log σ(−βΔ)]; one AdamW step;
  6. every `validate_every` iterations: sample the validation prompts (default: the training prompts) with the
     K-step sampler, score with λ_val-Harmonic against the references (rare token removed for the text term) and
     keep the best weights. Each validation keeps its per-image cosines, so `select(validations, lam)` can pick
     the checkpoint of any other λ_val afterwards (with `keep_validated`, whose weights are saved).

Deviations from the paper's SD script, on purpose: β is applied (it is parsed and ignored there; its SDXL script
applies it), noise and timestep are shared within a pair (as its SDXL script and Diffusion-DPO do), a label
temperature τ is offered (default 1: none), validation uses the few-step sampler (50 steps there), and a
reference's reward is scored per pair rather than once per image (its SD script reuses one generated image's
reward for every label on one GPU). DreamBooth is the same trainer with `preference=False`.

`python -m rpo_core.train --help` (or `accelerate launch -m rpo_core.train ...`) runs it from the shell;
`train_rpo(pipe, encoder, references, config, out_dir)` from Python.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from safetensors.torch import load_file, save_file

from r0_core import checks, cli, files, lora, memory
from r0_core.family import (backbone, conditional, conditioning, diffusion_loss, encode, join, take,
                            training_timesteps)
from r0_core.generate import generate
from r0_core.rewards import LambdaHarmonic, RewardModel
from r0_core.rewards.composite import lambda_harmonic
from r0_core.train import (Trainable, TrainedWeights, check_target, freeze_encoders, make_accelerator,
                           optimizer_step, run_fingerprint, run_iterations, save_curve, save_trained, share)

from .dreambench import strip_token

# the paper's eight training prompts for objects, written with {0} = rare token and {1} = class noun
PAPER_PROMPTS = (
    "a {0} {1} in the style of Van Gogh", "a {0} {1} on the Moon", "a green {0} {1}",
    "a {0} {1} with the Great Wall of China in the background", "a {0} {1} on a wooden roof",
    "a {0} {1} with the Statue of Liberty in the background", "a {0} {1} with a volcano in the background",
    "a {0} {1} on a subway platform",
)


def default_prompts(token: str, class_name: str, tiny: bool) -> list[str]:
    """The paper's eight training prompts; for the built-in tiny model, whose tokenizer spells only its world's
    words, the tiny subjects' eight ("a vum circle left of a yellow triangle", ...)."""
    if tiny:
        from r0_core.tiny.subjects import training_prompts_for
        return training_prompts_for(token, class_name)
    return [p.format(token, class_name) for p in PAPER_PROMPTS]


@dataclass
class RPOConfig:
    token: str                            # the rare token, [V]
    class_name: str                       # the class noun: "dog", "circle"
    prompts: Optional[list[str]] = None   # training prompts containing the token; None: PAPER_PROMPTS
    reference_prompt: Optional[str] = None  # None: "a <token> <class>"
    iterations: int = 400                 # optimizer steps
    batch_size: int = 4                   # (reference, negative) pairs per step
    lr: float = 1e-4                      # AdamW learning rate of the trained weights
    lora_rank: int = 8                    # 0 trains the full UNet
    lora_targets: str = "all"             # "attention" or "all" (see r0_core.lora)
    preference: bool = True               # False: DreamBooth (L_sim only)
    beta: float = 0.5                     # scale of Δ in the logistic loss (README: chosen by benchmarks/rpo_beta.py)
    tau: float = 1.0                      # label temperature on the reward gap (1: the official rule)
    lambda_train: float = 0.0             # λ of the labels' λ-Harmonic reward (the paper: 0, text only)
    lambda_val: float = 0.5               # λ of the validation reward
    prior_weight: float = 0.0             # DreamBooth prior preservation on class images from the frozen model
    negatives_per_prompt: int = 4         # negatives sampled per training prompt, reused across steps
    validation_prompts: Optional[list[str]] = None  # prompts of the λ_val validation; None: the training ones
    validate_every: int = 40              # iterations between λ_val validations
    keep_validated: bool = False          # also save each validation's weights (validations/), for select()
    select_best: bool = True              # end with the best validated weights (False: the last ones)
    validation_images: int = 4            # per training prompt
    sampler_steps: int = 4                # K, for negatives and validation
    guidance: float = 2.0                 # CFG of the sampler for negatives and validation
    seed: int = 0                         # the same seed gives the same weights
    checkpoint_every: int = 50            # iterations between resumable checkpoints
    mixed_precision: str = "auto"         # "no", "fp16", "bf16"; auto: bf16 on CUDA, else no
    gradient_checkpointing: bool = True   # recompute UNet activations in backward: SD-size UNets fit on less memory

    def __post_init__(self):
        for name in ("token", "class_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value.split()) != 1 and name == "token":
                raise ValueError(f"{name}={value!r}; expected a non-empty word (token: one word, e.g. 'sks')")
        if self.prompts is None:
            self.prompts = default_prompts(self.token, self.class_name, tiny=False)
        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError("prompts: expected one or more non-empty training prompts")
        self.prompts = list(self.prompts)
        self.validation_prompts = list(self.prompts if self.validation_prompts is None else self.validation_prompts)
        if not self.validation_prompts or any(not isinstance(p, str) or not p.strip()
                                              for p in self.validation_prompts):
            raise ValueError("validation_prompts: expected one or more non-empty prompts (or None: the training "
                             "prompts)")
        missing = [p for p in self.prompts + self.validation_prompts if self.token not in p.split()]
        if missing:
            raise ValueError(f"prompts {missing} lack the token {self.token!r}; write it where the subject "
                             f"goes, e.g. 'a {self.token} {self.class_name} on the beach'")
        if self.reference_prompt is None:
            self.reference_prompt = f"a {self.token} {self.class_name}"
        for name in ("lambda_train", "lambda_val"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a value in [0, 1]")
        checks.number("tau", self.tau, 0, low_open=True)
        checks.number("beta", self.beta, 0)
        checks.number("lr", self.lr, 0, low_open=True)
        checks.number("prior_weight", self.prior_weight, 0)
        checks.number("guidance", self.guidance, 1)
        checks.lora_targets(self.lora_targets)
        checks.seed(self.seed)
        checks.whole("checkpoint_every", self.checkpoint_every, 1)
        checks.whole("lora_rank", self.lora_rank, 0)   # 0 trains the full UNet
        if min(self.iterations, self.batch_size, self.negatives_per_prompt, self.validate_every,
               self.validation_images, self.sampler_steps) < 1:
            raise ValueError("iterations, batch_size, negatives_per_prompt, validate_every, validation_images and "
                             "sampler_steps must be at least 1")

    def fingerprint(self) -> str:
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("iterations", "checkpoint_every",
                                                                                  "gradient_checkpointing",
                                                                                  "keep_validated")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def strip(self, prompt: str) -> str:
        """The prompt without the rare token, for the validation reward's text term (as DreamBench's CLIP-T)."""
        return strip_token(prompt, self.token)


@dataclass
class RPOResult:
    lora_path: Optional[str]      # the best LoRA (partial if cancelled); None in full fine-tune mode
    curve_path: str
    best_iteration: int           # 0: no validation ran
    best_score: float
    history: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    cancelled: bool = False


class Selection:
    """RPO's checkpoint selection: every λ_val validation and the best weights so far, saved with the run's state
    (run_iterations' `extra`) so a resumed run selects as an unbroken one would."""

    def __init__(self, trainable, keep_in: Optional[str] = None):
        self.trainable, self.keep_in = trainable, keep_in
        self.validations: list[dict] = []
        self.best = {"iteration": 0, "score": float("-inf"), "weights": trainable.state_dict()}

    def update(self, iteration: int, result: dict) -> None:
        self.validations.append({"iteration": iteration, **result})
        if result["score"] > self.best["score"]:
            self.best = {"iteration": iteration, "score": result["score"], "weights": self.trainable.state_dict()}
        if self.keep_in is not None:
            path = validated_path(self.keep_in, iteration)
            files.atomic_write(path, lambda tmp: save_file(self.trainable.state_dict(), tmp))

    def state_dict(self) -> dict:
        return {"validations": json.dumps(self.validations), "best": self.best["weights"],
                "best_iteration": self.best["iteration"], "best_score": self.best["score"]}

    def load_state_dict(self, state: dict) -> None:
        self.validations = json.loads(state["validations"])
        self.best = {"iteration": state["best_iteration"], "score": state["best_score"], "weights": state["best"]}


def validated_path(out_dir: str, iteration: int) -> str:
    return os.path.join(out_dir, "validations", f"{iteration:07d}.safetensors")


def validation_score(validation: dict, lam: float) -> float:
    """A stored validation's mean λ-Harmonic reward under any λ, from its per-image cosines."""
    return float(lambda_harmonic(torch.tensor(validation["image_cos"]), torch.tensor(validation["text_cos"]),
                                 lam).mean())


def select(validations: list[dict], lam: float) -> dict:
    """The validation λ_val = lam keeps: the highest mean λ-Harmonic reward, the earliest of equals."""
    if not validations:
        raise ValueError("no validations to select from: the run validated nothing (validate_every > iterations?)")
    return max(validations, key=lambda v: (validation_score(v, lam), -v["iteration"]))


def load_validated(unet, out_dir: str, iteration: int, adapter: Optional[str] = "rpo") -> None:
    """Put the weights of validation `iteration` of the run in out_dir (saved with keep_validated) into `unet`:
    into its LoRA `adapter`, or into the whole UNet when adapter is None (a full fine-tune)."""
    path = validated_path(out_dir, iteration)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: validation weights are saved only with keep_validated=True")
    params = lora.lora_parameters(unet, adapter) if adapter is not None else list(unet.parameters())
    state = load_file(path)
    with torch.no_grad():
        for i, p in enumerate(params):   # Trainable.state_dict's order
            p.copy_(state[str(i)])


# ----------------------------------------------------------------------------------------------- the pieces

def preference_labels(r_ref: torch.Tensor, r_gen: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """y ~ Bernoulli(σ((r_ref − r_gen) / τ)), 1.0 where the reference is preferred."""
    return torch.bernoulli(torch.sigmoid((r_ref - r_gen) / tau), generator=gen)


def pair_noise(like: torch.Tensor, timesteps: Callable, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise and one timestep per pair (`like`: one row per pair; timesteps(n, gen) draws training
    timesteps), so that the two halves of a pair differ only in image and prompt and Δ measures the preference,
    not the luck of the draw."""
    noise = torch.randn(like.shape, generator=gen).to(like)
    t = timesteps(len(like), gen).to(like.device)
    return noise, t


def pair_losses(loss: Callable, net, ref_latents, gen_latents, c: dict, noise, t) -> torch.Tensor:
    """ℓ = loss(net, latents, c, noise, t) (RPOModel.loss) for the references then the negatives ([2B]), each pair
    under the same noise and timestep; `c` holds the 2B rows of conditioning, the references' then the
    negatives'."""
    return loss(net, torch.cat([ref_latents, gen_latents]), c, torch.cat([noise, noise]), torch.cat([t, t]))


def preference_loss(delta: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """−mean[y log σ(βΔ) + (1 − y) log σ(−βΔ)]."""
    return -(labels * F.logsigmoid(beta * delta) + (1 - labels) * F.logsigmoid(-beta * delta)).mean()


def sample(model: "RPOModel", prompts: list[str], config: RPOConfig, seed: int,
           per_prompt: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """per_prompt images for each prompt from the K-step sampler: (images [N,3,H,W] 0..1, latents as the loss
    takes them, prompts)."""
    prompts = [p for p in prompts for _ in range(per_prompt)]
    with torch.no_grad():
        images, latents = model.sample(prompts, [seed + i for i in range(len(prompts))], config.sampler_steps,
                                       config.guidance)
    return images.float(), latents, prompts


def validate(model: "RPOModel", config: RPOConfig, scorer: LambdaHarmonic, seed: int) -> dict:
    """Mean λ_val-Harmonic reward of fresh K-step samples of the validation prompts (token removed for text),
    with each image's two cosines so that any other λ can be scored later (validation_score)."""
    images, _, prompts = sample(model, config.validation_prompts, config, seed, config.validation_images)
    with torch.no_grad():
        image_cos, text_cos = scorer.cosines(images.to(scorer_device(scorer)), [config.strip(p) for p in prompts])
    return {"score": float(lambda_harmonic(image_cos, text_cos, scorer.lam).mean()),
            "image_cos": image_cos.tolist(), "text_cos": text_cos.tolist()}


def scorer_device(scorer: RewardModel) -> torch.device:
    return next(scorer.parameters()).device


@contextmanager
def frozen_model(pipe, others: list, adapter: str, frozen_unet):
    """The model as it was before training: the training adapter switched off (LoRA) or the frozen copy (full)."""
    if frozen_unet is not None:
        yield frozen_unet
        return
    lora.use_loras(pipe, others)
    try:
        yield backbone(pipe)
    finally:
        lora.use_loras(pipe, others + [(adapter, 1.0)])


# ----------------------------------------------------------------------------------------------- the trainer

def check_references(references: torch.Tensor, size: Optional[int] = None) -> None:
    """References are [N, 3, H, W] in 0..1, N >= 1, size x size pixels when the model trains at one size."""
    if references.ndim != 4 or references.shape[1] != 3 or len(references) < 1:
        raise ValueError(f"references have shape {tuple(references.shape)}; expected [N, 3, H, W] in 0..1 with "
                         f"N >= 1 (rpo_core.references.load_references makes that from image files)")
    checks.unit_range("references", references)
    if size is not None and tuple(references.shape[-2:]) != (size, size):
        raise ValueError(f"references are {references.shape[-2]}x{references.shape[-1]} pixels; this model trains at "
                         f"{size}x{size}: fit them with rpo_core.references.load_references(..., size={size}) "
                         f"(or fit(images, {size}))")


def check_inputs(pipe, references: torch.Tensor, config: RPOConfig) -> None:
    """Everything about the inputs that can be refused before any work."""
    check_references(references)
    for what, prompts in (("prompts", config.prompts), ("validation_prompts", config.validation_prompts),
                          ("reference_prompt", [config.reference_prompt])):
        checks.prompts_fit(pipe.tokenizer, prompts, what)
    # a step denoises each pair's reference and negative (no decoder in the loss, but validation decodes)
    memory.images_per_chunk(pipe, 2 * config.batch_size, None, None, cfg=False, training=True, what="RPO training")
    check_references(references, backbone(pipe).config.sample_size * pipe.vae_scale_factor)
    if any(p.is_inference() for p in backbone(pipe).parameters()):
        raise ValueError("the pipeline's weights were made in torch.inference_mode(), so they cannot be trained; "
                         "load it outside inference mode (load_pipeline and the R0 Load Pipeline node do)")


@dataclass
class PreferenceData:
    """What every step draws its pairs from, made by the frozen model before any weight moves (RPO's steps 1-2):
    the references' and negatives' latents, each negative's prompt, the λ-Harmonic rewards that label a pair, the
    text conditioning, and the class images of prior preservation (None without it)."""
    ref_latents: torch.Tensor
    neg_latents: torch.Tensor
    neg_prompt: torch.Tensor       # index into config.prompts, per negative
    r_ref: torch.Tensor            # [N_ref, N_prompts]: every reference against every prompt
    r_gen: torch.Tensor            # [N_neg]
    ref_cond: dict                 # conditionings (r0_core.generate.conditional): the reference prompt's,
    prompt_cond: dict              # each training prompt's,
    class_cond: dict               # the class prompt's
    prior_latents: Optional[torch.Tensor]


def preference_data(model: "RPOModel", config: RPOConfig, label_reward: LambdaHarmonic,
                    references: torch.Tensor) -> PreferenceData:
    on = scorer_device(label_reward.encoder)
    neg_images, neg_latents, neg_prompts = sample(model, config.prompts, config, config.seed * 100_003,
                                                  config.negatives_per_prompt)
    with torch.no_grad():
        n = len(references)
        r_ref = label_reward(references.to(on).repeat(len(config.prompts), 1, 1, 1),
                             [p for p in config.prompts for _ in range(n)]).cpu().view(-1, n).T
        prior_latents = None
        if config.prior_weight > 0:
            _, prior_latents, _ = sample(model, [f"a {config.class_name}"], config, config.seed * 100_003 + 7919,
                                         config.negatives_per_prompt * len(config.prompts))
        embed = model.conditioning
        return PreferenceData(model.encode(references), neg_latents,
                              torch.tensor([config.prompts.index(p) for p in neg_prompts]), r_ref,
                              label_reward(neg_images.to(on), neg_prompts).cpu(), embed([config.reference_prompt]),
                              embed(config.prompts), embed([f"a {config.class_name}"]), prior_latents)


def draw_pairs(data: PreferenceData, config: RPOConfig, timesteps: Callable, gen: torch.Generator,
               part: slice) -> dict:
    """A step's pairs (reference, negative), their labels, shared noise and timesteps, and prior-preservation
    images: drawn for the whole batch on every process, each keeping its share `part`."""
    total = config.batch_size
    i_ref = torch.randint(len(data.ref_latents), (total,), generator=gen)
    i_neg = torch.randint(len(data.neg_latents), (total,), generator=gen)
    labels = preference_labels(data.r_ref[i_ref, data.neg_prompt[i_neg]], data.r_gen[i_neg], config.tau, gen)
    noise, t = pair_noise(data.ref_latents[i_ref], timesteps, gen)
    prior = None
    if data.prior_latents is not None:
        prior = data.prior_latents[torch.randint(len(data.prior_latents), (total,), generator=gen)[part]]
    i_ref, i_neg = i_ref[part], i_neg[part]
    cond = join(take(data.ref_cond, len(i_ref)), take(data.prompt_cond, data.neg_prompt[i_neg]))
    return {"refs": data.ref_latents[i_ref], "gens": data.neg_latents[i_neg].to(data.ref_latents),
            "labels": labels[part], "noise": noise[part], "t": t[part], "cond": cond, "prior": prior}


def rpo_loss(model: "RPOModel", net, pairs: dict, data: PreferenceData, config: RPOConfig) -> dict:
    """L_sim (the references' diffusion loss: DreamBooth's), + L_pref (the labelled preference between each
    reference and its negative, against the frozen model: `model.frozen()` enters it), + the prior-preservation
    loss. `net`: the trained backbone as model.loss takes it."""
    refs, gens, noise, t = pairs["refs"], pairs["gens"], pairs["noise"], pairs["t"]
    b = len(refs)
    loss_theta = pair_losses(model.loss, net, refs, gens, pairs["cond"], noise, t)
    l_sim = loss_theta[:b].mean()
    l_pref, beta_delta, l_prior = torch.zeros(()), torch.zeros(()), torch.zeros(())
    if config.preference:
        with torch.no_grad(), model.frozen() as ref_net:
            loss_ref = pair_losses(model.loss, ref_net, refs, gens, pairs["cond"], noise, t)
        delta = (loss_ref[:b] - loss_theta[:b]) - (loss_ref[b:] - loss_theta[b:])
        l_pref = preference_loss(delta, pairs["labels"].to(delta), config.beta)
        beta_delta = (config.beta * delta).detach().abs().mean()
    if pairs["prior"] is not None:
        l_prior = config.prior_weight * model.loss(net, pairs["prior"].to(refs), take(data.class_cond, b), noise,
                                                   t).mean()
    return {"loss": l_sim + l_pref + l_prior, "l_sim": l_sim, "l_pref": l_pref, "beta_delta": beta_delta}


def save_rpo_curve(out_dir: str, history: list[dict], validations: list[dict], config: RPOConfig, write: bool) -> str:
    steps = [h["iteration"] for h in history]
    return save_curve(os.path.join(out_dir, "curve.png"),
                      {f"λ_val={config.lambda_val} validation": ([v["iteration"] for v in validations],
                                                                 [v["score"] for v in validations])},
                      {"L_sim": (steps, [h["l_sim"] for h in history]),
                       "L_pref": (steps, [h["l_pref"] for h in history]),
                       "mean |βΔ|": (steps, [h.get("beta_delta", 0.0) for h in history])},
                      top_label="validation reward", write=write)


@dataclass
class RPOModel:
    """What RPO trains through, whoever holds the model: `pipeline_model` makes it from a diffusers pipeline, the
    pack's native-MODEL node from ComfyUI's MODEL, CLIP and VAE (the core never sees ComfyUI)."""
    trainable: TrainedWeights       # the weights moved (Trainable, LowRankWeights)
    net: object                     # the trained backbone as `loss` takes it (None: the host applies the weights)
    loss: Callable                  # loss(net, latents, c, noise, t) -> per-image diffusion MSE [B]
    frozen: Callable                # frozen() -> a context manager giving the pretrained `net`
    timesteps: Callable             # timesteps(n, gen) -> n training timesteps, as the family was trained
    sample: Callable                # sample(prompts, seeds, steps, guidance) -> (images [N,3,H,W] 0..1, latents)
    encode: Callable                # images [N,3,H,W] 0..1 -> latents as `loss` takes them
    conditioning: Callable          # texts -> their conditional conditioning (family.conditional's keys)
    save: Callable                  # save(out_dir, lora_path, cancelled, metadata) -> the LoRA's path (or None)
    train_module: Optional[torch.nn.Module] = None   # switched to train() while stepping, eval() to validate
    finish: Optional[Callable] = None                # after the loop (the pipeline's: checkpointing off)


def pipeline_model(pipe, config: RPOConfig, accelerator, adapter: str) -> RPOModel:
    """A diffusers pipeline as an RPOModel: the trained weights (a LoRA adapter on top of the LoRAs already
    active, or the whole backbone beside a frozen copy), and the pipeline's loss, sampler, VAE and text encoders."""
    freeze_encoders(pipe)
    net = backbone(pipe)
    others = [(n, w) for n, w in lora.active_loras(pipe) if n != adapter]
    frozen_unet = copy.deepcopy(net).requires_grad_(False).eval() if config.lora_rank == 0 else None
    trainable = Trainable(net, config, adapter)
    if not trainable.full:
        lora.use_loras(pipe, others + [(adapter, 1.0)])
    if config.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    unet = accelerator.prepare(net)

    def sample_images(prompts, seeds, steps, guidance):
        images, latents = generate(pipe, prompts, steps=steps, guidance=guidance, seeds=seeds)
        return images, latents * pipe.vae.config.scaling_factor

    return RPOModel(
        trainable=trainable, net=unet, loss=lambda model, *args: diffusion_loss(pipe, model, *args),
        frozen=lambda: frozen_model(pipe, others, adapter, frozen_unet),
        timesteps=lambda n, gen: training_timesteps(pipe.scheduler, n, gen), sample=sample_images,
        encode=lambda images: encode(pipe, images),
        conditioning=lambda texts: conditional(conditioning(pipe, texts, 1.0)),
        save=lambda out_dir, lora_path, cancelled, metadata: save_trained(
            pipe, trainable, accelerator, out_dir, lora_path, adapter, cancelled, metadata),
        train_module=unet,
        finish=net.disable_gradient_checkpointing if config.gradient_checkpointing else None)


@dataclass
class RPORun:
    """Everything an RPO step uses, made once by `prepare_rpo`."""
    model: RPOModel
    config: RPOConfig
    accelerator: object
    optimizer: torch.optim.Optimizer
    data: PreferenceData
    val_reward: LambdaHarmonic
    selection: Selection
    part: slice                           # this process's rows of the global batch


def reference_hash(references: torch.Tensor) -> str:
    """What names the reference pictures in a run's fingerprint."""
    return hashlib.sha256(references.float().cpu().numpy().tobytes()).hexdigest()


def prepare_rpo(model: RPOModel, encoder: RewardModel, references: torch.Tensor, config: RPOConfig, accelerator,
                out_dir: str) -> RPORun:
    """The preference data (made by the frozen model, before any weight moves: the trained weights start as the
    pretrained ones), the optimizer and the validation selection."""
    on = scorer_device(encoder)
    data = preference_data(model, config, LambdaHarmonic(encoder, config.lambda_train, references.to(on)), references)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.trainable.params, lr=config.lr, weight_decay=1e-2))
    keep_in = out_dir if config.keep_validated and accelerator.is_main_process else None   # one writer
    return RPORun(model, config, accelerator, optimizer, data,
                  LambdaHarmonic(encoder, config.lambda_val, references.to(on)), Selection(model.trainable, keep_in),
                  share(accelerator, config.batch_size))


def rpo_step(run: RPORun, iteration: int, gen: torch.Generator) -> dict:
    """One RPO iteration: draw labelled pairs, step on L_sim + L_pref (+ prior), validate on schedule."""
    config, model = run.config, run.model
    pairs = draw_pairs(run.data, config, model.timesteps, gen, run.part)
    if model.train_module is not None:
        model.train_module.train()
    with run.accelerator.autocast():
        losses = rpo_loss(model, model.net, pairs, run.data, config)
    optimizer_step(run.accelerator, model.trainable, run.optimizer, losses["loss"], 1.0)
    if (iteration + 1) % config.validate_every == 0 or iteration + 1 == config.iterations:
        if model.train_module is not None:
            model.train_module.eval()
        run.selection.update(iteration + 1, validate(model, config, run.val_reward, config.seed * 100_003 + 50_000))
    return {"iteration": iteration + 1, **{k: float(v.detach()) for k, v in losses.items()},
            "labels": float(pairs["labels"].mean())}


def fit_rpo(model: RPOModel, encoder: RewardModel, references: torch.Tensor, config: RPOConfig, accelerator,
            out_dir: str, lora_path: str, fingerprint: str,
            callback: Optional[Callable[[dict], None]] = None) -> RPOResult:
    """The RPO loop on any RPOModel: resume from out_dir if it holds the run `fingerprint` names, run the
    iterations left with validation and selection, then keep the best validated weights and save them."""
    os.makedirs(out_dir, exist_ok=True)
    run = prepare_rpo(model, encoder, references, config, accelerator, out_dir)
    selection = run.selection

    def report(info: dict) -> None:
        if callback is not None:
            callback({**info, "validation": selection.validations[-1] if selection.validations else None})

    history, cancelled = run_iterations(config, model.trainable, run.optimizer, accelerator, out_dir, fingerprint,
                                        lambda iteration, gen: rpo_step(run, iteration, gen), report,
                                        extra={"selection": selection})
    best = selection.best
    if model.train_module is not None:
        model.train_module.eval()
    if model.finish is not None:
        model.finish()
    if config.select_best and best["iteration"] > 0:
        model.trainable.load_state_dict(best["weights"])  # keep the best validated weights, as RPO's selection does
    curve = save_rpo_curve(out_dir, history, selection.validations, config, accelerator.is_main_process)
    metadata = {"rpo_config": json.dumps(dataclasses.asdict(config), default=str),
                "rpo_iteration": str(best["iteration"] if config.select_best else len(history))}
    return RPOResult(model.save(out_dir, lora_path, cancelled, metadata), curve, best["iteration"], best["score"],
                     history, selection.validations, cancelled)


def train_rpo(pipe, encoder: RewardModel, references: torch.Tensor, config: RPOConfig, out_dir: str,
              lora_path: Optional[str] = None, callback: Optional[Callable[[dict], None]] = None,
              accelerator=None, adapter: str = "rpo", overwrite: bool = False) -> RPOResult:
    """Fine-tune the pipeline's backbone (its UNet, or an SD3 pipeline's transformer) on the subject in
    `references` ([N, 3, H, W] in 0..1 at the model's size), with the λ-Harmonic reward on `encoder` (any scorer
    with image_embeds and text_embeds: CLIP, ALIGN, ...).
    Checkpoints to out_dir and resumes from it; the best validated weights end up in the backbone (adapter
    `adapter`, left active) and in lora_path. callback({"i", "total", "loss", ...}) after each iteration;
    raising Cancelled there saves the state and the best LoRA so far (as *_partial). A run resumes only with the
    same settings, UNet (with the LoRAs it trains on), encoder and references (OtherRun otherwise), and never
    replaces a LoRA file it did not make unless overwrite=True (FileExistsError)."""
    check_inputs(pipe, references, config)
    accelerator = accelerator or make_accelerator(config.mixed_precision, backbone(pipe).device)
    lora_path = lora_path or os.path.join(out_dir, "rpo_lora.safetensors")
    check_target(lora_path, out_dir, overwrite)
    with torch.inference_mode(False), torch.enable_grad():
        net = backbone(pipe)
        references = references.float().to(net.device)
        others = [(n, w) for n, w in lora.active_loras(pipe) if n != adapter]
        fingerprint = run_fingerprint(config, net, encoder, adapters=[n for n, _ in others],
                                      extra=f"{others}{reference_hash(references)}")
        model = pipeline_model(pipe, config, accelerator, adapter)
        return fit_rpo(model, encoder, references, config, accelerator, out_dir, lora_path, fingerprint, callback)


# ----------------------------------------------------------------------------------------------- command line

def main(argv=None):
    from accelerate import Accelerator

    from r0_core.loading import TINY_NAMES, load_pipeline
    from r0_core.train import parse_reward, read_prompts, resolve_precision

    from .references import load_references

    parser = cli.make_parser("rpo_core.train", __doc__)
    cli.add_model_arguments(parser)
    parser.add_argument("--references", required=True, help="a folder of the subject's images")
    parser.add_argument("--encoder", default="clip:tiny",
                        help="the λ-Harmonic encoder as family:path[:support], e.g. align:/models/align-base")
    parser.add_argument("--prompts-file", help="training prompts, one per line (default: the paper's eight; with "
                                               "--model tiny the tiny subjects' eight, which its tokenizer can read)")
    parser.add_argument("--validation-prompts-file",
                        help="prompts of the λ_val validation, one per line (default: the training prompts)")
    parser.add_argument("--out", required=True, help="folder for checkpoints, the curve and the LoRA")
    parser.add_argument("--overwrite", action="store_true", help="replace a LoRA file this run did not make")
    names = cli.add_config_arguments(parser, RPOConfig, RPOConfig(token="sks", class_name="x"),
                                     skip=("prompts", "validation_prompts"), required=("token", "class_name"))
    args = parser.parse_args(argv)
    cli.setup_logging()

    values = cli.config_values(args, names)
    prompts = (read_prompts(args.prompts_file) if args.prompts_file
               else default_prompts(values["token"], values["class_name"], tiny=args.model in TINY_NAMES))
    config = RPOConfig(prompts=prompts, validation_prompts=read_prompts(args.validation_prompts_file)
                       if args.validation_prompts_file else None, **values)
    accelerator = Accelerator(mixed_precision=resolve_precision(config.mixed_precision,
                                                                "cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(args.model, device=accelerator.device, **cli.model_kwargs(args))
    encoder, _ = parse_reward(args.encoder)
    encoder.to(accelerator.device)
    size = backbone(pipe).config.sample_size * pipe.vae_scale_factor
    references = load_references(args.references, size)
    result = train_rpo(pipe, encoder, references, config, args.out, accelerator=accelerator,
                       overwrite=args.overwrite)
    if accelerator.is_main_process:
        print(json.dumps({"lora": result.lora_path, "curve": result.curve_path,
                          "best_iteration": result.best_iteration, "best_score": result.best_score}))


if __name__ == "__main__":
    main()
