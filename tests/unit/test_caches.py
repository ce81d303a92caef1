"""Latent and text-encoder caches: training with them equals training without; an edited image is re-encoded; a
second run reads the disk cache instead of encoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_trained_alike
from PIL import Image
from safetensors.torch import load_file

from sdtune import data
from sdtune.config import ConfigError, parse_config
from sdtune.train import fit, setup

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "star"


@pytest.fixture
def config_dict(tiny_base, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(SAMPLE, folder)
    return {
        "method": "lora", "base_model": str(tiny_base["folder"]), "train_data_dir": str(folder), "resolution": 32,
        "batch_size": 4, "max_steps": 3, "lora_rank": 2, "learning_rate": 1e-2, "save_precision": "fp32",
        "train_text_encoder": False, "random_flip": True, "output_dir": str(tmp_path / "out"), "seed": 3,
    }  # fmt: skip


def _train(raw: dict, out: str) -> dict[str, torch.Tensor]:
    result = fit(setup(parse_config({**raw, "output_dir": out})))
    return load_file(str(result.final_path))


def test_cached_training_equals_uncached(config_dict, tmp_path):
    plain = _train(config_dict, str(tmp_path / "plain"))
    cached = _train(
        {**config_dict, "cache_latents": True, "cache_text_encoder_outputs": True}, str(tmp_path / "cached")
    )
    # same noise, same batches: only the VAE's batch composition differs (float noise, which Adam can turn into up to
    # one step on a near-zero gradient entry)
    assert_trained_alike(plain, cached, atol=2e-5, rtol=1e-4, step_size=config_dict["learning_rate"], steps=3)


def test_disk_cache_is_reused_and_an_edited_image_is_re_encoded(config_dict, tmp_path, monkeypatch):
    raw = {**config_dict, "cache_latents": True, "cache_latents_to_disk": True, "random_flip": False}
    first = setup(parse_config(raw))
    cache = first.loader.dataset.latent_cache if hasattr(first.loader, "dataset") else None
    assert cache is not None and cache.encoded == 8  # 8 images, one orientation
    assert len(list(cache.folder.glob("*.safetensors"))) == 8
    again = setup(parse_config(raw)).loader.dataset.latent_cache
    assert again.encoded == 0  # all 8 read from disk
    image = Path(raw["train_data_dir"]) / "star_00_blue.png"
    Image.open(image).rotate(90).save(image)
    edited = setup(parse_config(raw)).loader.dataset.latent_cache
    assert edited.encoded == 1  # only the edited image
    resized = setup(parse_config({**raw, "resolution": 16})).loader.dataset.latent_cache
    assert resized.encoded == 8  # another training size: other keys


def test_cache_settings_that_cannot_work_are_refused(config_dict):
    with pytest.raises(ConfigError) as error:
        parse_config({**config_dict, "cache_latents": True, "center_crop": False, "cache_latents_to_disk": False})
    assert "cache_latents: needs center_crop: true" in str(error.value)
    with pytest.raises(ConfigError, match="cache_latents_to_disk: has no effect without cache_latents"):
        parse_config({**config_dict, "cache_latents_to_disk": True})
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs: the text path trains"):
        parse_config({**config_dict, "cache_text_encoder_outputs": True, "train_text_encoder": True})


def test_cache_keys_follow_content_size_and_flip(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(image)
    cache = data.LatentCache(None, "vae-1")
    key = cache.key(image, (32, 32), False)
    assert key != cache.key(image, (32, 48), False) != cache.key(image, (32, 32), True)
    assert key != data.LatentCache(None, "vae-2").key(image, (32, 32), False)
