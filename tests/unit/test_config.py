"""Config parsing and validation: what a user typing YAML relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_scripts_example import LORA_SCRIPTS_EXAMPLE
from sdtune import config as cfg
from sdtune.config import ConfigError, load_config, parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def _errors(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return caught.value.errors


def test_lora_scripts_keys_are_accepted_verbatim_and_2e4_is_a_number():
    raw = yaml.safe_load(LORA_SCRIPTS_EXAMPLE)
    assert raw["learning_rate"] == "2e-4"  # YAML 1.1 really reads it as text
    config = parse_config(raw)
    assert config.learning_rate == pytest.approx(0.0002)
    assert (config.method, config.lora_rank, config.lora_alpha, config.batch_size) == ("lora", 8, 16.0, 4)
    assert (config.epochs, config.save_steps, config.output_dir) == (10, 100, "./output/anime_lora")


def test_unknown_key_names_the_closest_valid_key():
    errors = _errors({"base_model": "m", "train_data_dir": "d", "learning_rat": 1e-4, "max_train_step": 5})
    assert "learning_rat: unknown key. Did you mean 'learning_rate'?" in errors
    assert "max_train_step: unknown key. Did you mean 'max_steps'?" in errors


def test_wrong_types_name_key_value_and_expectation():
    errors = _errors({"base_model": "m", "train_data_dir": "d", "batch_size": "four", "random_flip": "maybe"})
    assert "batch_size: expected a whole number, got 'four'." in errors
    assert "random_flip: expected true or false, got 'maybe'." in errors


def test_choices_suggest_the_closest_value():
    errors = _errors({"base_model": "m", "train_data_dir": "d", "lr_scheduler": "cosin"})
    assert any(e.startswith("lr_scheduler: 'cosin' is not one of") and "did you mean 'cosine'" in e for e in errors)


def test_all_errors_are_reported_together():
    errors = _errors({"method": "ti", "batch_size": 0, "resolution": 100, "lora_rank": 4, "colour": 1})
    joined = "\n".join(errors)
    for fragment in (
        "colour: unknown key",
        "batch_size: must be at least 1, got 0",
        "base_model: required",
        "train_data_dir: required",
        "placeholder_token: required for method 'ti'",
        "init_word: required for method 'ti'",
        "lora_rank: only used with method 'lora' or 'ti+lora'",
        "resolution: must be a multiple of 8",
    ):
        assert fragment in joined
    assert len(errors) == 8


def test_method_specific_keys_are_refused_rather_than_ignored():
    errors = _errors({"base_model": "m", "train_data_dir": "d", "method": "lora", "init_word": "cat"})
    assert errors == ["init_word: only used with method 'ti' or 'ti+lora' (method is 'lora'); remove it."]


def test_kohya_and_diffusers_aliases_map_to_fields_and_conflicts_are_errors():
    config = parse_config(
        {
            "pretrained_model_name_or_path": "m",
            "train_data_dir": "d",
            "method": "ti",
            "token_string": "<x>",
            "initializer_token": "cat",
            "num_vectors_per_token": 3,
            "max_train_steps": "1e3",
            "train_batch_size": 2,
        }
    )
    assert (config.base_model, config.placeholder_token, config.init_word) == ("m", "<x>", "cat")
    assert (config.num_vectors, config.max_steps, config.batch_size) == (3, 1000, 2)
    errors = _errors({"base_model": "m", "pretrained_model_name_or_path": "n", "train_data_dir": "d"})
    assert errors == [
        "pretrained_model_name_or_path: sets 'base_model', which is already set (by 'base_model'); keep one."
    ]


def test_defaults_depend_on_method():
    ti = parse_config(
        {"base_model": "m", "train_data_dir": "d", "method": "ti", "placeholder_token": "<a-b>", "init_word": "x"}
    )
    assert ti.learning_rate == 5e-3
    assert ti.num_vectors == 1
    assert ti.output_name == "a-b"
    lora = parse_config({"base_model": "m", "train_data_dir": "d"})
    assert lora.method == "lora" and lora.learning_rate == 1e-4


def test_warmup_with_constant_schedule_is_an_error():
    errors = _errors({"base_model": "m", "train_data_dir": "d", "lr_warmup_steps": 10})
    assert errors == ["lr_warmup_steps: has no effect with lr_scheduler 'constant'; use 'constant_with_warmup'."]


def test_missing_files_and_folders_are_reported_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"base_model: {tmp_path / 'nope.safetensors'}\ntrain_data_dir: {tmp_path / 'no_images'}\n"
        f"metadata_path: {tmp_path / 'meta.csv'}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [
        f"base_model: {tmp_path / 'nope.safetensors'} does not exist.",
        f"train_data_dir: {tmp_path / 'no_images'} is not a folder.",
        f"metadata_path: {tmp_path / 'meta.csv'} does not exist.",
    ]


def test_overrides_are_read_as_yaml_and_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: {tmp_path}\ntrain_data_dir: {tmp_path}\nbatch_size: 1\n", encoding="utf-8")
    (tmp_path / "model_index.json").write_text("{}", encoding="utf-8")
    config = load_config(path, ["batch_size=3", "learning_rate=3e-4", "random_flip=true", "max_steps=null"])
    assert (config.batch_size, config.learning_rate, config.random_flip, config.max_steps) == (3, 3e-4, True, None)
    with pytest.raises(ConfigError, match="override 'batch_size': expected key=value"):
        load_config(path, ["batch_size"])


def test_invalid_yaml_and_non_mapping_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["a", "b"])


def test_config_reference_documents_every_field_and_docs_are_current():
    reference = cfg.config_reference()
    for name in cfg.FIELDS:
        assert f"| `{name}` |" in reference
        assert cfg.FIELDS[name].metadata["doc"]
    docs = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert reference in docs, "docs/configuration.md is stale: run `python tools/gen_config_docs.py`"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path, tiny_base, tiny_sdxl, tiny_sd2, monkeypatch):
    from sdtune.preflight import preflight

    monkeypatch.chdir(REPO_ROOT)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#") and "sdtune " in text.splitlines()[1], "configs open with the command that runs them"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, f"{path.name}: every key has a comment: {line!r}"
    overrides = [f"base_model={tiny_base['folder']}"]
    if "sdxl" in path.name:  # the 64 px sample images are too small for 1024 px (refused: upscaled more than 8x);
        overrides = [f"base_model={tiny_sdxl['folder']}"]  # the world configs train their 32 px images at 32
        overrides += [] if path.name.startswith("world") else ["resolution=512"]
    if "sd2" in path.name:
        overrides = [f"base_model={tiny_sd2['v_folder' if 'v' in path.stem.split('_')[-1] else 'folder']}"]
        overrides += ["resolution=512"]
    assert preflight(load_config(path, overrides))


def test_text_lists_and_sample_settings():
    config = parse_config(
        {
            "base_model": "m",
            "train_data_dir": "d",
            "sample_prompts": "a cat, sitting",
            "export_formats": "kohya,diffusers",
        }
    )
    assert config.sample_prompts == ("a cat, sitting",) and config.export_formats == ("kohya", "diffusers")
    errors = _errors({"base_model": "m", "train_data_dir": "d", "sample_steps": 5, "export_formats": ["onnx"]})
    assert "sample_steps: has no effect without sample_prompts; add prompts or remove it." in errors
    assert "export_formats: 'onnx' is not one of 'kohya', 'diffusers'." in errors
