"""Dataset scanning (problems found before any model loads) and image preprocessing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune import data
from sdtune.config import parse_config

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data" / "star"


def _config(folder: Path, **extra):
    raw = {"method": "ti", "base_model": "m", "train_data_dir": str(folder), "placeholder_token": "<star>"}
    return parse_config({**raw, "init_word": "star", "resolution": 32, **extra})


@pytest.fixture
def folder(tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, target)
    return target


def test_sample_data_scans_clean():
    examples, errors = data.scan_dataset(_config(SAMPLE_DATA), "<star>")
    assert errors == [] and len(examples) == 8
    assert examples[0].caption == "a red <star> on a blue background"


def test_no_metadata_means_template_captions(folder):
    (folder / "metadata.csv").unlink()
    examples, errors = data.scan_dataset(_config(folder), "<star>")
    assert errors == [] and all(example.caption is None for example in examples)
    dataset = data.ImageCaptionDataset(examples, _config(folder, learnable_property="style"), templates_subject="<s>")
    caption = dataset[0]["caption"]
    assert caption in [template.format("<s>") for template in data.STYLE_TEMPLATES]


def test_metadata_problems_are_all_named(folder):
    (folder / "metadata.csv").write_text(
        "file_name,text\nstar_00_blue.png,a red <star>\nstar_00_blue.png,again <star>\nghost.png,a <star>\n"
        "star_01_green.png,a red star\n",
        encoding="utf-8",
    )
    _, errors = data.scan_dataset(_config(folder), "<star>")
    joined = "\n".join(errors)
    assert "line 3: 'star_00_blue.png' is listed twice" in joined
    assert "names files not in" in joined and "ghost.png" in joined
    assert "has no row for star_02_yellow.png" in joined and "and 1 more" in joined
    assert "the captions of star_01_green.png lack placeholder_token '<star>'" in joined


def test_missing_columns_and_non_utf8(folder):
    (folder / "metadata.csv").write_text("image,caption\na.png,x\n", encoding="utf-8")
    _, errors = data.scan_dataset(_config(folder), "<star>")
    assert "has no 'file_name' or 'text' column (columns: image, caption)" in errors[0]
    (folder / "metadata.csv").write_bytes("file_name,text\nstar_00_blue.png,caf\xe9 <star>\n".encode("latin-1"))
    _, errors = data.scan_dataset(_config(folder), "<star>")
    assert "is not UTF-8 text" in errors[0]


def test_caption_column_is_configurable(folder):
    text = (folder / "metadata.csv").read_text(encoding="utf-8").replace("file_name,text", "file_name,prompt")
    (folder / "metadata.csv").write_text(text, encoding="utf-8")
    examples, errors = data.scan_dataset(_config(folder, caption_column="prompt"), "<star>")
    assert errors == [] and len(examples) == 8


def test_broken_images_and_empty_folders(folder, tmp_path):
    (folder / "star_03_white.png").write_bytes(b"not a png")
    _, errors = data.scan_dataset(_config(folder), "<star>")
    assert any("star_03_white.png: not a readable image" in error for error in errors)
    empty = tmp_path / "empty"
    empty.mkdir()
    _, errors = data.scan_dataset(_config(empty), "<star>")
    assert errors == [f"train_data_dir: {empty} holds no images (.png, .jpg, .jpeg, .webp, .bmp)."]


def test_pixels_are_square_in_range_and_alpha_goes_on_white(tmp_path):
    image = Image.new("RGBA", (80, 40), (255, 0, 0, 0))
    image.save(tmp_path / "clear.png")
    config = _config(tmp_path, resolution=32)
    dataset = data.ImageCaptionDataset([data.Example(tmp_path / "clear.png", "x")], config)
    pixels = dataset[0]["pixel_values"]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, torch.ones_like(pixels))  # transparent -> white background, scaled to 1.0


def test_random_crop_is_reproducible_with_the_seed(folder):
    config = _config(folder, resolution=24, center_crop=False, random_flip=True)
    examples, _ = data.scan_dataset(config, "<star>")
    dataset = data.ImageCaptionDataset(examples, config)
    torch.manual_seed(3)
    first = [dataset[i]["pixel_values"] for i in range(4)]
    torch.manual_seed(3)
    second = [dataset[i]["pixel_values"] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
