"""Dataset layouts people already have (kohya repeat folders, caption files, several subsets) and the caption
options (prefix/suffix, shuffle with keep_tokens, dropout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdtune import data
from sdtune.config import ConfigError, parse_config
from sdtune.preflight import steps_plan


def _image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def _lora_config(**raw):
    return parse_config({"method": "lora", "base_model": "m", "resolution": 16, **raw})


@pytest.fixture
def kohya_root(tmp_path) -> Path:
    root = tmp_path / "train"
    _image(root / "10_mychar woman" / "a.png")
    (root / "10_mychar woman" / "a.txt").write_text("mychar, red dress, smiling\n", encoding="utf-8")
    _image(root / "10_mychar woman" / "b.png")  # no caption file: the folder's class tokens
    _image(root / "2_style" / "c.png")
    return root


def test_kohya_repeat_folders_give_subsets_repeats_and_class_tokens(kohya_root):
    config = _lora_config(train_data_dir=str(kohya_root), batch_size=4)
    examples, errors = data.scan_dataset(config, None)
    assert errors == []
    assert len(examples) == 2 * 10 + 1 * 2
    captions = {e.image_path.name: e.caption for e in examples}
    assert captions == {"a.png": "mychar, red dress, smiling", "b.png": "mychar woman", "c.png": "style"}
    summary = data.dataset_summary(config, examples)
    assert summary["dataset_dirs"] == {
        "10_mychar woman": {"n_repeats": 10, "img_count": 2},
        "2_style": {"n_repeats": 2, "img_count": 1},
    }
    assert summary["tag_frequency"]["10_mychar woman"] == {
        "mychar": 1,
        "mychar woman": 1,
        "red dress": 1,
        "smiling": 1,
    }
    assert summary["num_images"] == 22
    assert steps_plan(config, len(examples))[0] == 6  # ceil(22 / 4) steps per epoch


def test_stray_images_and_folders_next_to_repeat_folders_are_errors(kohya_root):
    _image(kohya_root / "loose.png")
    (kohya_root / "logs").mkdir()
    _, errors = data.scan_dataset(_lora_config(train_data_dir=str(kohya_root)), None)
    assert "holds images next to kohya repeat folders" in errors[0] and "1_train/" in errors[0]
    assert "not repeat folders (`<repeats>_<class tokens>`): logs" in errors[1]


def test_the_caption_extension_pitfall_is_named(tmp_path):
    _image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.caption").write_text("a cat", encoding="utf-8")
    _, errors = data.scan_dataset(_lora_config(train_data_dir=str(tmp_path / "d")), None)
    assert errors == [
        f"{tmp_path / 'd'} has .caption files but caption_extension is '.txt', so they would be ignored. Set "
        "caption_extension: .caption."
    ]
    examples, errors = data.scan_dataset(
        _lora_config(train_data_dir=str(tmp_path / "d"), caption_extension=".caption"), None
    )
    assert errors == [] and examples[0].caption == "a cat"


def test_metadata_and_caption_files_together_need_a_choice(tmp_path):
    folder = tmp_path / "d"
    _image(folder / "a.png")
    (folder / "a.txt").write_text("from the file", encoding="utf-8")
    (folder / "metadata.csv").write_text("file_name,text\na.png,from the csv\n", encoding="utf-8")
    _, errors = data.scan_dataset(_lora_config(train_data_dir=str(folder)), None)
    assert "has both metadata.csv and 1 .txt caption file(s)" in errors[0] and "caption_source: files" in errors[0]
    for source, caption in (("files", "from the file"), ("metadata", "from the csv")):
        examples, errors = data.scan_dataset(_lora_config(train_data_dir=str(folder), caption_source=source), None)
        assert errors == [] and examples[0].caption == caption


def test_missing_and_unreadable_caption_files(tmp_path):
    folder = tmp_path / "d"
    _image(folder / "a.png")
    _image(folder / "b.png")
    (folder / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    _, errors = data.scan_dataset(_lora_config(train_data_dir=str(folder)), None)
    assert any(f"{folder / 'a.txt'}: not UTF-8 text" in e for e in errors)
    assert any("no .txt caption for b.png; write them, or set class_tokens" in e for e in errors)


def test_subsets_inherit_top_level_settings_and_report_their_own_keys(tmp_path):
    _image(tmp_path / "one" / "a.png")
    _image(tmp_path / "two" / "b.png")
    (tmp_path / "two" / "b.txt").write_text("blue car", encoding="utf-8")
    config = _lora_config(
        class_tokens="red thing",
        caption_prefix="trig",
        subsets=[{"image_dir": str(tmp_path / "one"), "num_repeats": 3}, {"image_dir": str(tmp_path / "two")}],
    )
    examples, errors = data.scan_dataset(config, None)
    assert errors == [] and len(examples) == 4
    assert [data.full_caption(e.caption, e.subset) for e in examples[2:]] == ["trig, red thing", "trig, blue car"]
    with pytest.raises(ConfigError) as error:
        _lora_config(subsets=[{"image_dir": "x", "num_repeat": 2}, {"num_repeats": 0}])
    message = str(error.value)
    assert "subsets[1].num_repeat: unknown key. Did you mean 'num_repeats'?" in message
    assert "subsets[2].num_repeats: must be at least 1, got 0." in message
    assert "subsets[2]: image_dir is required" in message
    with pytest.raises(ConfigError, match="train_data_dir, subsets: give one"):
        _lora_config(train_data_dir="x", subsets=[{"image_dir": "y"}])


def test_caption_prefix_satisfies_the_ti_placeholder_check(tmp_path):
    _image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.txt").write_text("a photo on a beach", encoding="utf-8")
    raw = {"method": "ti", "base_model": "m", "train_data_dir": str(tmp_path / "d"), "placeholder_token": "<me>"}
    raw |= {"init_word": "person", "resolution": 16}
    _, errors = data.scan_dataset(parse_config(raw), "<me>")
    assert "lack placeholder_token '<me>'" in errors[0] and "caption_prefix: <me>" in errors[0]
    _, errors = data.scan_dataset(parse_config({**raw, "caption_prefix": "<me>"}), "<me>")
    assert errors == []


def _captions(config, draws: int) -> list[str]:
    examples, errors = data.scan_dataset(config, None)
    assert errors == []
    dataset = data.ImageCaptionDataset(examples, config)
    return [dataset[(0, epoch)]["caption"] for epoch in range(draws)]  # the first image, epoch after epoch


def test_shuffle_keeps_the_first_tokens_and_every_tag(tmp_path):
    _image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.txt").write_text("mychar, red dress, smiling, outdoors, hat", encoding="utf-8")
    config = _lora_config(
        train_data_dir=str(tmp_path / "d"), shuffle_caption=True, keep_tokens=1, caption_suffix="end"
    )
    captions = _captions(config, 50)
    assert all(c.startswith("mychar, ") and c.endswith(", end") for c in captions)
    assert all(
        sorted(c.split(", ")) == sorted(["mychar", "red dress", "smiling", "outdoors", "hat", "end"]) for c in captions
    )
    assert len(set(captions)) > 5  # the other four tags really move
    assert captions == _captions(config, 50)  # keyed by seed, epoch and example: reproducible


def test_caption_dropout_empties_that_fraction_of_captions(tmp_path):
    _image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.txt").write_text("a cat", encoding="utf-8")
    captions = _captions(_lora_config(train_data_dir=str(tmp_path / "d"), caption_dropout_rate=0.3), 2000)
    assert set(captions) == {"", "a cat"}
    assert captions.count("") / 2000 == pytest.approx(0.3, abs=0.04)
    with pytest.raises(ConfigError, match="caption_dropout_rate: must be at most 1"):
        _lora_config(train_data_dir="x", caption_dropout_rate=1.5)


def test_data_command_reports_subsets_captions_tags_and_steps(kohya_root, tmp_path, capsys):
    from sdtune import cli

    config = tmp_path / "c.yaml"
    config.write_text(
        f"method: lora\nbase_model: {tmp_path}\ntrain_data_dir: {kohya_root}\nbatch_size: 4\nresolution: 16\n",
        encoding="utf-8",
    )
    assert cli.main(["data", str(config), "caption_prefix=trig"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"subset 1: {kohya_root / '10_mychar woman'} (train_data_dir)"
    assert out[1] == "  2 images x 10 repeats = 20 samples per epoch"
    assert out[2] == "  captions: 1 from caption files, 1 from class tokens"
    assert out[3] == "  caption options: prefix 'trig'"
    assert out[4].startswith("  top tags: trig (2), mychar (1), mychar woman (1)")
    assert out[-1] == (
        "total: 22 samples per epoch; 4 per batch x 1 accumulation -> 6 optimizer steps per epoch; "
        "60 steps in 10 epoch(s)"
    )
    (kohya_root / "stray").mkdir()
    assert cli.main(["data", str(config)]) == 2
    assert "not repeat folders" in capsys.readouterr().err


def test_the_lora_header_records_the_subsets(kohya_root, tiny_base, tmp_path):
    import json

    from safetensors import safe_open

    from sdtune.train import train

    raw = {"train_data_dir": str(kohya_root), "base_model": str(tiny_base["folder"]), "max_steps": 1, "lora_rank": 2}
    result = train(_lora_config(**raw, batch_size=4, output_dir=str(tmp_path / "out")))
    with safe_open(str(result.saved_paths[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "10_mychar woman": {"n_repeats": 10, "img_count": 2},
        "2_style": {"n_repeats": 2, "img_count": 1},
    }
    assert json.loads(metadata["ss_tag_frequency"])["2_style"] == {"style": 1}
    assert metadata["ss_num_train_images"] == "22" and metadata["ss_num_batches_per_epoch"] == "6"
