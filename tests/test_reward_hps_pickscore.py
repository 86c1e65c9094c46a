"""HPS v2 and PickScore: exact against independent reference computations on tiny random weights saved in each
family's own on-disk layout, differentiable, and loud about wrong files."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPModel

from r0_core.rewards.hps import HPSv2
from r0_core.rewards.pickscore import PickScore
from tests.reward_weights import save_hps, save_pickscore

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle above a red circle and a big blue square"]
LAYERS, CONTEXT = 2, 16


# ---- HPS: a minimal open_clip forward over the open_clip checkpoint of reward_weights.save_hps ----

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
    checkpoint, _ = save_hps(root, layers=LAYERS, context=CONTEXT)
    sd = torch.load(checkpoint, weights_only=True)["state_dict"]
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
    # 128-wide towers are no released open_clip model's: without open_clip_config.json the head count is unknown
    with pytest.raises(ValueError, match="broken.safetensors: its vision tower is 128 wide.*open_clip_config.json"):
        HPSv2.from_pretrained(str(tmp_path / "broken.safetensors"), tokenizer)
    shutil.copy(root / "open_clip_config.json", tmp_path)
    with pytest.raises(ValueError, match="missing vision_model.post_layernorm.bias; unexpected visual.attnpool"):
        HPSv2.from_pretrained(str(tmp_path / "broken.safetensors"), tokenizer)
    (tmp_path / "tok").mkdir()
    shutil.copy(root / "tokenizer" / "vocab.json", tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        HPSv2.from_pretrained(str(root / "HPS_v2.1_compressed.pt"), str(tmp_path / "tok"))


def test_hps_head_counts_come_from_the_config(hps_files, tmp_path):
    """A head count that is not the tower's makes other scores (so it is read, not guessed), and the open_clip
    config's count is the one used; released widths need no config (ViT-H-14: 16 vision and 16 text heads)."""
    from r0_core.rewards.hps import KNOWN_HEADS, infer_config
    root, sd = hps_files
    images = torch.rand(2, 3, 32, 32)
    right = HPSv2.from_pretrained(str(root / "HPS_v2.1_compressed.pt"), str(root / "tokenizer"))
    assert right.model.config.text_config.num_attention_heads == 2
    wrong = HPSv2.from_pretrained(str(root / "HPS_v2.1_compressed.pt"), str(root / "tokenizer"),
                                  config={"text_config": {"num_attention_heads": 4}})
    with torch.no_grad():
        assert not torch.allclose(right(images, PROMPTS[:2]), wrong(images, PROMPTS[:2]), atol=1e-4)
    assert KNOWN_HEADS["vision_config"][1280] == 16 and KNOWN_HEADS["text_config"][1024] == 16
    shapes = {"visual.conv1.weight": torch.zeros(1280, 3, 14, 14), "visual.positional_embedding": torch.zeros(257, 1280),
              "token_embedding.weight": torch.zeros(49408, 1024), "positional_embedding": torch.zeros(77, 1024),
              "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(5120, 1280),
              "transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(4096, 1024), "text_projection": torch.zeros(1024, 1024)}
    config = infer_config(shapes, right.tokenizer)
    assert config["vision_config"]["num_attention_heads"] == 16 and config["text_config"]["num_attention_heads"] == 16


def test_hps_unescapes_html_entities_as_open_clip(hps_files):
    """open_clip's tokenizer un-escapes HTML entities before BPE: "&amp;" scores as "&"."""
    root, _ = hps_files
    scorer = HPSv2.from_pretrained(str(root / "HPS_v2.1_compressed.pt"), str(root / "tokenizer"))
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        plain, escaped, other = (scorer(images, p) for p in ("a red & blue circle", "a red &amp;amp; blue circle",
                                                              "a red and blue circle"))
    assert torch.equal(plain, escaped) and not torch.equal(plain, other)


# ---- PickScore: a transformers CLIPModel folder ----

@pytest.fixture(scope="module")
def pick_folder(tmp_path_factory):
    """A tiny random CLIPModel without processor or tokenizer files (early PickScore uploads), the tokenizer aside."""
    folder = tmp_path_factory.mktemp("pickscore")
    save_pickscore(folder)
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
