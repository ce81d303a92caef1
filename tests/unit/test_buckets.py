"""Aspect-ratio buckets: the bucket set, assignment (no upscaling when told), AR error, batches within a bucket, and
training through them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdtune import data
from sdtune.config import ConfigError, parse_config


def _config(folder: Path, **extra):
    raw = {"method": "lora", "base_model": "m", "train_data_dir": str(folder), "resolution": 64, "enable_bucket": True}
    return parse_config({**raw, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16, **extra})


def _images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (120, 40, 40)).save(folder / f"{name}.png")
    return folder


def test_bucket_set_keeps_area_and_steps():
    sizes = data.bucket_sizes(64, 32, 128, 16)
    assert (64, 64) in sizes and (32, 128) in sizes and (128, 32) in sizes and (48, 80) in sizes
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 and min(w, h) >= 32 for w, h in sizes)


def test_assignment_follows_aspect_ratio_and_reports_the_error(tmp_path):
    folder = _images(tmp_path / "d", {"square": (100, 100), "wide": (200, 100), "tall": (60, 240)})
    examples, errors = data.scan_dataset(_config(folder), None)
    plan = data.bucket_plan(examples, _config(folder))
    by_name = {e.image_path.stem: b for e, b in zip(examples, plan["assigned"], strict=True)}
    assert by_name == {"square": (64, 64), "wide": (80, 48), "tall": (32, 128)}  # 80x48 is the widest 2:1-ish
    assert plan["ss_bucket_info"]["mean_img_ar_error"] == pytest.approx((0 + abs(80 / 48 - 2) + 0) / 3)
    lines = data.describe_buckets(plan)
    assert lines[0] == "buckets (width x height: samples): 32x128: 1, 64x64: 1, 80x48: 1"


def test_no_upscale_never_enlarges_an_image(tmp_path):
    folder = _images(tmp_path / "d", {"small": (40, 70), "big": (400, 100)})
    config = _config(folder, bucket_no_upscale=True)
    examples, _ = data.scan_dataset(config, None)
    plan = data.bucket_plan(examples, config)
    by_name = {e.image_path.stem: b for e, b in zip(examples, plan["assigned"], strict=True)}
    assert by_name["small"] == (32, 64)  # its own size rounded down to 16: no side grows
    assert by_name["big"] == (128, 32)  # scaled down to at most 64*64 pixels, aspect kept, rounded down
    for example, bucket in zip(examples, plan["assigned"], strict=True):
        assert bucket[0] <= example.size[0] and bucket[1] <= example.size[1]
    assert plan["max_ar_error"] == pytest.approx(abs(32 / 64 - 40 / 70))


def test_batches_come_from_one_bucket_and_cover_every_sample():
    buckets = [(64, 64)] * 5 + [(96, 48)] * 3 + [(32, 128)]
    sampler = data.BucketBatches(buckets, batch_size=2, seed=1)
    first = [[index for index, _ in batch] for batch in sampler]
    assert len(sampler) == 3 + 2 + 1 == len(first)
    assert sorted(i for batch in first for i in batch) == list(range(9))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in first)
    sampler.set_epoch(1)
    second = list(sampler)  # the next epoch: another order, same coverage, items keyed by epoch
    assert all(epoch == 1 for batch in second for _, epoch in batch)
    second = [[index for index, _ in batch] for batch in second]
    assert second != first and sorted(i for b in second for i in b) == list(range(9))
    assert [[i for i, _ in b] for b in data.BucketBatches(buckets, 2, 1)] == first  # same seed, same order
    sampler.set_epoch(1, skip=2)
    assert [[i for i, _ in b] for b in sampler] == second[2:]  # resuming inside an epoch


def test_each_process_takes_its_slice_of_the_global_batches():
    buckets = [(64, 64)] * 8 + [(96, 48)] * 3
    single = [[i for i, _ in b] for b in data.BucketBatches(buckets, batch_size=4, seed=3)]
    ranks = [data.BucketBatches(buckets, 2, 3, num_processes=2, process_index=rank) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 3  # 8 -> 2 global batches, 3 -> 1
    per_rank = [[[i for i, _ in b] for b in sampler] for sampler in ranks]
    for step, batch in enumerate(single):
        if len(batch) == 4:  # a full global batch: the two slices are the one-process batch
            assert per_rank[0][step] + per_rank[1][step] == batch
        else:  # 3 samples for 2 processes: 2 each, the short slice repeats a sample of the same batch
            assert per_rank[0][step] == batch[:2] and per_rank[1][step] == [batch[2], batch[0]]


def test_bucket_settings_are_checked():
    with pytest.raises(ConfigError) as error:
        parse_config(
            {
                "base_model": "m",
                "train_data_dir": "d",
                "enable_bucket": True,
                "bucket_reso_steps": 12,
                "resolution": 64,
            }
        )
    assert "bucket_reso_steps: must be a multiple of 8" in str(error.value)
    with pytest.raises(ConfigError, match="max_bucket_reso: 1024 is below resolution 2048; set max_bucket_reso: 4096"):
        parse_config(
            {
                "base_model": "m",
                "train_data_dir": "d",
                "enable_bucket": True,
                "resolution": 2048,
                "max_bucket_reso": 1024,
            }
        )
    scaled = parse_config({"base_model": "m", "train_data_dir": "d", "enable_bucket": True, "resolution": 1024})
    assert (scaled.min_bucket_reso, scaled.max_bucket_reso) == (512, 2048)  # unset bounds: half and twice
    assert parse_config({"base_model": "m", "train_data_dir": "d", "resolution": 512}).max_bucket_reso == 1024


def test_unset_bucket_settings_follow_a_small_resolution_and_set_ones_say_what_to_set():
    """kohya's 64-pixel steps and 256..1024 bounds assume SD-sized images; a 32-pixel test run was refused with
    "need min <= resolution <= max, got 256, 32, 1024" and no fix."""
    raw = {"base_model": "m", "train_data_dir": "d", "enable_bucket": True, "resolution": 32}
    small = parse_config(raw)
    assert (small.bucket_reso_steps, small.min_bucket_reso, small.max_bucket_reso) == (8, 16, 64)
    assert parse_config({**raw, "resolution": 512}).bucket_reso_steps == 64
    with pytest.raises(ConfigError) as error:
        parse_config({**raw, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64})
    message = str(error.value)
    assert "bucket_reso_steps: 64 is larger than resolution 32, so no bucket fits; set bucket_reso_steps: 8" in message
    assert "min_bucket_reso: 256 is above resolution 32; set min_bucket_reso: 16 (half the resolution)" in message


def test_training_with_buckets_uses_bucket_sizes_and_records_them(tiny_base, tmp_path):
    from sdtune.train import setup, train

    folder = _images(tmp_path / "d", {"a": (64, 32), "b": (64, 32), "c": (32, 64)})
    raw = {"method": "lora", "base_model": str(tiny_base["folder"]), "train_data_dir": str(folder), "resolution": 32}
    raw |= {"enable_bucket": True, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16}
    raw |= {"batch_size": 2, "max_steps": 2, "lora_rank": 2, "output_dir": str(tmp_path / "out")}
    run = setup(parse_config(raw))
    shapes = sorted(tuple(batch["pixel_values"].shape) for batch in run.loader)
    assert shapes == [(1, 3, 48, 16), (2, 3, 16, 48)]  # wide pair together, the tall one alone
    result = train(parse_config(raw))
    with safe_open(str(result.saved_paths[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_enable_bucket"] == "True" and metadata["ss_num_batches_per_epoch"] == "2"
    info = json.loads(metadata["ss_bucket_info"])
    assert sorted((tuple(b["resolution"]), b["count"]) for b in info["buckets"].values()) == [
        ((16, 48), 1),
        ((48, 16), 2),
    ]
    assert torch.isfinite(torch.tensor(result.last_loss))
