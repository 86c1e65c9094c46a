"""Reward nodes: load a scorer, score a batch, keep the best of N, combine scorers, and RPO's λ-Harmonic reward.
Every node passes the same REWARD_MODEL (an r0_core RewardModel), so a scorer built here also feeds the trainers.
Node ids and the order of their inputs are a public API: append, never reorder."""
from __future__ import annotations

from typing import Optional

import torch

from r0_core.loading import TINY
from r0_core.rewards import FAMILIES, LambdaHarmonic, WeightedReward, load_reward, score_in_batches

from . import bridge
from .r0_nodes import DTYPES

REWARD = "REWARD_MODEL"
FOLDER = "reward_models"
BESIDE = "(beside the model)"
bridge.register_folder(FOLDER)


def model_choices() -> list[str]:
    return [TINY] + sorted(set(bridge.list_files(FOLDER)) | set(bridge.list_model_folders(FOLDER, "config.json")))


def support_choices() -> list[str]:
    return [BESIDE] + bridge.list_subfolders(FOLDER)


def to_batch(image: torch.Tensor, name: str = "images") -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> [B, 3, H, W], refusing what a scorer cannot read."""
    if image.ndim != 4:
        raise ValueError(f"{name} has shape {tuple(image.shape)}; expected an IMAGE batch [B, H, W, C]")
    channels = image.shape[-1]
    if channels == 4:
        raise ValueError(f"{name} is RGBA; drop the alpha channel first (e.g. 'Split Image with Alpha')")
    if channels == 1:
        raise ValueError(f"{name} is grayscale (1 channel); convert it to RGB first")
    if channels != 3:
        raise ValueError(f"{name} has {channels} channels; expected an RGB IMAGE [B, H, W, 3]")
    return image.permute(0, 3, 1, 2).float()


def split_prompts(text: str, count: int) -> list[str]:
    """One prompt for every image, or one line per image."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"prompts has {len(lines)} lines for {count} images; write one prompt, or one line per "
                         f"image")
    return lines


def run_scorer(reward_model, images, prompts: str, references: Optional[torch.Tensor], batch_size: int,
               offload: bool) -> tuple[torch.Tensor, list[str]]:
    batch = to_batch(images)
    prompts = split_prompts(prompts, len(batch))
    refs = None if references is None else to_batch(references, "references")
    for module in reward_model.modules():  # back from an earlier offload
        if hasattr(module, "home_device"):
            module.to(module.home_device)
    chunks = -(-len(batch) // batch_size)
    scores = score_in_batches(reward_model, batch, prompts, refs, batch_size, bridge.progress_callback(chunks))
    if offload:
        reward_model.to("cpu")
    return scores, prompts


def table(scores: torch.Tensor, prompts: list[str], order=None) -> str:
    """One line per image (in `order`, default the batch's): its rank by score (1 = best), index, score, prompt."""
    order = range(len(scores)) if order is None else order
    by_score = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    rank = {i: r for r, i in enumerate(by_score, 1)}
    return "\n".join(["rank  image  score       prompt"] + [
        f"{rank[i]:>4}  {i:>5}  {scores[i]:>10.4f}  {prompts[i]}" for i in order])


class RewardLoader:
    DESCRIPTION = ("Loads a reward scorer from models/reward_models (or the built-in tiny CLIP), cached between "
                   "runs. Families: " + "; ".join(f"{name}: {f.path}" for name, f in FAMILIES.items()))
    CATEGORY = "R0/reward"
    RETURN_TYPES = (REWARD,)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (list(FAMILIES), {"default": "clip",
                                        "tooltip": "which reward: clip, hpsv2, pickscore, image_reward, aesthetic, "
                                                   "align or dino"}),
            "model": (model_choices(), {"tooltip": "a file or transformers folder in models/reward_models; tiny "
                                                   "is the built-in tiny world's CLIP (family clip)"}),
            "support": (support_choices(), {"tooltip": "companion files: " + "; ".join(
                f"{name}: {f.support}" for name, f in FAMILIES.items() if f.support)}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto",
                                                 "tooltip": "auto: the GPU if there is one, else the CPU"}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: fp32 on CPU, bf16/fp16 on GPU"}),
        }}

    def load(self, family, model, support, device, dtype):
        path = TINY if model == TINY else bridge.resolve(FOLDER, model)
        support = None if support == BESIDE else bridge.resolve(FOLDER, support)
        scorer = load_reward(family, path, support, device=None if device == "auto" else device,
                             dtype=DTYPES[dtype])
        scorer.home_device = next(scorer.parameters()).device
        return (scorer,)


class RewardScore:
    DESCRIPTION = "Scores every image of a batch: a list of per-image scores and a readable table."
    CATEGORY = "R0/reward"
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("scores", "table")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_NODE = True  # shows its table in the graph
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reward_model": (REWARD, {"tooltip": "a scorer from Reward Loader, Reward Combine or Reward λ-Harmonic"}),
            "images": ("IMAGE", {"tooltip": "the images to score (any size; resized inside the scorer)"}),
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "one prompt, or one line per image"}),
            "batch_size": ("INT", {"default": 16, "min": 1, "max": 512, "tooltip": "images scored at once"}),
            "offload": ("BOOLEAN", {"default": False, "tooltip": "move the scorer to the CPU afterwards"}),
        }, "optional": {
            "references": ("IMAGE", {"tooltip": "reference images, for DINO and λ-Harmonic scorers"}),
        }}

    def score(self, reward_model, images, prompts, batch_size, offload, references=None):
        scores, prompts = run_scorer(reward_model, images, prompts, references, batch_size, offload)
        text = table(scores, prompts)
        return {"ui": {"text": [text]}, "result": (scores.tolist(), text)}


class RewardRankSelect:
    DESCRIPTION = "Best-of-N: keeps the k best-scoring images (best first), optionally only those above a threshold."
    CATEGORY = "R0/reward"
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT", "STRING")
    RETURN_NAMES = ("images", "scores", "indices", "table")
    OUTPUT_IS_LIST = (False, True, True, False)
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reward_model": (REWARD, {"tooltip": "a scorer from Reward Loader, Reward Combine or Reward λ-Harmonic"}),
            "images": ("IMAGE", {"tooltip": "the images to score (any size; resized inside the scorer)"}),
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "one prompt, or one line per image"}),
            "k": ("INT", {"tooltip": "how many of the best images to keep", "default": 1, "min": 1, "max": 4096}),
            "threshold": ("FLOAT", {"default": -1000.0, "min": -1000.0, "max": 1000.0, "step": 0.01,
                                    "tooltip": "keep only images scoring at least this; -1000 keeps all"}),
            "batch_size": ("INT", {"tooltip": "images scored at once", "default": 16, "min": 1, "max": 512}),
            "offload": ("BOOLEAN", {"default": False, "tooltip": "move the scorer to the CPU afterwards"}),
        }, "optional": {
            "references": ("IMAGE", {"tooltip": "reference images, for DINO and λ-Harmonic scorers"}),
        }}

    def select(self, reward_model, images, prompts, k, threshold, batch_size, offload, references=None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}; expected a whole number >= 1 (how many of the best images to keep)")
        scores, prompts = run_scorer(reward_model, images, prompts, references, batch_size, offload)
        order = [i for i in scores.argsort(descending=True).tolist() if scores[i] >= threshold][:k]
        if not order:
            raise ValueError(f"no image reached threshold {threshold} (best score {scores.max():.4f}); lower the "
                             f"threshold")
        return (images[order], [float(scores[i]) for i in order], order, table(scores, prompts, order))


class RewardCombine:
    DESCRIPTION = ("A weighted sum of up to 4 rewards. With normalize_gradients an R0 trainer scales each reward's "
                   "image gradient to unit norm before weighting, so no reward dominates by scale alone.")
    CATEGORY = "R0/reward"
    RETURN_TYPES = (REWARD,)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        def weight(i):
            return ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                              "tooltip": f"weight of reward_{i}; negative penalises it (unused without reward_{i})"})

        def reward(i):
            return (REWARD, {"tooltip": f"reward {i} of the sum" + (" (optional)" if i > 1 else "")})
        return {"required": {
            "reward_1": reward(1), "weight_1": weight(1), "weight_2": weight(2), "weight_3": weight(3),
            "weight_4": weight(4),
            "normalize_gradients": ("BOOLEAN", {"default": True,
                                                "tooltip": "R0's rule: each reward's image gradient scaled to unit "
                                                           "norm before weighting, so no reward dominates by scale "
                                                           "(used by trainers)"}),
        }, "optional": {"reward_2": reward(2), "reward_3": reward(3), "reward_4": reward(4)}}

    def combine(self, reward_1, weight_1, weight_2, weight_3, weight_4, normalize_gradients, reward_2=None,
                reward_3=None, reward_4=None):
        pairs = [(r, w) for r, w in zip((reward_1, reward_2, reward_3, reward_4),
                                        (weight_1, weight_2, weight_3, weight_4)) if r is not None]
        return (WeightedReward([r for r, _ in pairs], [w for _, w in pairs], normalize_gradients),)


class RewardLambdaHarmonic:
    DESCRIPTION = ("RPO's λ-Harmonic reward 1/(λ/I + (1−λ)/T): I = similarity to the reference images, T = to the "
                   "prompt, both through one CLIP-like or ALIGN encoder. λ=1 is subject fidelity only, λ=0 text "
                   "only.")
    CATEGORY = "R0/reward"
    RETURN_TYPES = (REWARD,)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder": (REWARD, {"tooltip": "the image-text encoder of the λ-Harmonic reward: a CLIP, PickScore, "
                                            "HPSv2 or ALIGN reward model"}),
            "references": ("IMAGE", {"tooltip": "the subject's photos"}),
            "lam": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "λ"}),
        }}

    def build(self, encoder, references, lam):
        return (LambdaHarmonic(encoder, lam, to_batch(references, "references")),)


NODE_CLASS_MAPPINGS = {
    "RewardLoader": RewardLoader,
    "RewardScore": RewardScore,
    "RewardRankSelect": RewardRankSelect,
    "RewardCombine": RewardCombine,
    "RewardLambdaHarmonic": RewardLambdaHarmonic,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RewardLoader": "Reward Model Loader",
    "RewardScore": "Reward Score",
    "RewardRankSelect": "Reward Rank / Select (best of N)",
    "RewardCombine": "Reward Combine",
    "RewardLambdaHarmonic": "Reward λ-Harmonic (RPO)",
}
