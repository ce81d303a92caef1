"""Nothing lost, nothing silently wrong: what a careless or unlucky user does to sdtune, and what sdtune must do.

Each test reproduces one way a user's files were lost or a result was silently wrong (make-base over a folder, a
second run in a used output_dir, two runs at once, a damaged newest state, a full disk, NaN files, a resume after the
data changed, ...) and checks the refusal, its message, and that every file that must survive does, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import SAMPLE_DATA
from safetensors.torch import load_file, save_file

from sdtune import atomic, cli, formats, preflight, run_folder, state
from sdtune.config import ConfigError, load_config, parse_config
from sdtune.train import TrainingInterrupted, _stop_requests, train


def _snapshot(folder) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# make-base


def test_make_base_never_replaces_what_exists_without_overwrite_nor_what_sdtune_did_not_write(tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 my only copy")
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"someone's checkpoint")
    before = {**_snapshot(tmp_path)}

    assert cli.main(["make-base", str(mine)]) == 2
    assert "exists and is not empty; choose a new path, or add --overwrite" in capsys.readouterr().err
    assert cli.main(["make-base", str(tmp_path / "new"), "--checkpoint", str(checkpoint)]) == 2
    assert f"{checkpoint} exists and is not empty" in capsys.readouterr().err
    assert cli.main(["make-base", str(mine), "--overwrite"]) == 2
    assert "was not written by sdtune make-base, so --overwrite will not replace it" in capsys.readouterr().err
    assert cli.main(["make-base", str(checkpoint)]) == 2  # a file where a folder is named
    assert "is a file; name a folder" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_make_base_refuses_the_current_folder_and_overwrites_its_own_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep", encoding="utf-8")
    assert cli.main(["make-base", "."]) == 2
    assert "is the current folder" in capsys.readouterr().err
    assert cli.main(["make-base", "m", "--checkpoint", "m.safetensors", "--seed", "1"]) == 0
    first = (tmp_path / "m.safetensors").read_bytes()
    assert cli.main(["make-base", "m", "--checkpoint", "m.safetensors", "--seed", "2", "--overwrite"]) == 0
    assert (tmp_path / "m.safetensors").read_bytes() != first  # replaced: it was sdtune's own
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "keep"


# ---------------------------------------------------------------------------------------------------------------
# One run owns its output_dir


def _ti(ti_config_dict, **changes):
    return parse_config({**ti_config_dict, "save_steps": 1, **changes})


def test_a_new_run_refuses_an_output_dir_holding_another_runs_outputs(ti_config_dict, tmp_path):
    out = tmp_path / "out"
    train(_ti(ti_config_dict, max_steps=4))
    before = _snapshot(out)
    with pytest.raises(ConfigError) as error:
        train(_ti(ti_config_dict, max_steps=2))
    message = str(error.value)
    assert f"output_dir: {out} holds another run's outputs" in message and "star.safetensors" in message
    assert "resume: latest" in message and "overwrite: true" in message
    assert _snapshot(out) == before


def test_overwrite_replaces_the_earlier_run_and_retention_only_touches_this_runs_states(ti_config_dict, tmp_path):
    """The earlier run stopped at step 4; a new 2-step run used to keep the old step-3/step-4 states (higher numbers
    sort as newer), prune its own, and `resume: latest` then picked the old run's state."""
    out = tmp_path / "out"
    (out / "my_notes.txt").parent.mkdir(parents=True)
    (out / "my_notes.txt").write_text("not sdtune's", encoding="utf-8")
    train(_ti(ti_config_dict, max_steps=4, keep_last_n=2))
    old_run = run_folder.read_record(out)["run_id"]
    train(_ti(ti_config_dict, max_steps=2, keep_last_n=2, overwrite=True))
    new_run = run_folder.read_record(out)["run_id"]
    assert new_run != old_run
    assert [p.name for p in state.list_states(out)] == ["step-00000001", "step-00000002"]
    assert {state.read_meta(p)["run_id"] for p in state.list_states(out)} == {new_run}
    assert not (out / "star-step00000003.safetensors").exists()  # the earlier run's intermediate save
    assert (out / "my_notes.txt").read_text(encoding="utf-8") == "not sdtune's"
    assert state.resolve("latest", out).name == "step-00000002"


def test_resume_and_overwrite_together_are_refused(ti_config_dict):
    with pytest.raises(ConfigError, match="resume continues the run in output_dir and overwrite deletes it"):
        parse_config({**ti_config_dict, "resume": "latest", "overwrite": True})


def test_retention_keeps_other_runs_states(tmp_path):
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for run, steps in (("a", (8, 9)), ("b", (1, 2, 3))):
        identity = state.RunIdentity(run, {}, {})
        for step in steps:
            state.save_state(
                tmp_path, state.Position(step, 0, 0), {"unet": [weight]}, optimizer, schedule, identity, 1
            )
    kept = {p.name: state.read_meta(p)["run_id"] for p in state.list_states(tmp_path)}
    assert kept == {"step-00000003": "b", "step-00000009": "a"}  # b kept its newest, a its own


# ---------------------------------------------------------------------------------------------------------------
# Two trainings at once


@pytest.fixture
def other_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def _lock(folder, pid, started, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or run_folder.socket.gethostname(), "started_at": "2026-12-01T10:00:00"}
    (folder / run_folder.LOCK).write_text(json.dumps({**holder, "process_started": started}), encoding="utf-8")


def test_a_second_training_into_a_locked_output_dir_is_refused_with_the_first_ones_pid(
    ti_config_dict, tmp_path, other_process
):
    out = tmp_path / "out"
    _lock(out, other_process.pid, psutil.Process(other_process.pid).create_time())
    with pytest.raises(ConfigError) as error:
        train(_ti(ti_config_dict))
    assert f"is in use by another training (pid {other_process.pid} on" in str(error.value)
    with pytest.raises(run_folder.OutputInUse, match=f"pid {other_process.pid}"):  # the race after preflight
        run_folder.claim_output_folder(_ti(ti_config_dict))
    assert not (out / "star.safetensors").exists()


def test_a_stale_lock_is_taken_over_and_the_lock_is_released_at_the_end(ti_config_dict, tmp_path, other_process):
    out = tmp_path / "out"
    other_process.kill()
    other_process.wait()
    _lock(out, other_process.pid, 1.0)  # its process is gone (kill -9, a reboot)
    result = train(_ti(ti_config_dict, max_steps=1))
    assert result.steps == 1 and not (out / run_folder.LOCK).exists()
    _lock(out, os.getpid(), 1.0)  # a live pid, but started at another time: a reused pid, so stale too
    assert run_folder.lock_problem(out) is None


def test_a_lock_from_another_host_counts_as_held(tmp_path):
    _lock(tmp_path, 1, 1.0, host="render-node-7")
    assert "pid 1 on render-node-7" in run_folder.lock_problem(tmp_path)
    assert f"delete {tmp_path / run_folder.LOCK}" in run_folder.lock_problem(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Damaged states and what kill -9 leaves


def _two_states(ti_config_dict):
    config = _ti(ti_config_dict, max_steps=2, keep_last_n=None)
    train(config)
    return config, state.list_states(config.output_dir)


def test_resume_latest_skips_a_damaged_newest_state_naming_both(ti_config_dict, caplog):
    config, (first, newest) = _two_states(ti_config_dict)
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a crash mid-copy, a disk error
    with caplog.at_level("WARNING"):
        assert state.resolve("latest", config.output_dir) == first
    assert (
        f"skips {newest}" in caplog.text and "optimizer.pt is 100 bytes" in caplog.text and str(first) in caplog.text
    )
    with pytest.raises(state.StateError, match=f"is damaged: optimizer.pt .*resume from {first}"):
        state.resolve(str(newest), config.output_dir)
    (first / "trainable.safetensors").unlink()
    with pytest.raises(state.StateError, match="every state in .* is damaged .*trainable.safetensors is missing"):
        state.resolve("latest", config.output_dir)


def test_resume_from_a_damaged_newest_state_trains_on_from_the_intact_one(ti_config_dict):
    config, (first, newest) = _two_states(ti_config_dict)
    (newest / "state.json").write_text("{", encoding="utf-8")
    killed_write = newest.parent / ".step-00000003.tmp999999"  # kill -9 mid-save (no such pid)
    killed_write.mkdir()
    (killed_write / "optimizer.pt").write_bytes(b"half")
    result = train(_ti(ti_config_dict, max_steps=3, keep_last_n=None, resume="latest"))
    assert result.steps == 3 and not killed_write.exists()
    assert json.loads((first.parent / "step-00000003" / "state.json").read_text())["position"]["step"] == 3


# ---------------------------------------------------------------------------------------------------------------
# A full disk


def _failing_torch_save(after_bytes: int):
    def save(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\0" * after_bytes)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 128")

    return save


def test_disk_full_mid_state_save_leaves_no_partial_write_and_keeps_the_last_state(tmp_path, monkeypatch):
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    identity = state.RunIdentity("r", {}, {})
    good = state.save_state(tmp_path, state.Position(1, 0, 0), {"unet": [weight]}, optimizer, schedule, identity, 1)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(state.torch, "save", _failing_torch_save(64))
    with pytest.raises(atomic.DiskFull) as error:
        state.save_state(tmp_path, state.Position(2, 0, 0), {"unet": [weight]}, optimizer, schedule, identity, 1)
    message = str(error.value)
    assert message.startswith(f"disk full at {tmp_path / 'state' / 'step-00000002'} (needs ~1 MB")
    assert "resume=latest" in message and error.value.exit_code == 1
    assert _snapshot(tmp_path) == before and state.damage(good) is None  # nothing half-written is left


def test_disk_full_during_training_exits_non_zero_with_the_message(ti_config_dict, tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps({**ti_config_dict, "save_steps": 1, "max_steps": 3}), encoding="utf-8")
    real_save, calls = torch.save, []

    def save_until_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            return _failing_torch_save(10)(obj, path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(state.torch, "save", save_until_full)
    assert cli.main(["train", str(config_file)]) == 1
    assert "sdtune train: disk full at" in capsys.readouterr().err
    out = tmp_path / "out"
    assert [p.name for p in state.list_states(out)] == ["step-00000001"] and state.damage(
        out / "state" / "step-00000001"
    ) is None
    assert not list(out.rglob(".*.tmp*")) and not (out / run_folder.LOCK).exists()


def test_too_little_free_space_is_refused_before_training(ti_config_dict, tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "free_bytes", lambda folder: 1000)
    with pytest.raises(ConfigError) as error:
        train(_ti(ti_config_dict))
    assert "has 0 MB free, but this run writes about" in str(error.value) and "keep_last_n" in str(error.value)
    assert not (tmp_path / "out" / "state").exists()


# ---------------------------------------------------------------------------------------------------------------
# Resume rules: settings named, data fingerprinted, length extendable


@pytest.fixture
def trained_on_copy(ti_config_dict, tmp_path):
    """A 2-step run on a copy of the sample data (so the test can change it)."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    settings = {**ti_config_dict, "train_data_dir": str(data), "max_steps": 2}
    train(parse_config(settings))
    return settings, data


def _resume_problems(settings: dict) -> str:
    with pytest.raises(ConfigError) as error:
        preflight.preflight(preflight.resolved(parse_config({**settings, "resume": "latest"})))
    return str(error.value)


def test_resume_after_the_data_changed_names_what_changed(trained_on_copy):
    settings, data = trained_on_copy
    (data / "star_07_gray.png").unlink()
    metadata = (data / "metadata.csv").read_text(encoding="utf-8")
    (data / "metadata.csv").write_text(
        "\n".join(line for line in metadata.splitlines() if "star_07" not in line).replace("blue", "navy") + "\n",
        encoding="utf-8",
    )
    message = _resume_problems({**settings, "max_steps": 4})
    assert "the training data changed since" in message
    assert "1 image(s) removed (star_07_gray.png)" in message and "1 caption(s) changed (star_00_blue.png)" in message


def test_resume_with_other_settings_names_them(trained_on_copy):
    settings, _ = trained_on_copy
    message = _resume_problems({**settings, "max_steps": 4, "learning_rate": 0.01, "num_vectors": 3})
    assert "was saved with other settings (learning_rate: 0.005 -> 0.01; num_vectors: 2 -> 3)" in message


def test_resume_may_extend_the_run_and_says_so(trained_on_copy, caplog):
    settings, _ = trained_on_copy
    assert "is at step 2 and this config trains 2 steps in all; to train on, set max_steps above 2" in (
        _resume_problems(settings)
    )
    with caplog.at_level("WARNING"):
        result = train(parse_config({**settings, "max_steps": 4, "resume": "latest"}))
    assert result.steps == 4
    assert "the run now trains 4 steps (it was saved planning 2)" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Inputs that were silently misread


def test_a_multi_token_init_word_with_fewer_vectors_is_refused(ti_config_dict):
    config = preflight.resolved(parse_config({**ti_config_dict, "init_word": "red star", "num_vectors": 1}))
    with pytest.raises(ConfigError) as error:
        preflight.preflight(config)
    assert "init_word: 'red star' is 2 tokens ('red', 'star') but num_vectors is 1" in str(error.value)
    assert "set num_vectors: 2" in str(error.value)


def test_empty_captions_are_not_captions(ti_config_dict, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    lines = (data / "metadata.csv").read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].split(",")[0] + ","  # star_00_blue.png with no text
    (data / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = preflight.resolved(parse_config({**ti_config_dict, "train_data_dir": str(data)}))
    with pytest.raises(ConfigError, match=r"the 'text' value of star_00_blue.png is empty; write the captions"):
        preflight.preflight(config)
    captions = {e.image_path.name: e.caption for e in preflight.preflight(
        preflight.resolved(parse_config({**ti_config_dict, "train_data_dir": str(data), "class_tokens": "<star>"}))
    )}  # fmt: skip
    assert captions["star_00_blue.png"] == "<star>"


def test_non_finite_artifacts_are_refused_on_read(tmp_path, tiny_base, capsys):
    lora = tmp_path / "nan.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{name}.lora_down.weight": torch.full((2, 32), float("nan")), f"{name}.lora_up.weight": torch.zeros(32, 2),
         f"{name}.alpha": torch.tensor(2.0)}, str(lora),
    )  # fmt: skip
    assert cli.main(["inspect", str(lora), "--base", str(tiny_base["folder"])]) == 2
    assert f"tensor '{name}.lora_down.weight' holds NaN or infinite values" in capsys.readouterr().err
    embedding = tmp_path / "inf.pt"
    torch.save({"string_to_param": {"*": torch.tensor([[float("inf")] * 32])}}, embedding)
    with pytest.raises(formats.FormatError, match="tensor 'string_to_param.\\*' holds NaN"):
        formats.read_artifact(embedding)


def test_network_weights_full_of_nan_are_refused_before_training(lora_nan_file, ti_config_dict, tiny_base, tmp_path):
    config = {
        "method": "lora", "base_model": str(tiny_base["folder"]), "train_data_dir": str(SAMPLE_DATA),
        "resolution": 32, "max_steps": 1, "output_dir": str(tmp_path / "o"), "network_weights": str(lora_nan_file),
    }  # fmt: skip
    with pytest.raises(ConfigError, match="network_weights: .*holds NaN or infinite values"):
        preflight.preflight(preflight.resolved(parse_config(config)))


@pytest.fixture
def lora_nan_file(tmp_path):
    path = tmp_path / "trained.safetensors"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 64), f"{name}.lora_up.weight": torch.full((64, 4), float("inf")),
         f"{name}.alpha": torch.tensor(4.0)}, str(path),
    )  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------------------------
# Checked before the model loads


def test_an_output_dir_under_a_file_is_refused_by_validate(ti_config_dict, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file", encoding="utf-8")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps({**ti_config_dict, "output_dir": str(blocker / "run1")}), encoding="utf-8")
    assert cli.main(["validate", str(config_file)]) == 2
    assert f"output_dir: {blocker / 'run1'} cannot be created: {blocker} is a file" in capsys.readouterr().err
    assert blocker.read_text(encoding="utf-8") == "a file"


@pytest.mark.parametrize(
    ("content", "override", "expected"),
    [
        (b"method: ti\nseed: 1\n", "seed=[1,2", "override 'seed=[1,2': the value is not valid YAML"),
        (b"method: l\xe9ra\n", None, "not UTF-8 text (byte 9); save the file as UTF-8"),
        (
            b"base_model: !!python/object/apply:os.system ['touch pwned']\n",
            None,
            "tags such as !!python/... are refused, nothing was run",
        ),
    ],
)
def test_config_files_and_overrides_that_do_not_parse_are_messages(tmp_path, capsys, content, override, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert cli.main(["validate", str(path), *([override] if override else [])]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigError):
        load_config(path, [override] if override else [])


def test_a_resolution_of_8_trains(ti_config_dict):
    """A latent of one pixel still goes through every UNet level (diffusers pads its up-sampling sizes)."""
    assert train(_ti(ti_config_dict, resolution=8, max_steps=1, save_steps=None)).steps == 1


# ---------------------------------------------------------------------------------------------------------------
# Signals and the data command


def test_sigterm_exits_143_and_sigint_130():
    with _stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop == [signal.SIGTERM]
    assert TrainingInterrupted(None, 3, stop[0]).exit_code == 143
    assert TrainingInterrupted(None, 3, signal.SIGINT).exit_code == 130


def test_the_data_command_warns_about_long_captions_as_validate_does(ti_config_dict, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    long = "<star> " + ", ".join(f"detail{i}" for i in range(80))
    (data / "metadata.csv").write_text(
        "file_name,text\n" + "".join(f'{p.name},"{long}"\n' for p in sorted(data.glob("*.png"))), encoding="utf-8"
    )
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps({**ti_config_dict, "train_data_dir": str(data)}), encoding="utf-8")
    for command in ("data", "validate"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert cli.main([command, str(config_file)]) == 0
        assert "8 caption(s) exceed 75 tokens and are cut" in caplog.text


def test_state_folders_list_and_load_with_legacy_digests(tmp_path):
    """States saved before run length became resumable hashed max_steps/epochs: they still resume."""
    config = parse_config({"base_model": "m", "train_data_dir": "d", "max_steps": 5})
    current, legacy = state.accepted_digests(config)
    assert current == state.config_digest(config) and legacy != current
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = state.save_state(tmp_path, state.Position(1, 0, 1), {"unet": [weight]}, optimizer, schedule,
                            state.RunIdentity("r", {}, {}))  # fmt: skip
    meta = json.loads((path / "state.json").read_text())
    meta["config_digest"] = legacy
    (path / "state.json").write_text(json.dumps(meta))
    (path / state.MANIFEST).unlink()  # legacy states have no manifest
    assert state.damage(path) is None
    (path / "broken").mkdir()
    (path / "broken" / "state.json").write_text("{", encoding="utf-8")
    for name in ("trainable.safetensors", "optimizer.pt"):
        (path / "broken" / name).write_bytes(b"x")
    assert state.damage(path / "broken") == "state.json is damaged"  # refused by resume, not a traceback
    assert state.load_state(path, {"unet": [weight]}, optimizer, schedule, (current, legacy)).step == 1
    assert load_file(str(path / "trainable.safetensors"))["unet.0"].shape == (2,)
