"""LoRA: targets, exported files reloaded by diffusers, metadata and hashes, continuing from a file, TI+LoRA."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import export, families, formats, models
from sdtune.config import ConfigError, parse_config
from sdtune.methods import lora
from sdtune.train import fit, setup


@pytest.fixture
def lora_config_dict(ti_config_dict) -> dict:
    """A small LoRA config on the tiny base (fp32 saves, so reloads compare exactly)."""
    raw = {k: v for k, v in ti_config_dict.items() if k not in ("placeholder_token", "init_word", "num_vectors")}
    return {**raw, "method": "lora", "learning_rate": 5e-2, "lora_rank": 4, "lora_alpha": 2, "save_precision": "fp32"}


def _pipe(tiny_base, lora_path=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_base["folder"], safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if lora_path is not None:
        pipe.load_lora_weights(str(lora_path))
    return pipe


def _outputs(tokenizer, text_encoder, unet, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(["a red star on a blue background"], padding="max_length", max_length=77, return_tensors="pt")
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    with torch.no_grad():
        hidden = text_encoder(ids.input_ids)[0]
        return hidden, unet(latents, torch.tensor([321]), hidden).sample


def _sd15_meta_models():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = models.preset_configs("sd15")
    text = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    with init_empty_weights():
        return UNet2DConditionModel.from_config(configs["unet"]), CLIPTextModel(CLIPTextConfig(**text))


def test_kohya_preset_on_sd15_shapes_matches_kohya_module_counts():
    unet, text_encoder = _sd15_meta_models()
    assert len(lora.unet_targets(unet, "kohya", 8, 8.0, None)) == 192
    assert len(lora.text_encoder_targets(text_encoder, "kohya", 8, 8.0)) == 72
    attention = lora.unet_targets(unet, "attention", 8, 8.0, None)
    assert len(attention) == 128 and all(".attn1." in p or ".attn2." in p for p in attention)
    assert len(lora.text_encoder_targets(text_encoder, "attention", 8, 8.0)) == 48
    cross = lora.unet_targets(unet, "cross_attention", 8, 8.0, None)
    assert len(cross) == 64 and all(".attn2." in p for p in cross)
    locon = lora.unet_targets(unet, "kohya", 8, 8.0, (4, 2.0))
    assert locon["down_blocks.0.resnets.0.conv1"] == (4, 2.0)
    assert locon["down_blocks.1.resnets.0.conv_shortcut"] == (8, 8.0)  # 1x1 convs use the main rank
    assert locon["down_blocks.0.downsamplers.0.conv"] == (4, 2.0)
    assert locon["up_blocks.0.upsamplers.0.conv"] == (4, 2.0)
    keys = {formats.lora_key(families.SD1, "unet", p) for p in locon}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in" in keys
    targets = lora.text_encoder_targets(text_encoder, "kohya", 8, 8.0)
    te_keys = {formats.lora_key(families.SD1, "text_encoder", p) for p in targets}
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_keys


@pytest.mark.parametrize(
    "variant",
    [
        {"lora_targets": "attention", "train_text_encoder": False},
        {},
        {"conv_rank": 2, "conv_alpha": 1, "train_text_encoder": False},
        {"train_unet": False},
    ],
    ids=["attention-only", "kohya-default", "locon", "text-encoder-only"],
)
def test_exported_lora_reloads_in_diffusers_with_the_trained_outputs(lora_config_dict, tiny_base, variant):
    run = setup(parse_config({**lora_config_dict, **variant}))
    before = {k: v.clone() for k, v in run.base.unet.state_dict().items() if "lora_" not in k}
    result = fit(run)
    trained = _outputs(run.base.tokenizer, run.base.text_encoder, run.base.unet)
    pipe = _pipe(tiny_base, result.final_path)
    reloaded = _outputs(pipe.tokenizer, pipe.text_encoder, pipe.unet)
    torch.testing.assert_close(reloaded[0], trained[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded[1], trained[1], rtol=0, atol=1e-5)
    base_outputs = _outputs(pipe.tokenizer, *_base_models(tiny_base))
    changed_text = not torch.allclose(base_outputs[0], trained[0], atol=1e-5)
    assert changed_text == (variant.get("train_text_encoder") is not False)
    assert not torch.allclose(base_outputs[1], trained[1], atol=1e-5)
    after = run.base.unet.state_dict()
    assert any(".base_layer." in k for k in before) == (variant.get("train_unet") is not False)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # base weights untouched


def _base_models(tiny_base):
    base = models.load_base_model(tiny_base["folder"])
    return base.text_encoder, base.unet


def test_kohya_file_layout_metadata_and_a1111_hashes(lora_config_dict, tmp_path):
    result = fit(setup(parse_config({**lora_config_dict, "save_precision": "fp16", "conv_rank": 2})))
    blob = result.final_path.read_bytes()
    header_length = int.from_bytes(blob[:8], "little")
    with safe_open(str(result.final_path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert metadata["sshs_model_hash"] == hashlib.sha256(blob[8 + header_length :]).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in tensors)
    assert all(tensors[k].shape == () for k in tensors if k.endswith(".alpha"))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[name + ".lora_down.weight"].shape == (4, 64) and float(tensors[name + ".alpha"]) == 2.0
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[conv + ".lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[conv + ".lora_up.weight"].shape == (32, 2, 1, 1)
    assert "lora_adapter_metadata" not in metadata
    assert metadata["ss_output_name"] == "data" or metadata["ss_output_name"] == result.final_path.stem
    expected = {
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "2.0"}),
        "ss_sd_model_name": "tiny-sd1",
        "ss_resolution": "(32, 32)",
        "ss_num_train_images": "8",
        "ss_steps": "3",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "sdtune.kind": "lora",
        "sdtune.model_family": "sd1",
    }
    assert {k: metadata.get(k) for k in expected} == expected
    assert json.loads(metadata["ss_dataset_dirs"]) == {"star": {"n_repeats": 1, "img_count": 8}}
    tags = json.loads(metadata["ss_tag_frequency"])["star"]
    assert tags["a red <star> on a blue background"] == 1 and len(tags) == 8
    assert float(metadata["ss_training_started_at"]) <= float(metadata["ss_training_finished_at"])


def test_export_refuses_keys_that_name_no_module(tiny_base, tmp_path):
    base = models.load_base_model(tiny_base["folder"])
    key_map = formats.module_key_map(base.family, base.adaptable())
    good = formats.LoraModule(down=torch.zeros(2, 64), up=torch.zeros(64, 2), alpha=2.0)
    modules = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": good,
        "lora_te_encoder_layers_0_mlp_fc1": formats.LoraModule(torch.zeros(2, 32), torch.zeros(37, 2), 2.0),
    }
    target = tmp_path / "bad.safetensors"
    with pytest.raises(formats.FormatError, match="1 key\\(s\\) name no module of the base model: lora_te_encoder"):
        export.save_lora_kohya(target, modules, key_map, torch.float16, {})
    assert not target.exists()
    qkv_only = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": formats.LoraModule(
            torch.zeros(2, 32), torch.zeros(32, 2), 2.0
        )
    }
    with pytest.raises(formats.FormatError, match="only q/k/v projections"):
        export.save_lora_kohya(target, qkv_only, key_map, torch.float16, {})


def test_diffusers_layout_export_reloads_identically(lora_config_dict, tiny_base):
    run = setup(parse_config({**lora_config_dict, "export_formats": ["kohya", "diffusers"], "conv_rank": 2}))
    result = fit(run)
    folder = result.final_path.with_name(result.final_path.stem + "_diffusers")
    assert folder in result.saved_paths and (folder / "pytorch_lora_weights.safetensors").is_file()
    trained = _outputs(run.base.tokenizer, run.base.text_encoder, run.base.unet)
    pipe = _pipe(tiny_base, folder)
    reloaded = _outputs(pipe.tokenizer, pipe.text_encoder, pipe.unet)
    torch.testing.assert_close(reloaded[1], trained[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded[0], trained[0], rtol=0, atol=1e-5)


def test_continuing_from_a_file_starts_where_the_file_is(lora_config_dict, tiny_base, tmp_path):
    first = fit(setup(parse_config({**lora_config_dict, "conv_rank": 2, "save_precision": "fp16"})))
    settings = {k: v for k, v in lora_config_dict.items() if k not in ("lora_rank", "lora_alpha")}
    continued = setup(
        parse_config({**settings, "network_weights": str(first.final_path), "output_dir": str(tmp_path / "c")})
    )
    at_step_0 = _outputs(continued.base.tokenizer, continued.base.text_encoder, continued.base.unet)
    pipe = _pipe(tiny_base, first.final_path)
    loaded = _outputs(pipe.tokenizer, pipe.text_encoder, pipe.unet)
    torch.testing.assert_close(at_step_0[0], loaded[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(at_step_0[1], loaded[1], rtol=0, atol=1e-5)
    assert lora.main_rank(continued.base.unet, continued.base.text_encoder) == 4
    result = fit(continued)
    assert set(load_file(str(result.final_path))) == set(load_file(str(first.final_path)))
    # the config sets no conv_rank (the file decides), yet kohya's metadata must record the LoCon convs it holds
    with safe_open(str(first.final_path), "pt") as before, safe_open(str(result.final_path), "pt") as after:
        assert json.loads(after.metadata()["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
        assert after.metadata()["ss_network_args"] == before.metadata()["ss_network_args"]


def test_continuing_refuses_settings_that_contradict_the_file(lora_config_dict, tmp_path):
    from sdtune.preflight import preflight

    first = fit(setup(parse_config({**lora_config_dict, "train_text_encoder": False})))
    config = parse_config(
        {**lora_config_dict, "network_weights": str(first.final_path), "lora_rank": 8, "train_text_encoder": True}
    )
    with pytest.raises(ConfigError) as caught:
        preflight(config)
    joined = "\n".join(caught.value.errors)
    assert "lora_rank: 8 but network_weights" in joined and "has 4" in joined
    assert "train_text_encoder: true but network_weights" in joined and "has no lora_te_* modules" in joined


def test_continuing_from_a_hand_made_kohya_file(lora_config_dict, tiny_base, tmp_path):
    """A file in kohya's documented layout (as sd-scripts writes it for SD1), not made by sdtune."""
    torch.manual_seed(1)
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"  # a 1x1 Conv2d in SD1: factors [r, in, 1, 1], [out, r, 1, 1]
    tensors = {
        name + ".lora_down.weight": torch.randn(4, 64, 1, 1, dtype=torch.float16),
        name + ".lora_up.weight": torch.randn(64, 4, 1, 1, dtype=torch.float16) * 0.1,
        name + ".alpha": torch.tensor(1.0, dtype=torch.float16),
    }
    path = tmp_path / "kohya_made.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    raw = {k: v for k, v in lora_config_dict.items() if k not in ("lora_rank", "lora_alpha")}
    run = setup(parse_config({**raw, "network_weights": str(path)}))
    assert len(run.trainables.unet) == 2 and run.trainables.text_encoder == []
    at_step_0 = _outputs(run.base.tokenizer, run.base.text_encoder, run.base.unet)
    loaded = _outputs(*(lambda p: (p.tokenizer, p.text_encoder, p.unet))(_pipe(tiny_base, path)))
    torch.testing.assert_close(at_step_0[1], loaded[1], rtol=0, atol=1e-5)


def test_joint_ti_lora_writes_two_files_and_freezes_the_embedding(lora_config_dict, tmp_path):
    raw = {**lora_config_dict, "method": "ti+lora", "placeholder_token": "<star>", "init_word": "star"}
    raw.update({"max_steps": 4, "save_steps": 1, "embedding_train_fraction": 0.5, "embedding_lr": 5e-2})
    result = fit(setup(parse_config(raw)))
    out = result.final_path.parent
    assert result.final_path.name == "star_lora.safetensors"
    lora_keys = set(load_file(str(result.final_path)))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora_keys)  # no bundled embedding
    embeddings = [
        load_file(str(out / f"star{s}.safetensors"))["emb_params"]
        for s in ("-step00000001", "-step00000002", "-step00000003", "")
    ]
    assert not torch.equal(embeddings[0], embeddings[1])
    assert torch.equal(embeddings[1], embeddings[2]) and torch.equal(embeddings[2], embeddings[3])
    with safe_open(str(result.final_path), "pt") as handle:
        assert handle.metadata()["sdtune.companion_embedding"] == "star.safetensors"


def test_injection_fails_loudly_when_targets_match_nothing(tiny_base):
    base = models.load_base_model(tiny_base["folder"])
    with pytest.raises(ValueError, match="no LoRA target modules were found"):
        lora.inject(base.unet, {})
    with pytest.raises(ValueError, match="LoRA targets not found in the UNet2DConditionModel: mid_block.nope"):
        lora.inject(base.unet, {"mid_block.nope": (4, 4.0)})
    assert lora.unet_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), "kohya", 4, 4.0, None) == {}


def test_adapters_disabled_computes_the_base_model_and_keeps_trainability(tiny_base):
    components = models.load_base_model(str(tiny_base["folder"]))
    tokenizer, text_encoder, unet = components.tokenizer, components.text_encoder, components.unet
    base_hidden, base_out = _outputs(tokenizer, text_encoder, unet)
    params = lora.inject(unet, lora.unet_targets(unet, "cross_attention", 4, 4.0, None))
    params += lora.inject(text_encoder, lora.text_encoder_targets(text_encoder, "attention", 4, 4.0))
    with torch.no_grad():
        for param in params:
            param.add_(0.1)  # non-zero up factors: the adapted model differs from the base
    frozen = params[0]
    frozen.requires_grad_(False)
    adapted_hidden, adapted_out = _outputs(tokenizer, text_encoder, unet)
    assert not torch.allclose(adapted_out, base_out, atol=1e-4)
    with lora.adapters_disabled(unet, text_encoder):
        hidden, out = _outputs(tokenizer, text_encoder, unet)
    torch.testing.assert_close(hidden, base_hidden)
    torch.testing.assert_close(out, base_out)
    assert torch.equal(_outputs(tokenizer, text_encoder, unet)[1], adapted_out)
    assert not frozen.requires_grad and all(p.requires_grad for p in params[1:])


def test_empty_prior_prompt_distills_the_unconditional_prediction(lora_config_dict, tiny_base):
    """`""` among the prior prompts makes the target the base model's prediction for exactly the states that
    classifier-free guidance subtracts in diffusers' pipeline (its negative prompt embeddings)."""
    from diffusers import StableDiffusionPipeline

    from sdtune.train import _prior_loss

    prompts = ["a red circle on a blue background", ""]
    config = parse_config({**lora_config_dict, "prior_preservation_prompts": prompts})
    run = setup(config)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base["folder"]), safety_checker=None)
    _, unconditional = pipe.encode_prompt("a red circle", "cpu", 1, True)
    with torch.no_grad():
        ours = models.encode_prompts(run.base.family, run.base.components, [""], "cpu")
    torch.testing.assert_close(ours, unconditional)
    noisy, timesteps = torch.randn(1, 4, 4, 4), torch.tensor([500])
    with torch.no_grad():
        for param in run.trainables.unet:
            param.add_(0.05)
        adapted = run.unet(noisy, timesteps, ours).sample
        with lora.adapters_disabled(run.base.unet, run.base.text_encoder):
            base = run.base.unet(noisy, timesteps, unconditional).sample
    expected = torch.nn.functional.mse_loss(adapted, base)
    torch.testing.assert_close(_prior_loss(run, noisy, timesteps, [1]), expected)
    assert expected.item() > 0


def test_prior_preservation_pulls_towards_the_base_model(lora_config_dict, tiny_base):
    """At step 0 the LoRA is the identity, so the prior loss is exactly 0; it grows once the LoRA moves, and
    prompts that name the placeholder, or a weight without prompts, are refused."""
    from sdtune.train import _prior_loss

    prompts = ["a red circle on a blue background", "a green square on a white background"]
    config = parse_config({**lora_config_dict, "prior_preservation_prompts": prompts, "noise_offset": 0.1})
    run = setup(config)
    noisy, timesteps = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert _prior_loss(run, noisy, timesteps, [0, 1]).item() == 0.0
    with torch.no_grad():
        for param in run.trainables.unet:
            param.add_(0.05)
    loss = _prior_loss(run, noisy, timesteps, [0, 1])
    assert loss.item() > 0 and loss.requires_grad
    fit(run)  # trains end to end with both losses and the noise offset
    with pytest.raises(ConfigError, match="prior_loss_weight: has no effect without prior_preservation_prompts or"):
        parse_config({**lora_config_dict, "prior_loss_weight": 0.5})
    ti_lora = {**lora_config_dict, "method": "ti+lora", "placeholder_token": "<star>", "init_word": "star"}
    with pytest.raises(ConfigError, match="contains the placeholder '<star>'"):
        parse_config({**ti_lora, "prior_preservation_prompts": ["a <star> on a blue background"]})
    ti = {k: v for k, v in ti_lora.items() if k not in ("lora_rank", "lora_alpha", "save_precision")}
    with pytest.raises(ConfigError, match="prior_preservation_prompts: only used with method"):
        parse_config({**ti, "method": "ti", "prior_preservation_prompts": prompts})
