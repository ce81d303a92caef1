"""Base models: family detection, the two load paths, offline tokenizer, safe legacy loading, hashing."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from sdtune import families, models
from sdtune.models import ModelError, detect_family, load_base_model


def _write_keys(path, keys: dict[str, tuple[int, ...]]):
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def loaded_pair(tiny_base):
    return load_base_model(tiny_base["folder"]), load_base_model(tiny_base["checkpoint"])


def test_offline_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = models.build_clip_tokenizer()
    reference = SimpleTokenizer()
    assert len(tokenizer) == 49408
    for prompt in ("a photo of a cat, highly detailed", "Ünïcode café — 東京 naïve", "((masterpiece)), 1girl"):
        ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
        expected = reference(prompt)[0].tolist()
        length = ids.index(49407) + 1
        assert ids[:length] == expected[:length]
        assert ids[length:] == [49407] * (77 - length)  # SD1.x pads with <|endoftext|>


def test_folder_and_single_file_give_identical_components(loaded_pair):
    folder, single = loaded_pair
    assert folder.family.name == single.family.name == "sd1"
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    assert models.tokenizer_fingerprint(folder.tokenizer) == models.tokenizer_fingerprint(single.tokenizer)
    assert folder.scheduler_config == single.scheduler_config
    assert folder.prediction_type == "epsilon" and folder.text_width == 32
    assert not any(p.requires_grad for p in single.unet.parameters())


def test_checkpoint_keys_use_original_names(tiny_base):
    keys = models.read_checkpoint_header(tiny_base["checkpoint"])[0]
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    assert families.SD1.text_encoders[0].checkpoint_prefix + "embeddings.token_embedding.weight" in keys


def test_legacy_ckpt_loads_with_weights_only(tiny_base, tmp_path, loaded_pair):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_base["checkpoint"])), "global_step": 10}, ckpt)
    metadata = models.read_checkpoint_header(tiny_base["checkpoint"])[1]
    loaded = load_base_model(ckpt, config_dir=models._config_dir_for(metadata, families.SD1))
    reference = loaded_pair[0].unet.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.unet.state_dict().items())


class _Payload:
    """An arbitrary object: `torch.load(weights_only=True)` must refuse to unpickle it."""


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(ModelError, match="weights_only=True"):
        detect_family(path)


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        ({"conditioner.embedders.0.model.text_projection": (4, 4)}, "SDXL refiner"),
        ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (4,)}, "Stable Diffusion 3.x"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "FLUX"),
    ],
)
def test_unsupported_families_are_refused_by_name(tmp_path, keys, family):
    path = _write_keys(tmp_path / "model.safetensors", keys)
    with pytest.raises(ModelError, match=f"is a {family} model, which this version of sdtune does not support yet"):
        load_base_model(path)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)},
            "is a LoRA file, not a base model",
        ),
        ({"emb_params": (1, 768)}, "is a textual inversion embedding"),
        ({"encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3)}, "is a VAE"),
        ({"down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "holds one diffusers component"),
        ({"something.else": (2,)}, "not a Stable Diffusion checkpoint sdtune recognises (keys: something.else)"),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3),
                families.SD1.text_encoders[0].checkpoint_prefix + "x": (1,),
            },
            "is an inpainting Stable Diffusion 1.x model",
        ),
    ],
)
def test_files_that_are_not_base_models_get_a_clear_message(tmp_path, keys, message):
    path = _write_keys(tmp_path / "thing.safetensors", keys)
    with pytest.raises(ModelError, match=re.escape(message)):
        detect_family(path)


def test_damaged_safetensors_and_non_diffusers_folder(tmp_path):
    damaged = tmp_path / "broken.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="is not a readable .safetensors file"):
        detect_family(damaged)
    with pytest.raises(ModelError, match="without model_index.json"):
        detect_family(tmp_path)


def test_sd2_folder_is_detected(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_act": "gelu", "hidden_size": 1024}))
    assert detect_family(tmp_path) == "sd2"


def test_checkpoint_that_does_not_match_the_shipped_config_says_how_to_fix_it(tiny_base, tmp_path):
    from safetensors.torch import load_file

    bare = tmp_path / "tiny-no-config.safetensors"
    save_file(load_file(str(tiny_base["checkpoint"])), str(bare))  # drops sdtune's embedded config
    with pytest.raises(ModelError) as caught:
        load_base_model(bare)
    assert "UNet width 32 (config: 320)" in str(caught.value)
    assert "text encoder width 32 (config: 768)" in str(caught.value)
    assert "Set base_model_config" in str(caught.value)
    assert list(load_base_model(bare, config_dir=tiny_base["folder"]).unet.config.block_out_channels) == [32, 64]


def test_base_model_hash_matches_sha256_of_the_file_and_is_cached(tiny_base):
    path = tiny_base["checkpoint"]
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert models.base_model_sha256(path) == expected
    cache = json.loads((models.cache_dir() / "hashes.json").read_text())
    assert cache[str(path.resolve())]["sha256"] == expected
    folder_hash = models.base_model_sha256(tiny_base["folder"])
    assert len(folder_hash) == 64 and folder_hash != expected
