"""SD3 single-file checkpoints: r0_core.convert writes a tiny random StableDiffusion3Pipeline in the original layout
(model.diffusion_model.* MMDiT, first_stage_model.* VAE, text_encoders.{clip_l,clip_g,t5xxl}.transformer.*), the
exact inverse of diffusers' own reader; load_pipeline reads it back, with the configs of a weightless diffusers
folder, to the same weights and the same images; damaged or incomplete files get errors naming the file and fix."""
import copy
import glob
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r0_core import convert
from r0_core.generate import generate
from r0_core.loading import ModelLoadError, TINY_PIPELINE_DIR, checkpoint_shapes, detect_architecture, load_pipeline
from r0_core.tiny.architectures import random_pipeline
from tests.family_parity import PROMPTS

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _sd3(seed=0):
    pipe = random_pipeline("sd3", seed)
    # SD3 takes CLIP-L's pooled output unprojected: the single-file readers give it an identity projection
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    return pipe


def _config_folder(pipe, folder):
    """The pipeline's diffusers folder without a single weight file: configs, tokenizers and the scheduler."""
    pipe.save_pretrained(folder)
    for weights in glob.glob(os.path.join(folder, "*", "*.safetensors")):
        os.remove(weights)
    return str(folder)


def _assert_same_weights(a, b, parts=PARTS):
    for name in parts:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, (name, different[:3])


def _images(pipe):
    return generate(pipe, PROMPTS, steps=2, guidance=2.0, seeds=[3, 4])[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-single")
    pipe = _sd3()
    path = convert.save_original_checkpoint(pipe, root / "sd3.safetensors")
    return pipe, path, _config_folder(pipe, root / "config")


def test_the_file_has_the_original_sd3_layout(written):
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    pipe, path, _ = written
    shapes = checkpoint_shapes(path)
    # the keys diffusers (and ComfyUI) detect SD3 and its two CLIPs by
    assert any(k in shapes for k in CHECKPOINT_KEY_NAMES["sd3"])
    assert CHECKPOINT_KEY_NAMES["clip_sd3"] in shapes and CHECKPOINT_KEY_NAMES["open_clip_sd3"] in shapes
    assert detect_architecture(shapes, path) == "sd3"
    inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    mmdit = "model.diffusion_model."
    assert shapes[mmdit + "joint_blocks.0.x_block.attn.qkv.weight"] == (3 * inner, inner)   # q, k, v fused
    assert shapes[mmdit + "x_embedder.proj.weight"] == (inner, 4, 2, 2) and mmdit + "pos_embed" in shapes
    for key in ("t_embedder.mlp.0.weight", "y_embedder.mlp.2.bias", "context_embedder.weight",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
                "joint_blocks.0.context_block.attn.proj.weight", "joint_blocks.0.context_block.mlp.fc2.bias"):
        assert mmdit + key in shapes, key
    # the last block only reads the context: no context output projection or MLP, a 2-way (shift, scale) adaLN
    last = f"{mmdit}joint_blocks.{pipe.transformer.config.num_layers - 1}.context_block."
    assert not any(k.startswith((last + "attn.proj.", last + "mlp.")) for k in shapes)
    assert shapes[last + "adaLN_modulation.1.weight"] == (2 * inner, inner)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in shapes)
    assert not any(k.startswith(("text_encoders.t5xxl.", "transformer_blocks.", "cond_stage_model.")) for k in shapes)
    # the original final layer holds (shift, scale); diffusers' norm_out holds (scale, shift)
    with safe_open(path, framework="pt") as f:
        final = f.get_tensor(mmdit + "final_layer.adaLN_modulation.1.weight")
    scale, shift = pipe.transformer.norm_out.linear.weight.chunk(2)
    assert torch.equal(final, torch.cat([shift, scale]))


def test_diffusers_own_converter_inverts_the_writer_on_qk_norm_and_dual_attention_blocks():
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from r0_core.tiny.architectures import SD3_TRANSFORMER

    torch.manual_seed(0)
    for extra in ({}, {"qk_norm": "rms_norm"}, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}):
        model = SD3Transformer2DModel(**SD3_TRANSFORMER, **extra)
        original = convert.sd3_transformer_to_original(model)
        back = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v
                                                                for k, v in original.items()})
        ours = model.state_dict()
        assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours), extra
        assert ("joint_blocks.0.x_block.attn.ln_q.weight" in original) == ("qk_norm" in extra)
        assert ("joint_blocks.0.x_block.attn2.qkv.weight" in original) == ("dual_attention_layers" in extra)


def test_an_sd3_single_file_loads_to_the_same_weights_and_images(written):
    pipe, path, config = written
    loaded = load_pipeline(path, config_dir=config, device="cpu", dtype=torch.float32)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and loaded.text_encoder_3 is None
    _assert_same_weights(pipe, loaded)
    assert loaded.scheduler.config.shift == pipe.scheduler.config.shift
    assert (_images(loaded) - _images(pipe)).abs().max() < 1e-5
    # tokenizer_dir, when given, replaces the config folder's tokenizers (the tiny vocabulary is not CLIP's)
    with pytest.raises(ModelLoadError, match="49408"):
        load_pipeline(path, config_dir=config, tokenizer_dir=os.path.join(TINY_PIPELINE_DIR, "tokenizer"))


def test_diffusers_from_single_file_reads_the_file_too(written):
    from diffusers import StableDiffusion3Pipeline

    pipe, path, config = written
    # diffusers tells the file's CLIPs apart by width, so at the tiny model's equal widths CLIP-G is handed in
    theirs = StableDiffusion3Pipeline.from_single_file(path, config=config, local_files_only=True,
                                                       text_encoder_2=copy.deepcopy(pipe.text_encoder_2),
                                                       text_encoder_3=None, tokenizer_3=None)
    _assert_same_weights(pipe, theirs, ("transformer", "vae", "text_encoder"))


def test_an_sd3_single_file_with_t5_loads_it_too(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    base = _sd3(seed=1)
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(base.tokenizer), d_model=base.transformer.config.joint_attention_dim,
                                 d_ff=48, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False)).eval()
    # the world's tokenizer stands in for T5's: the pipeline only asks it for ids
    pipe = StableDiffusion3Pipeline(**{**base.components, "text_encoder_3": t5, "tokenizer_3": base.tokenizer})
    pipe.set_progress_bar_config(disable=True)
    path = convert.save_original_checkpoint(pipe, tmp_path / "sd3-t5.safetensors")
    shapes = checkpoint_shapes(path)
    assert "text_encoders.t5xxl.transformer.shared.weight" in shapes
    config = _config_folder(pipe, tmp_path / "config")
    loaded = load_pipeline(path, config_dir=config, device="cpu", dtype=torch.float32)
    _assert_same_weights(pipe, loaded, PARTS + ("text_encoder_3",))
    assert not loaded.text_encoder_3.training   # T5's dropout is off, as in the original
    assert (_images(loaded) - _images(pipe)).abs().max() < 1e-5
    # files that hold T5's tied input embedding only as `shared` load too
    tied = "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"
    shared_only = tmp_path / "sd3-t5-shared-only.safetensors"
    save_file({k: v for k, v in convert.pipeline_to_original_state_dict(pipe).items() if k != tied},
              str(shared_only))
    _assert_same_weights(pipe, load_pipeline(str(shared_only), config_dir=config), ("text_encoder_3",))
    # the folder must describe T5, and hold its tokenizer, which a single file does not
    no_t5 = _config_folder(base, tmp_path / "config-no-t5")
    with pytest.raises(ModelLoadError, match=r"config-no-t5 has no text_encoder_3/config.json.*holds a T5-XXL"):
        load_pipeline(path, config_dir=no_t5)
    for f in glob.glob(os.path.join(config, "tokenizer_3", "*")):
        os.remove(f)
    with pytest.raises(ModelLoadError, match=r"sd3-t5.safetensors holds a T5-XXL text encoder.*no tokenizer_3/"):
        load_pipeline(path, config_dir=config)


def test_what_cannot_be_written_raises():
    pipe = random_pipeline("sd3")   # its CLIP-L keeps a random projection, which the layout cannot hold
    with pytest.raises(ValueError, match="clip_l: text_projection is not the identity"):
        convert.pipeline_to_original_state_dict(pipe)
    pipe = _sd3()
    pipe.transformer.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ValueError, match="no original-layout mapping for diffusers key 'extra'"):
        convert.sd3_transformer_to_original(pipe.transformer)


def test_damaged_sd3_files_get_clear_errors(written, tmp_path):
    pipe, path, config = written
    data = open(path, "rb").read()
    cut = tmp_path / "sd3-cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="sd3-cut.safetensors is unreadable or corrupt.*re-download"):
        load_pipeline(str(cut), config_dir=config)

    state = convert.pipeline_to_original_state_dict(pipe)
    incomplete = tmp_path / "sd3-no-final-layer.safetensors"
    save_file({k: v for k, v in state.items() if "final_layer.linear" not in k}, str(incomplete))
    with pytest.raises(ModelLoadError, match=r"sd3-no-final-layer.safetensors.*KeyError.*final_layer.linear"):
        load_pipeline(str(incomplete), config_dir=config)

    mmdit_only = tmp_path / "sd3-mmdit-only.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, str(mmdit_only))
    with pytest.raises(ModelLoadError, match=r"sd3-mmdit-only.safetensors is an SD3 .* without the VAE .*CLIP-L"):
        load_pipeline(str(mmdit_only), config_dir=config)


def test_an_sd3_file_needs_a_matching_config_folder(written, tmp_path):
    pipe, path, config = written
    with pytest.raises(ModelLoadError, match=r"sd3.safetensors is an SD3 single-file.*got config_dir=None"):
        load_pipeline(path)
    with pytest.raises(ModelLoadError, match="describes a StableDiffusionPipeline"):
        load_pipeline(path, config_dir=TINY_PIPELINE_DIR)
    # a folder for a deeper model: the file has too few blocks for it
    deeper = random_pipeline("sd3")
    deeper.transformer.register_to_config(num_layers=3)
    wrong = _config_folder(deeper, tmp_path / "config-3-layers")
    with pytest.raises(ModelLoadError, match=r"could not build an SD3 pipeline from .*sd3.safetensors .*config-3"):
        load_pipeline(path, config_dir=wrong)
    # no tokenizers in the folder and no tokenizer_dir
    bare = _config_folder(pipe, tmp_path / "config-no-tokenizers")
    for tokenizer in ("tokenizer", "tokenizer_2"):
        for f in glob.glob(os.path.join(bare, tokenizer, "*")):
            os.remove(f)
    with pytest.raises(ModelLoadError, match=r"holds no tokenizer.*tokenizer_dir=<.*got tokenizer_dir=None"):
        load_pipeline(path, config_dir=bare)
    # config_dir means nothing to SD 1.x files (their configs are bundled)
    sd15 = convert.save_original_checkpoint(load_pipeline(), tmp_path / "tiny-sd15.safetensors")
    with pytest.raises(ModelLoadError, match="config_dir is for SD3 and SDXL single-file checkpoints"):
        load_pipeline(sd15, config_dir=config)
