"""ImageReward: tiny random weights of the real architecture, saved in the official flat ImageReward.pt layout,
scored exactly as an independent reference computation (hand-written timm-style BLIP ViT, BLIP text encoder with
cross-attention, linear MLP, standardisation)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

from r0_core.loading import ModelLoadError
from r0_core.rewards.image_reward import ImageReward
from tests.reward_weights import IMAGE_REWARD_WORDS as WORDS
from tests.reward_weights import save_image_reward

WIDTH, LAYERS, HEADS, PATCH, SIZE = 128, 2, 2, 8, 32  # tiny ViT: heads = width // 64, as BLIP's ViT-L/16
VIT = "blip.visual_encoder."
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red circle", "Blue squares above the big tree",
           " ".join(["a small cat on the left of a white house"] * 5)]  # 55 words: truncated to 35 tokens


def tokenizer_for(folder):
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The official files written by reward_weights.save_image_reward, read back for the reference: the flat state
    dict split into the ViT and the MLP, the text config from med_config.json, BLIP's tokenizer."""
    folder = tmp_path_factory.mktemp("image_reward")
    checkpoint, _ = save_image_reward(folder, width=WIDTH, layers=LAYERS, patch=PATCH, image=SIZE)
    state = torch.load(checkpoint, weights_only=True)
    med = json.loads((folder / "med_config.json").read_text())
    text_config = BlipTextConfig(**{k: med[k] for k in ("hidden_act", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads", "vocab_size",
                                                        "max_position_embeddings", "layer_norm_eps")},
                                 encoder_hidden_size=WIDTH, is_decoder=True,
                                 bos_token_id=None, eos_token_id=None, sep_token_id=None)
    vit = {k[len(VIT):]: v for k, v in state.items() if k.startswith(VIT)}
    mlp = {k: v for k, v in state.items() if k.startswith("mlp.")}
    return dict(folder=folder, state=state, vit=vit, mlp=mlp, text_config=text_config, tokenizer=tokenizer_for(folder))


def vit_reference(vit, pixels):
    """timm-style BLIP ViT: patchify, [CLS] + positions, pre-norm blocks with fused qkv and exact gelu, final norm."""
    def ln(x, name):
        return F.layer_norm(x, (WIDTH,), vit[f"{name}.weight"], vit[f"{name}.bias"], eps=1e-6)

    def lin(x, name):
        return F.linear(x, vit[f"{name}.weight"], vit[f"{name}.bias"])

    x = F.conv2d(pixels, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vit["cls_token"].expand(len(x), -1, -1), x], 1) + vit["pos_embed"]
    b, n, _ = x.shape
    for i in range(LAYERS):
        qkv = lin(ln(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
        q, k, v = qkv.view(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + lin(attention.transpose(1, 2).reshape(b, n, WIDTH), f"blocks.{i}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1")), f"blocks.{i}.mlp.fc2")
    return ln(x, "norm")


def reference_scores(tiny, images, prompts):
    pixels = (images - MEAN) / STD  # images are already 32x32: no resize, no crop
    image_tokens = vit_reference(tiny["vit"], pixels)
    text = BlipTextModel(tiny["text_config"], add_pooling_layer=False).eval()
    prefix = "blip.text_encoder."
    text.load_state_dict({k[len(prefix):]: v for k, v in tiny["state"].items()
                          if k.startswith(prefix) and "position_ids" not in k})
    ids = tiny["tokenizer"](prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    hidden = text(input_ids=ids.input_ids, attention_mask=ids.attention_mask, encoder_hidden_states=image_tokens,
                  encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
                  is_decoder=False).last_hidden_state
    r = hidden[:, 0]
    for layer in (0, 2, 4, 6, 7):
        r = r @ tiny["mlp"][f"mlp.layers.{layer}.weight"].T + tiny["mlp"][f"mlp.layers.{layer}.bias"]
    return (r[:, 0] - 0.16717362830052426) / 1.0333394966054072


def test_tokenizer_is_blips_with_35_tokens(tiny):
    tokenizer = tiny["tokenizer"]
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS) + 6, len(WORDS) + 7]
    ids = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35).input_ids
    vocab = {w: i + 6 for i, w in enumerate(WORDS)}
    assert ids[0][:6] == [3, vocab["a"], vocab["red"], vocab["circle"], 4, 0]  # [CLS] ... [SEP] [PAD]
    assert len(ids[2]) == 35 and ids[2][0] == 3 and ids[2][-1] == 4  # truncated, [CLS] kept first


def test_image_reward_equals_the_reference(tiny):
    torch.manual_seed(1)
    images = torch.rand(3, 3, SIZE, SIZE)
    folder = tiny["folder"]
    scorer = ImageReward.from_pretrained(str(folder / "ImageReward.pt"), str(folder / "med_config.json"), str(folder))
    with torch.no_grad():
        ours, reference = scorer(images, PROMPTS), reference_scores(tiny, images, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6), (ours, reference)
    assert ours.std() > 1e-3  # the prompts and images actually move the score

    save_file({k: v.contiguous() for k, v in tiny["state"].items()}, tiny["folder"] / "ImageReward.safetensors")
    scorer = ImageReward.from_pretrained(str(tiny["folder"] / "ImageReward.safetensors"))  # configs beside it
    with torch.no_grad():
        assert torch.allclose(scorer(images, PROMPTS), ours, rtol=1e-6, atol=1e-7)


def test_gradients_reach_the_images(tiny):
    scorer = ImageReward.from_pretrained(str(tiny["folder"] / "ImageReward.pt"))
    images = torch.rand(2, 3, 48, 40, requires_grad=True)  # resized and cropped inside, differentiably
    scorer(images, "a red circle").sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_other_checkpoints_fail_clearly(tiny, tmp_path):
    aesthetic = {f"layers.{i}.{p}": torch.zeros(1) for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    open_clip = {"state_dict": {"visual.conv1.weight": torch.zeros(1), "positional_embedding": torch.zeros(1)}}
    for name, state in (("sac+logos+ava1-l14-linearMSE.pth", aesthetic), ("HPS_v2.1_compressed.pt", open_clip)):
        torch.save(state, tmp_path / name)
        with pytest.raises(ModelLoadError, match="is not an ImageReward checkpoint"):
            ImageReward.from_pretrained(str(tmp_path / name), str(tiny["folder"] / "med_config.json"),
                                        str(tiny["folder"]))


def test_missing_files_are_listed(tmp_path):
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing: ImageReward checkpoint .*vocab\.txt"):
        ImageReward.from_pretrained(str(tmp_path / "ImageReward.pt"))


def test_vit_heads_come_from_the_config(tiny, tmp_path):
    """BLIP builds ViT-B (768) and ViT-L (1024); at any other width the head count must be given, never guessed."""
    import json
    import shutil

    for name in ("ImageReward.pt", "vocab.txt"):
        shutil.copy(tiny["folder"] / name, tmp_path / name)
    med = json.loads((tiny["folder"] / "med_config.json").read_text())
    med["vision_num_attention_heads"] = 4   # 128 wide: 4 heads of 32 instead of 2 of 64 scores differently
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        two = ImageReward.from_pretrained(str(tiny["folder"] / "ImageReward.pt"))(images, PROMPTS[:2])
        four = ImageReward.from_pretrained(str(tmp_path / "ImageReward.pt"))(images, PROMPTS[:2])
    assert not torch.allclose(two, four, atol=1e-4)
    del med["vision_num_attention_heads"]
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(ModelLoadError, match=r"ViT is 128 wide.*vision_num_attention_heads.*med_config\.json"):
        ImageReward.from_pretrained(str(tmp_path / "ImageReward.pt"))
