"""Regularization (class) images as kohya / DreamBooth use them: `reg_data_dir` or subsets with `is_reg`, balanced
to the training samples, their loss weighted by `prior_loss_weight`, recorded in the LoRA metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune import data, preflight, train
from sdtune.config import ConfigError, parse_config


def _images(folder: Path, count: int, seed: int = 0, caption: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
        if caption:
            (folder / f"{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def _config(tmp_path: Path, **raw):
    return parse_config({"method": "lora", "base_model": "m", "resolution": 32, **raw})


def test_regularization_samples_match_the_training_samples(tmp_path):
    train_dir = _images(tmp_path / "train" / "3_mychar woman", 2)
    few = _images(tmp_path / "few" / "1_woman", 4, seed=1)
    many = _images(tmp_path / "many" / "1_woman", 10, seed=2)
    for reg_root, used in ((few.parent, 4), (many.parent, 6)):
        config = _config(tmp_path, train_data_dir=str(train_dir.parent), reg_data_dir=str(reg_root), batch_size=4)
        examples, errors = data.scan_dataset(config, None)
        assert errors == []
        reg = [e for e in examples if e.subset.is_reg]
        assert len(examples) == 6 + 6 and len(reg) == 6  # 2 images x 3 repeats, and as many reg samples
        assert len({e.image_path for e in reg}) == used  # 4 cycled, or the first 6 of 10
        assert {e.caption for e in reg} == {"woman"}  # class tokens of the folder
        summary = data.dataset_summary(config, examples)
        assert summary["num_images"] == 6 and summary["num_reg_images"] == used
        assert summary["reg_dataset_dirs"] == {"1_woman": {"n_repeats": 1, "img_count": used}}
        assert preflight.steps_plan(config, len(examples))[0] == 3  # 12 samples per epoch, batches of 4
    report = "\n".join(data.describe_dataset(examples))
    assert "(reg_data_dir, regularization)" in report and "regularization: 6 samples per epoch" in report


def test_regularization_subsets_need_captions_and_training_subsets(tmp_path):
    train_dir = _images(tmp_path / "t", 2, caption="a photo of <me>")
    plain = _images(tmp_path / "reg", 2)
    raw = {"subsets": [{"image_dir": str(train_dir)}, {"image_dir": str(plain), "is_reg": True}]}
    _, errors = data.scan_dataset(_config(tmp_path, **raw), None)
    assert "regularization images 0.png, 1.png have no caption" in errors[0] and "1_woman" in errors[0]
    missing = tmp_path / "no-such-folder"
    _, errors = data.scan_dataset(_config(tmp_path, train_data_dir=str(train_dir), reg_data_dir=str(missing)), None)
    assert errors == [f"reg_data_dir: {missing} is not a folder (missing or a file); check the path."]
    with pytest.raises(ConfigError, match="subsets\\[2\\].is_reg: expected true or false, got 'yes'"):
        _config(tmp_path, subsets=[{"image_dir": str(train_dir)}, {"image_dir": str(plain), "is_reg": "yes"}])
    with pytest.raises(ConfigError, match="every subset has is_reg: true"):
        _config(tmp_path, subsets=[{"image_dir": str(plain), "is_reg": True}])
    # TI: class images name the class, not the placeholder, and that is fine
    raw = {"method": "ti", "placeholder_token": "<me>", "init_word": "person", "train_data_dir": str(train_dir)}
    config = _config(tmp_path, **raw, reg_data_dir=str(_images(tmp_path / "r2" / "1_person", 2).parent))
    examples, errors = data.scan_dataset(config, "<me>")
    assert errors == [] and sum(e.subset.is_reg for e in examples) == 2


def _train(tmp_path: Path, tiny_base, reg_seed: int, weight: float, name: str) -> dict[str, torch.Tensor]:
    train_dir = _images(tmp_path / "train" / "2_mychar", 2, seed=10)
    reg_dir = _images(tmp_path / f"reg{reg_seed}" / "1_person", 4, seed=reg_seed)
    config = parse_config(
        {
            "method": "lora", "base_model": str(tiny_base["checkpoint"]), "train_data_dir": str(train_dir.parent),
            "reg_data_dir": str(reg_dir.parent), "prior_loss_weight": weight, "resolution": 32, "batch_size": 4,
            "max_steps": 3, "lora_rank": 2, "learning_rate": 1e-2, "save_precision": "fp32", "seed": 3,
            "output_dir": str(tmp_path / name),
        }
    )  # fmt: skip
    result = train.train(config)
    with safe_open(str(result.final_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_reg_images"] == "4" and metadata["ss_prior_loss_weight"] == str(weight)
    assert metadata["ss_num_train_images"] == "4" and '"1_person"' in metadata["ss_reg_dataset_dirs"]
    return load_file(str(result.final_path))


def test_prior_loss_weight_scales_what_regularization_images_teach(tiny_base, tmp_path):
    # weight 0: which class images are there cannot matter; weight 1: it does
    silent_a, silent_b = (_train(tmp_path, tiny_base, seed, 0.0, f"w0-{seed}") for seed in (1, 2))
    heard_a, heard_b = (_train(tmp_path, tiny_base, seed, 1.0, f"w1-{seed}") for seed in (1, 2))
    for key in silent_a:
        torch.testing.assert_close(silent_a[key], silent_b[key], rtol=0, atol=1e-7)
    assert max((heard_a[k] - heard_b[k]).abs().max().item() for k in heard_a) > 1e-4
