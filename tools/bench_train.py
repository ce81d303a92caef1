"""Training step time and peak GPU memory at real model sizes, per precision and memory setting.

    python tools/bench_train.py                          # SD1.5 shapes (random weights), 512x512, on a GPU
    python tools/bench_train.py --preset tiny --resolution 64 --steps 6 --warmup 2   # a quick CPU check
    python tools/bench_train.py --preset sdxl --base-dtype fp16 --resolution 1024 --only 3,8,9   # SDXL, on a GPU

Writes a random-weight base model with the preset's shapes (`sdtune make-base`; no download), a folder of captioned
random images, then runs `sdtune train` once per setting (its own process, so peak memory is that setting's) and
reads the per-step scalars the trainer logs to TensorBoard. Reports seconds per optimizer step after `--warmup`
steps, the ratio to the first setting (measured in the same run) and the peak CUDA memory the trainer recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from sdtune.models import PRESETS, write_base_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> config keys on top of the common LoRA config; the first is the baseline of the ratios
    # LoRA trains the UNet and the text encoder unless `train_text_encoder: false` (kohya's default)
    "LoRA fp32, batch 1": {"mixed_precision": "no", "batch_size": 1},
    "LoRA fp16, batch 1": {"mixed_precision": "fp16", "batch_size": 1},
    "LoRA bf16, batch 1": {"mixed_precision": "bf16", "batch_size": 1},
    "LoRA bf16, batch 4": {"mixed_precision": "bf16", "batch_size": 4},
    "LoRA bf16, batch 4, gradient checkpointing": {
        "mixed_precision": "bf16", "batch_size": 4, "gradient_checkpointing": True,
    },
    "LoRA UNet only, bf16, batch 4, cached latents + text": {
        "mixed_precision": "bf16", "batch_size": 4, "train_text_encoder": False, "cache_latents": True,
        "cache_text_encoder_outputs": True,
    },
    "TI bf16, batch 4": {
        "method": "ti", "mixed_precision": "bf16", "batch_size": 4, "placeholder_token": "<thing>",
        "init_word": "object", "lora_rank": None, "lora_targets": None, "save_precision": None,
    },
    "LoRA bf16, batch 1, gradient checkpointing": {
        "mixed_precision": "bf16", "batch_size": 1, "gradient_checkpointing": True,
    },
    "LoRA bf16, batch 1, gradient checkpointing, cached latents": {
        "mixed_precision": "bf16", "batch_size": 1, "gradient_checkpointing": True, "cache_latents": True,
    },
}  # fmt: skip


def write_images(folder: Path, count: int, resolution: int) -> None:
    """`count` random RGB images with captions naming the placeholder (TI needs it in every caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["file_name,text"]
    for index in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        rows.append(f"{index}.png,a photo of <thing> number {index}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def step_seconds(log_dir: Path, warmup: int) -> tuple[float, float | None]:
    """(seconds per step after `warmup` steps, peak CUDA MiB) from the trainer's TensorBoard scalars.

    The trainer logs `speed/steps_per_second` = steps done / seconds since the loop started, so the time at step k
    is k / rate_k, and the steady per-step time is the difference between the last step and step `warmup`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    rates = {e.step: e.value for e in events.Scalars("speed/steps_per_second")}
    last = max(rates)
    elapsed = {step: step / rate for step, rate in rates.items()}
    peak = None
    if "memory/peak_cuda_allocated_mib" in events.Tags()["scalars"]:
        peak = max(e.value for e in events.Scalars("memory/peak_cuda_allocated_mib"))
    return (elapsed[last] - elapsed[warmup]) / (last - warmup), peak


def run_setting(name: str, extra: dict, common: dict, work: Path, warmup: int) -> dict:
    """Trains one setting in its own process; returns its timing and memory."""
    folder = work / name.replace(" ", "_").replace(",", "").replace("+", "and")
    config = {**common, **extra, "output_dir": str(folder)}
    config = {key: value for key, value in config.items() if value is not None}
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "sdtune", "train", str(path)], capture_output=True, text=True, env=os.environ.copy()
    )
    if completed.returncode != 0:
        return {"setting": name, "error": completed.stderr[-2000:]}
    per_step, peak = step_seconds(folder / "logs", warmup)
    wall = time.perf_counter() - started
    return {"setting": name, "seconds_per_step": per_step, "peak_cuda_mib": peak, "wall_seconds": wall}


def main() -> None:
    """Runs every setting and prints the table (Markdown); `--json` also writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15", help="sdtune make-base preset (sd15, sdxl, tiny, tiny-sdxl)")
    parser.add_argument("--base-dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the written base")
    parser.add_argument("--base", type=Path, help="an existing base model folder instead of a random --preset one")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (allocator, kernels)")
    parser.add_argument("--only", help="comma-separated setting numbers (1-based) to run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chosen = list(SETTINGS.items())
    if args.only:
        numbers = args.only.split(",")
        if not all(n.isdigit() and 1 <= int(n) <= len(chosen) for n in numbers):
            parser.error(f"--only: {args.only!r} must be setting numbers from 1 to {len(chosen)}, e.g. 1,4")
        chosen = [chosen[int(n) - 1] for n in numbers]
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 1 and below --steps ({args.steps})")
    if args.preset not in PRESETS:
        parser.error(f"--preset: {args.preset!r} is not one of {', '.join(PRESETS)}")

    work = Path(tempfile.mkdtemp(prefix="sdtune-bench-train-"))
    base = args.base or work / "base"
    if args.base is None:
        write_base_model(
            base, preset=args.preset, dtype={"fp32": torch.float32, "fp16": torch.float16}[args.base_dtype]
        )
    write_images(work / "images", 8, args.resolution)
    common = {
        "method": "lora", "base_model": str(base), "train_data_dir": str(work / "images"),
        "resolution": args.resolution, "lora_rank": 16, "lora_targets": "kohya", "learning_rate": 1e-4,
        "max_steps": args.steps, "save_precision": "fp16", "seed": 0,
    }  # fmt: skip
    results = []
    for name, extra in chosen:
        results.append(run_setting(name, extra, common, work, args.warmup))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"args": {**vars(args), "json": None, "base": str(args.base)}, "results": results}, indent=2
                )
            )
    print(markdown(results))


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table; ratios are to the first setting that ran."""
    timed = [r for r in results if "seconds_per_step" in r]
    baseline = timed[0]["seconds_per_step"] if timed else None
    lines = ["| setting | s/step | ratio | peak CUDA memory |", "|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed | | |")
            continue
        peak = "—" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib'] / 1024:.2f} GiB"
        lines.append(
            f"| {r['setting']} | {r['seconds_per_step']:.3f} | {r['seconds_per_step'] / baseline:.2f} | {peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
