"""The real `sdtune` command on tiny models: files, metadata, logs, step arithmetic, early errors."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts_example import LORA_SCRIPTS_EXAMPLE
from sdtune import cli, models
from sdtune.config import ConfigError, parse_config
from sdtune.train import train

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdtune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_train_command_writes_embedding_metadata_and_logs(tiny_base, tmp_path):
    out = tmp_path / "out"
    completed = _run(
        "train",
        "configs/quickstart_ti.yaml",
        f"base_model={tiny_base['checkpoint']}",
        f"output_dir={out}",
        "max_steps=4",
        "save_steps=2",
        "resolution=32",
    )
    assert completed.returncode == 0, completed.stderr
    assert f"wrote {out / 'star-step00000002.safetensors'}" in completed.stdout
    assert f"wrote {out / 'star.safetensors'}" in completed.stdout
    assert re.search(r"\d+\.\d+(step/s|s/step)", completed.stderr), "progress bar shows the rate"
    with safe_open(str(out / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        assert list(handle.keys()) == ["emb_params"]
        vectors = handle.get_tensor("emb_params")
    assert vectors.shape == (2, 32) and vectors.dtype == torch.float32
    base = models.load_base_model(tiny_base["checkpoint"])
    expected = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
        "modelspec.title": "star",
        "modelspec.trigger_phrase": "star",
        "modelspec.resolution": "32x32",
        "modelspec.prediction_type": "epsilon",
        "sdtune.kind": "textual_inversion",
        "sdtune.model_family": "sd1",
        "sdtune.text_encoder_width": "32",
        "sdtune.tokenizer_fingerprint": models.tokenizer_fingerprint(base.tokenizer),
        "sdtune.base_model_name": "tiny-sd1",
        "sdtune.base_model_sha256": hashlib.sha256(tiny_base["checkpoint"].read_bytes()).hexdigest(),
        "sdtune.placeholder_token": "<star>",
        "sdtune.num_vectors": "2",
        "sdtune.init_word": "star",
        "sdtune.steps": "4",
    }
    assert {key: metadata.get(key) for key in expected} == expected
    assert load_file(str(out / "star-step00000002.safetensors"))["emb_params"].shape == (2, 32)
    scalars = _scalars(out / "logs")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["lr/embedding"]] == pytest.approx([5e-3] * 4)
    assert all(value > 0 for _, value in scalars["loss"])
    losses = [value for _, value in scalars["loss"]]
    assert scalars["loss/epoch_mean"] and all(min(losses) <= v <= max(losses) for _, v in scalars["loss/epoch_mean"])
    assert [step for step, _ in scalars["speed/samples_per_second"]] == [1, 2, 3, 4]
    assert all(value > 0 for _, value in scalars["speed/samples_per_second"] + scalars["memory/peak_rss_mib"])
    assert scalars["hparam/steps"] == [(0, 4.0)]  # the HPARAMS tab's metrics, next to the run's settings
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_gradient_accumulation_and_epochs_give_the_planned_steps(ti_config_dict, tmp_path):
    config = parse_config({**ti_config_dict, "max_steps": None, "epochs": 2, "gradient_accumulation_steps": 2})
    result = train(config)
    # 8 images / batch 2 = 4 batches per epoch = 2 optimizer steps per epoch; 2 epochs = 4 steps.
    assert result.steps == 4
    assert [step for step, _ in _scalars(Path(config.output_dir) / "logs")["loss"]] == [1, 2, 3, 4]


def test_same_seed_same_embedding(ti_config_dict, tmp_path):
    first = train(parse_config({**ti_config_dict, "output_dir": str(tmp_path / "a")}))
    second = train(parse_config({**ti_config_dict, "output_dir": str(tmp_path / "b")}))
    other = train(parse_config({**ti_config_dict, "output_dir": str(tmp_path / "c"), "seed": 8}))
    a, b, c = (load_file(str(r.final_path))["emb_params"] for r in (first, second, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_input_is_reported_before_any_model_loads(ti_config_dict, tmp_path, monkeypatch, capsys):
    import yaml

    data_dir = tmp_path / "data"
    shutil.copytree(REPO_ROOT / "sample_data" / "star", data_dir)
    (data_dir / "star_02_yellow.png").write_bytes(b"broken")
    path = tmp_path / "bad.yaml"
    raw = {**ti_config_dict, "train_data_dir": str(data_dir), "placeholder_token": "cat", "init_word": "cat"}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")

    def _must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_base_model", _must_not_load)
    for command in ("validate", "train"):
        assert cli.main([command, str(path)]) == cli.EXIT_BAD_INPUT
        message = capsys.readouterr().err
        assert "star_02_yellow.png: not a readable image" in message
        assert "'cat' is already a word of the CLIP vocabulary" in message
        assert "lack placeholder_token 'cat'" in message


def test_config_errors_exit_2_with_every_problem(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("base_modle: x\ntrain_data_dir: y\nlearning_rate: fast\n", encoding="utf-8")
    completed = _run("validate", str(path))
    assert completed.returncode == 2
    assert "base_modle: unknown key. Did you mean 'base_model'?" in completed.stderr
    assert "learning_rate: expected a number (e.g. 1e-4 or 0.0001), got 'fast'." in completed.stderr
    assert "base_model: required." in completed.stderr


def test_readme_quickstart_command_runs_as_written(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"```bash\n(pip install -e \. && sdtune train .+)\n```", readme).group(1)
    command = command.replace("pip install -e . && ", "")  # the package is already installed for the tests
    command += " max_steps=40"  # the full run is what tests/integration/test_learning.py measures; this checks paths
    for name in ("configs", "sample_data"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    output = tmp_path / "output" / "red_star"
    assert (output / "star.safetensors").is_file() and (output / "star_lora.safetensors").is_file()  # TI + LoRA
    samples = sorted(p.name for p in (output / "samples").iterdir())
    assert samples == ["progress.png", "step00000000.png", "step00000040.png"]
    from PIL import Image

    with Image.open(output / "samples" / "progress.png") as progress:
        assert progress.size == (8 * 128, 2 * 128)  # 8 prompts, 32 px upscaled to 128; before and after


def test_validate_prints_the_step_arithmetic(tiny_base):
    completed = _run(
        "validate",
        "configs/quickstart_ti.yaml",
        f"base_model={tiny_base['folder']}",
        "batch_size=3",
        "gradient_accumulation_steps=2",
        "max_steps=null",
        "epochs=3",
    )
    assert completed.returncode == 0, completed.stderr
    assert "8 images, 8 with captions" in completed.stdout
    assert "3 images per batch x 2 accumulation = 6 per optimizer step" in completed.stdout
    assert "2 optimizer steps per epoch, 6 steps in 3 epoch(s)" in completed.stdout


def test_steps_plan_arithmetic(ti_config_dict):
    from sdtune.preflight import steps_plan

    plan = parse_config({**ti_config_dict, "max_steps": None, "epochs": 5, "batch_size": 4})
    assert steps_plan(plan, 10) == (3, 15, 5)  # ceil(10/4) = 3 batches = 3 steps per epoch
    plan = parse_config({**ti_config_dict, "max_steps": 7, "batch_size": 4, "gradient_accumulation_steps": 2})
    assert steps_plan(plan, 10) == (2, 7, 4)


def test_placeholder_cut_off_by_the_77_token_limit_is_an_error(ti_config_dict, tmp_path, caplog):
    from sdtune.config import ConfigError
    from sdtune.preflight import preflight

    data_dir = tmp_path / "data"
    shutil.copytree(REPO_ROOT / "sample_data" / "star", data_dir)
    lines = (data_dir / "metadata.csv").read_text(encoding="utf-8").splitlines()
    long_prefix = "very " * 80
    lines[1] = lines[1].replace("a red <star>", f"{long_prefix}red <star>")
    lines[2] = lines[2].replace("background", "background " + "with many details " * 30)
    (data_dir / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        preflight(parse_config({**ti_config_dict, "train_data_dir": str(data_dir)}))
    assert len(caught.value.errors) == 1
    assert "star_00_blue.png: the caption is" in caught.value.errors[0]
    assert "the placeholder '<star>' falls after the cut" in caught.value.errors[0]
    assert "2 caption(s) exceed 75 tokens and are cut: star_00_blue.png, star_01_green.png" in caplog.text


def test_lora_scripts_yaml_trains_with_only_base_data_and_steps(tiny_base, tmp_path):
    """The lora-scripts example config, verbatim but for its paths and a step count."""
    data_dir = REPO_ROOT / "sample_data" / "star"
    text = (
        LORA_SCRIPTS_EXAMPLE.replace("./data/anime_style/metadata.csv", str(data_dir / "metadata.csv"))
        .replace("./data/anime_style", str(data_dir))
        .replace("./models/Stable-diffusion/v1-5-pruned.safetensors", str(tiny_base["checkpoint"]))
        .replace("./output/anime_lora", str(tmp_path / "out"))
    )
    path = tmp_path / "lora_scripts.yaml"
    path.write_text(text + "max_steps: 2\n", encoding="utf-8")
    completed = _run("train", str(path))
    assert completed.returncode == 0, completed.stderr
    lora_file = tmp_path / "out" / "star.safetensors"  # default name: the data folder's
    assert f"wrote {lora_file}" in completed.stdout
    with safe_open(str(lora_file), "pt") as handle:
        metadata = handle.metadata()
        down = handle.get_tensor(
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
        )
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "16.0")
    assert metadata["ss_learning_rate"] == "0.0002" and metadata["ss_steps"] == "2"
    assert down.shape == (8, 32) and down.dtype == torch.float16


def test_sample_prompts_render_before_during_and_after_training(ti_config_dict, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = ["a red <star> on a blue background", "a red <star>, on white"]
    config = parse_config(
        {**ti_config_dict, "max_steps": 4, "save_steps": 2, "sample_prompts": prompts, "sample_steps": 3}
    )
    train(config)
    samples = Path(config.output_dir) / "samples"
    steps = ["step00000000.png", "step00000002.png", "step00000004.png"]
    assert sorted(p.name for p in samples.iterdir()) == sorted(["progress.png", *steps])
    from PIL import Image

    with Image.open(samples / "step00000004.png") as grid:
        assert grid.size == (2 * 128, 128)  # two 32 px samples, upscaled to 128 px, side by side
    with Image.open(samples / "progress.png") as progress:
        assert progress.size == (2 * 128, 3 * 128)  # one row per render: before, step 2, step 4
        for row, name in enumerate(steps):
            with Image.open(samples / name) as grid:
                assert progress.crop((0, row * 128, 256, (row + 1) * 128)).tobytes() == grid.convert("RGB").tobytes()
    events = EventAccumulator(str(Path(config.output_dir) / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("samples")] == [0, 2, 4]


def test_log_with_wandb_sends_scalars_samples_and_settings(ti_config_dict, tmp_path, monkeypatch):
    """Weights & Biases through accelerate's tracker, offline: the scalars go to `accelerator.log`, the sample grids
    land as wandb media files, and TensorBoard is still written with `all`."""
    pytest.importorskip("wandb")
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[dict, int]] = []
    original = Accelerator.log
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **k: logged.append((values, step)))
    config = parse_config(
        {**ti_config_dict, "max_steps": 2, "sample_prompts": ["a <star>"], "sample_steps": 2, "log_with": "all"}
    )
    train(config)
    monkeypatch.setattr(Accelerator, "log", original)
    losses = [(values["loss"], step) for values, step in logged if "loss" in values]
    assert [step for _, step in losses] == [1, 2] and all(value > 0 for value, _ in losses)
    assert {name for values, _ in logged for name in values} >= {"lr/embedding", "speed/steps_per_second"}
    runs = list((tmp_path / "out" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("run-*.wandb"))
    media = sorted(p.name for p in (runs[0] / "files" / "media" / "images").iterdir())
    assert len(media) == 2 and all(name.startswith("samples_") for name in media)  # before and after training
    assert set(_scalars(tmp_path / "out" / "logs")) >= {"loss", "lr/embedding"}  # and TensorBoard too
    with pytest.raises(ConfigError, match="log_with: 'weights' is not one of 'tensorboard', 'wandb', 'all'"):
        parse_config({**ti_config_dict, "log_with": "weights"})
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"log_with: wandb needs the wandb package: pip install 'sdtune\[wandb\]'"):
        train(parse_config({**ti_config_dict, "log_with": "wandb"}))
