"""Interrupted and resumed training ends where an uninterrupted run ends: a real `sdtune train` process is killed
with SIGKILL mid-run, resumed, stopped again with SIGINT (it saves and exits 130), and resumed to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune import state


@pytest.fixture
def config_file(ti_lora_process_dict, tmp_path) -> Path:
    config = {
        **ti_lora_process_dict, "batch_size": 3, "max_steps": 40, "save_steps": 5, "keep_last_n": 2,
        "embedding_train_fraction": 0.5,
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _command(config_file: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdtune", "train", str(config_file), f"output_dir={out}", *extra]


def _stop_at(command: list[str], state: Path, how: int) -> int:
    """Starts training, sends `how` once `state` exists, returns the exit code."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while not state.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(how)
    return process.wait(timeout=120)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(out / "star_lora.safetensors")), **load_file(str(out / "star.safetensors"))}


def test_killed_and_interrupted_runs_resume_to_the_same_weights(config_file, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_command(config_file, straight), check=True, env=_env(), capture_output=True)

    resumed = tmp_path / "resumed"
    killed = _stop_at(_command(config_file, resumed), resumed / "state" / "step-00000010", signal.SIGKILL)
    assert killed == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted = _stop_at(
        _command(config_file, resumed, "resume=latest"), resumed / "state" / "step-00000025", signal.SIGINT
    )
    assert interrupted == 130
    saved = [p.name for p in state.list_states(resumed)]
    assert len(saved) <= 2 and saved[-1] >= "step-00000025"  # keep_last_n: 2; SIGINT saved where it stopped
    subprocess.run(_command(config_file, resumed, "resume=latest"), check=True, env=_env(), capture_output=True)

    expected, got = _weights(straight), _weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    with safe_open(str(resumed / "star_lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "40"


def test_resume_errors_are_clear(config_file, tmp_path):
    out = tmp_path / "nothing"
    completed = subprocess.run(_command(config_file, out, "resume=latest"), env=_env(), capture_output=True, text=True)
    assert completed.returncode == 2
    assert "checks before loading the model" in completed.stderr and "holds no saved state yet" in completed.stderr
