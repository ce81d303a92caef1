"""Shared fixtures: tiny random-weight SD1-family base models built once per test session, fully offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per pytest-xdist worker: the workers share the cores
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"  # and per process a test starts (CLI runs, the benchmarks' children)

    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "sample_data" / "star"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every session gets its own sdtune cache, so tests never depend on what an earlier run left."""
    os.environ["SDTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("sdtune-cache"))


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; tests that switch it reset it around themselves."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, _isolated_cache) -> dict[str, Path]:
    """A tiny SD1-family model written as a diffusers folder and as a single-file checkpoint (same weights)."""
    from sdtune.models import write_base_model

    root = tmp_path_factory.mktemp("tiny-base")
    folder, checkpoint = root / "tiny-sd1", root / "tiny-sd1.safetensors"
    write_base_model(folder, checkpoint, preset="tiny", seed=0)
    return {"folder": folder, "checkpoint": checkpoint}


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, _isolated_cache) -> dict[str, Path]:
    """A tiny SDXL-family model (two text encoders of widths 32 and 64, time-id embedding) as a diffusers folder and
    as an original-layout single-file checkpoint (same weights)."""
    from sdtune.models import write_base_model

    root = tmp_path_factory.mktemp("tiny-sdxl")
    folder, checkpoint = root / "tiny-sdxl", root / "tiny-sdxl.safetensors"
    write_base_model(folder, checkpoint, preset="tiny-sdxl", seed=0)
    return {"folder": folder, "checkpoint": checkpoint}


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory, _isolated_cache) -> dict[str, Path]:
    """Tiny SD2.x-family models (OpenCLIP-style `gelu` text encoder of width 48 padding with "!", linear projections),
    512-base style (epsilon) and 768-v style (v_prediction), each as a diffusers folder and a single file."""
    from sdtune.models import write_base_model

    root = tmp_path_factory.mktemp("tiny-sd2")
    paths = {
        "folder": root / "tiny-sd2", "checkpoint": root / "tiny-sd2.safetensors",
        "v_folder": root / "tiny-sd2-v", "v_checkpoint": root / "tiny-sd2-v.safetensors",
    }  # fmt: skip
    write_base_model(paths["folder"], paths["checkpoint"], preset="tiny-sd2", seed=0)
    write_base_model(paths["v_folder"], paths["v_checkpoint"], preset="tiny-sd2-v", seed=0)
    return paths


@pytest.fixture
def ti_config_dict(tiny_base, tmp_path) -> dict:
    """A small, valid TI config on the sample data and the tiny base (as YAML values)."""
    return {
        "method": "ti",
        "base_model": str(tiny_base["checkpoint"]),
        "train_data_dir": str(SAMPLE_DATA),
        "placeholder_token": "<star>",
        "init_word": "star",
        "num_vectors": 2,
        "resolution": 32,
        "batch_size": 2,
        "max_steps": 3,
        "output_dir": str(tmp_path / "out"),
        "seed": 7,
    }


@pytest.fixture
def ti_lora_process_dict(tiny_base) -> dict:
    """A TI+LoRA run for tests that start `sdtune train` as a process: the sample star images, random crops and
    flips, the text encoder trained too, float32 outputs (as YAML values; tests add steps and batch)."""
    return {
        "method": "ti+lora", "base_model": str(tiny_base["checkpoint"]), "placeholder_token": "<star>",
        "init_word": "star", "train_data_dir": str(SAMPLE_DATA), "resolution": 32, "center_crop": False,
        "random_flip": True, "lora_rank": 2, "learning_rate": 1e-2, "save_precision": "fp32", "seed": 5,
        "train_text_encoder": True,
    }  # fmt: skip


def assert_trained_alike(a: dict, b: dict, atol: float, rtol: float, step_size: float, steps: int) -> None:
    """Two trainings that see the same examples, noise and timesteps ended at the same weights, up to what Adam does
    with float noise: it divides by sqrt(v), so a near-zero gradient entry whose sign differs by rounding (another
    CPU, another reduction order) moves by up to one step (`step_size`) the other way. Every entry must stay within
    two steps per optimizer step; all but 1% within (atol, rtol); the median difference at float precision."""
    assert a.keys() == b.keys()
    differences, outliers, total = [], 0, 0
    for key in a:
        x, y = a[key].float(), b[key].float()
        difference = (x - y).abs()
        outliers += int((difference > atol + rtol * y.abs()).sum())
        total += difference.numel()
        differences.append(difference.flatten())
        assert difference.max().item() <= 2 * step_size * steps, (key, difference.max().item())
    assert outliers <= 0.01 * total, f"{outliers} of {total} entries differ beyond atol {atol} / rtol {rtol}"
    import torch

    assert torch.cat(differences).median().item() < 1e-5
