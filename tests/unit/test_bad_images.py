"""Images people really have: broken, truncated, CMYK, 16-bit, palette, alpha, EXIF-rotated, tiny, huge. Each is
found before training with a message naming the file, or loaded as a viewer shows it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune import data
from sdtune.config import parse_config


def _config(folder: Path, **extra):
    return parse_config(
        {"method": "lora", "base_model": "m", "train_data_dir": str(folder), "resolution": 32, **extra}
    )


def _png(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_each_bad_file_is_named_before_training(tmp_path, monkeypatch):
    good = _png(Image.new("RGB", (32, 32), "red"), tmp_path / "good.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buffer, format="PNG", compress_level=0)
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    _png(Image.new("RGB", (3, 3), "green"), tmp_path / "tiny.png")
    _png(Image.new("RGB", (300, 300), "white"), tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # 300x300 is then over PIL's safety limit
    examples, errors = data.scan_dataset(_config(tmp_path), None)
    joined = "\n".join(errors)
    assert f"{tmp_path / 'truncated.png'}: not a readable image" in joined
    assert f"{tmp_path / 'notes.png'}: not a readable image (UnidentifiedImageError" in joined
    assert f"{tmp_path / 'tiny.png'}: 3x3 would be upscaled more than 8x to reach resolution 32" in joined
    assert f"{tmp_path / 'huge.png'}: too large to decode safely" in joined
    assert all(e.endswith("(or set bad_images: skip to train without them)") for e in errors)
    assert len(errors) == 4

    skipped: list[str] = []
    examples, errors = data.scan_dataset(_config(tmp_path, bad_images="skip"), None, skipped)
    assert errors == [] and [e.image_path for e in examples] == [good]
    assert len(skipped) == 4 and any("tiny.png" in reason for reason in skipped)


def _loaded(path: Path) -> np.ndarray:
    return np.asarray(data.load_rgb(path))


def test_unusual_modes_load_as_a_viewer_shows_them(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    assert np.abs(_loaded(cmyk)[0, 0].astype(int) - [255, 0, 0]).max() < 8

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(deep)  # 16-bit mid grey
    assert Image.open(deep).mode.startswith("I")
    assert _loaded(deep)[0, 0].tolist() == [128, 128, 128]

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    _png(palette, tmp_path / "palette.png")
    assert _loaded(tmp_path / "palette.png")[0, 0].tolist() == [255, 255, 255]  # transparent: over white

    rgba = Image.new("RGBA", (8, 8), (0, 255, 0, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 0))
    _png(rgba, tmp_path / "alpha.png")
    assert _loaded(tmp_path / "alpha.png")[0, 0].tolist() == [255, 255, 255]
    assert _loaded(tmp_path / "alpha.png")[1, 1].tolist() == [0, 255, 0]


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (16, 8), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert data.load_rgb(tmp_path / "rotated.jpg").size == (8, 16)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_folder_of_only_bad_images_never_trains(tmp_path, policy):
    (tmp_path / "a.png").write_text("x", encoding="utf-8")
    examples, errors = data.scan_dataset(_config(tmp_path, bad_images=policy), None)
    assert errors  # problems stop `train` before any model loads
    if policy == "skip":
        assert examples == [] and errors[-1].endswith(": no usable image left.")
