"""Data-parallel training: `torchrun --nproc_per_node 2` (gloo on CPU) trains, only the main process writes, and the
result is the one-process run with the same global batch: same files, same metadata, same weights, same logged loss."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file


@pytest.fixture
def config_file(ti_lora_process_dict, tmp_path) -> Path:
    config = {
        **ti_lora_process_dict, "max_steps": 6, "save_steps": 3, "noise_offset": 0.05,
        "prior_preservation_prompts": ["a photo of a cat", "a red car"],
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}


def _losses(out: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    return [event.value for event in events.Scalars("loss")]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (torch's launcher) is not on PATH")
def test_two_processes_train_what_one_process_with_their_global_batch_trains(config_file, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "sdtune", "train", str(config_file)]
    parallel = _run([*torchrun, f"output_dir={two}", "batch_size=2"])
    _run([sys.executable, "-m", "sdtune", "train", str(config_file), f"output_dir={one}", "batch_size=4"])

    # printed once (main process): the effective batch and what was written
    assert parallel.stdout.count("effective batch: 2 per process x 1 accumulation x 2 processes = 4") == 1
    assert parallel.stdout.count("trained 6 steps") == 1
    assert _files(two) == _files(one)  # outputs, intermediate saves and resumable states
    assert {"star_lora.safetensors", "star-step00000003.safetensors", "state/step-00000006/trainable.safetensors"} <= (
        _files(two)
    )
    for name in ("star.safetensors", "star_lora.safetensors", "star_lora-step00000003.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys()
        for key in a:  # the same examples, crops, flips, noise and timesteps; only the gradient sum order differs
            torch.testing.assert_close(b[key], a[key], atol=2e-4, rtol=1e-3)
    lora_changed = load_file(str(two / "star_lora.safetensors"))
    assert any(v.abs().max() > 0 for k, v in lora_changed.items() if "lora_up" in k)  # it trained
    with safe_open(str(two / "star_lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_batch_size_per_device"] == "2" and metadata["ss_total_batch_size"] == "4"
    # the logged loss is the global batch's (the mean over processes), as one process logs it
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), atol=1e-4, rtol=1e-4)
