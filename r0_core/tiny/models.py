"""Architectures of the tiny world, as config data: the same diffusers/transformers classes as Stable Diffusion
and CLIP, scaled down to 32x32 images and a vocabulary of a few dozen words."""
from __future__ import annotations

import json
import os
import tempfile

from .world import vocabulary

MAX_TOKENS = 16  # longest caption is 13 tokens with start, end and a three-piece nonsense word

# The VAE halves the resolution: 32x32x3 pixels <-> 16x16x4 latents, as SD's 8x VAE does at 512 px.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, mid_block_add_attention=False,
)

# Text and vision towers of the tiny reward CLIP; its text tower is also the pipeline's frozen text encoder,
# as Stable Diffusion uses OpenAI CLIP's.
TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, projection_dim=128,
)
VISION_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    image_size=32, patch_size=4, projection_dim=128,
)

# Cross-attention at the 8x8 and 4x4 latent levels only: attention at 16x16 costs 4x the time on a CPU.
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=128,
    attention_head_dim=32, norm_num_groups=32,
)

# v-prediction on a cosine schedule: the terminal step is pure noise (no mean leak, so no tinted backgrounds),
# and "trailing" spacing starts few-step sampling at t=999.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,  # as in SD's configs; only "leading" spacing uses it
)




def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair loop: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def build_tokenizer(folder: str):
    """A CLIPTokenizer whose byte-pair merges spell each word of the world as one token. Saved to `folder`."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    ranks: dict[tuple[str, str], int] = {}
    for word in vocabulary():
        spelled = list(word[:-1]) + [word[-1] + "</w>"]  # CLIP marks the last character with </w>
        tokens += [p for p in dict.fromkeys(spelled) if p not in tokens]
        # append merges (lowest priority, so earlier words keep their spelling) until the word is one token
        while len(pieces := _bpe(spelled, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            if pieces[0] + pieces[1] not in tokens:
                tokens.append(pieces[0] + pieces[1])
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
        tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_TOKENS,
                                  pad_token="<|endoftext|>")
        tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
