"""HPS v2 and PickScore: exact against independent reference computations on tiny random weights saved in each
family's own on-disk layout, differentiable, and loud about wrong files."""
import json
import shutil
import string

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from r0_core.loading import TINY_CLIP_DIR
from r0_core.rewards.hps import HPSv2
from r0_core.rewards.pickscore import PickScore

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle above a red circle and a big blue square"]
LAYERS, CONTEXT = 2, 16


# ---- HPS: open_clip layout and a minimal open_clip forward ----

def open_clip_state(width=128, text_width=128, patch=8, image=32, vocab=54, dim=24):
    """Random weights under open_clip's key names, fp16 like the official HPS_v2*_compressed.pt."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)
    one = lambda n: 1 + r(n)
    sd = {"visual.class_embedding": r(width), "visual.positional_embedding": r((image // patch) ** 2 + 1, width),
          "visual.conv1.weight": r(width, 3, patch, patch), "visual.proj": r(width, dim),
          "visual.ln_pre.weight": one(width), "visual.ln_pre.bias": r(width),
          "visual.ln_post.weight": one(width), "visual.ln_post.bias": r(width),
          "token_embedding.weight": r(vocab, text_width), "positional_embedding": r(CONTEXT, text_width),
          "ln_final.weight": one(text_width), "ln_final.bias": r(text_width), "text_projection": r(text_width, dim),
          "logit_scale": torch.tensor(4.6052)}
    for prefix, w in (("visual.transformer.resblocks.", width), ("transformer.resblocks.", text_width)):
        for i in range(LAYERS):
            p = f"{prefix}{i}."
            sd.update({p + "ln_1.weight": one(w), p + "ln_1.bias": r(w), p + "ln_2.weight": one(w),
                       p + "ln_2.bias": r(w), p + "attn.in_proj_weight": r(3 * w, w), p + "attn.in_proj_bias": r(3 * w),
                       p + "attn.out_proj.weight": r(w, w), p + "attn.out_proj.bias": r(w),
                       p + "mlp.c_fc.weight": r(4 * w, w), p + "mlp.c_fc.bias": r(4 * w),
                       p + "mlp.c_proj.weight": r(w, 4 * w), p + "mlp.c_proj.bias": r(w)})
    return {k: v.half() for k, v in sd.items()}


def ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])


def block(x, sd, p, heads, mask=None):
    """open_clip ResidualAttentionBlock on [L, N, E]: nn.MultiheadAttention with a fused in_proj, exact GELU MLP."""
    h = ln(x, sd, p + "ln_1")
    x = x + F.multi_head_attention_forward(
        h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
        0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask)[0]
    h = F.gelu(F.linear(ln(x, sd, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
    return x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def reference_image(sd, pixels, heads):
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, sd, "visual.ln_pre").transpose(0, 1)
    for i in range(LAYERS):
        x = block(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    return ln(x[0], sd, "visual.ln_post") @ sd["visual.proj"]


def reference_text(sd, ids, heads):
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"]).transpose(0, 1)
    mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)  # causal
    for i in range(LAYERS):
        x = block(x, sd, f"transformer.resblocks.{i}.", heads, mask)
    x = ln(x.transpose(0, 1), sd, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # eot = the highest id


def reference_letterbox(images, size):
    """Longest side to `size`, pasted centred on a black square, then normalised."""
    h, w = images.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    canvas = torch.zeros(len(images), 3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[..., top:top + nh, left:left + nw] = F.interpolate(images, (nh, nw), mode="bicubic", antialias=True)
    return (canvas - MEAN) / STD


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """The checkpoint as .pt (dict under 'state_dict') and as .safetensors with a `module.` prefix, and a CLIP BPE
    tokenizer folder whose eos is the highest id, as in OpenAI's vocabulary."""
    root = tmp_path_factory.mktemp("hps")
    sd = open_clip_state()
    torch.save({"state_dict": sd}, root / "HPS_v2.1_compressed.pt")
    save_file({"module." + k: v for k, v in sd.items()}, root / "HPS_v2.1_compressed.safetensors")
    tokens = ["<|startoftext|>", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase),
              "<|endoftext|>"]
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    return root, {k: v.float() for k, v in sd.items()}


@pytest.mark.parametrize("name, vision_heads", [("HPS_v2.1_compressed.pt", None),
                                                ("HPS_v2.1_compressed.safetensors", None),
                                                ("HPS_v2.1_compressed.pt", 4)])
def test_hps_equals_open_clip(hps_files, name, vision_heads):
    root, sd = hps_files
    config = {"vision_config": {"num_attention_heads": vision_heads}} if vision_heads else None
    scorer = HPSv2.from_pretrained(str(root / name), str(root / "tokenizer"), config=config).eval()
    assert next(scorer.parameters()).dtype == torch.float32 and scorer.size == 32
    ids = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=CONTEXT,
                           return_tensors="pt").input_ids
    assert (ids.argmax(-1) == (ids == scorer.tokenizer.eos_token_id).int().argmax(-1)).all()
    torch.manual_seed(0)
    for h, w in ((40, 24), (18, 50), (16, 12), (32, 32)):  # tall, wide, upsampled, square: padding both ways
        images = torch.rand(3, 3, h, w)
        with torch.no_grad():
            ours = scorer(images, PROMPTS)
            image = reference_image(sd, reference_letterbox(images, 32), vision_heads or 2)
            text = reference_text(sd, ids, 2)
        reference = F.cosine_similarity(image, text, dim=-1)
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6), (h, w, ours, reference)


def test_hps_gradients_reach_the_images(hps_files):
    root, _ = hps_files
    scorer = HPSv2.from_pretrained(str(root / "HPS_v2.1_compressed.pt"), str(root / "tokenizer")).eval()
    images = torch.rand(2, 3, 40, 24, requires_grad=True)
    scorer(images, "a red circle").sum().backward()
    assert images.grad.abs().sum() > 0


def test_hps_refuses_other_files(hps_files, tmp_path):
    root, sd = hps_files
    tokenizer = str(root / "tokenizer")
    aesthetic = {"layers.0.weight": torch.randn(16, 8), "layers.0.bias": torch.randn(16)}
    torch.save(aesthetic, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(ValueError, match=r"linearMSE.pth is not an open_clip HPS checkpoint.*layers.0.weight"):
        HPSv2.from_pretrained(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), tokenizer)
    broken = {k: v for k, v in sd.items() if k != "visual.ln_post.bias"} | {"visual.attnpool.weight": torch.zeros(4)}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="missing vision_model.post_layernorm.bias; unexpected visual.attnpool"):
        HPSv2.from_pretrained(str(tmp_path / "broken.safetensors"), tokenizer)
    (tmp_path / "tok").mkdir()
    shutil.copy(root / "tokenizer" / "vocab.json", tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        HPSv2.from_pretrained(str(root / "HPS_v2.1_compressed.pt"), str(tmp_path / "tok"))


# ---- PickScore: a transformers CLIPModel folder ----

@pytest.fixture(scope="module")
def pick_folder(tmp_path_factory):
    """A tiny random CLIPModel without processor or tokenizer files (early PickScore uploads), the tokenizer aside."""
    folder = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, hidden_act="gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=24, logit_scale_init_value=4.6052)
    CLIPModel(config).save_pretrained(folder / "model")
    (folder / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{TINY_CLIP_DIR}/{name}", folder / "tokenizer" / name)
    return folder


@pytest.mark.parametrize("processor_file", [False, True])
def test_pickscore_equals_clip_logits(pick_folder, processor_file, tmp_path):
    model_dir = pick_folder / "model"
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    if processor_file:  # then the processor's sizes rule: 40x40 inputs are centre-cropped to 32
        shutil.copytree(model_dir, tmp_path / "model")
        model_dir = tmp_path / "model"
        processor.save_pretrained(model_dir)
    scorer = PickScore.from_pretrained(str(model_dir), tokenizer_dir=str(pick_folder / "tokenizer")).eval()
    assert (scorer.size, scorer.crop) == ((40, 32) if processor_file else (32, 32))
    images = torch.rand(3, 3, *(40, 40) if processor_file else (32, 32))
    ours = scorer(images, PROMPTS)

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixels = processor(list(images.permute(0, 2, 3, 1).numpy()), do_rescale=False, do_resize=False,
                       do_center_crop=processor_file, return_tensors="pt").pixel_values
    ids = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=16,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels).logits_per_image.diagonal()
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5), (ours, reference)


def test_pickscore_gradients_reach_the_images(pick_folder):
    scorer = PickScore.from_pretrained(str(pick_folder / "model"), str(pick_folder / "tokenizer")).eval()
    images = torch.rand(2, 3, 48, 40, requires_grad=True)  # resized and cropped inside, differentiably
    scorer(images, "a red circle").sum().backward()
    assert images.grad.abs().sum() > 0


def test_pickscore_names_missing_files(pick_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        PickScore.from_pretrained(str(tmp_path))
    shutil.copy(pick_folder / "model" / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        PickScore.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lacks vocab.json, merges.txt"):
        PickScore.from_pretrained(str(pick_folder / "model"))
