"""Training step time and peak memory: per precision and memory setting, or against the bare forward+backward bound.

    python tools/bench_train.py                          # SD1.5 shapes (random weights), 512x512, on a GPU
    python tools/bench_train.py --preset tiny --resolution 64 --steps 6 --warmup 2   # a quick CPU check
    python tools/bench_train.py --preset sdxl --base-dtype fp16 --resolution 1024 --only 3,8,9   # SDXL, on a GPU
    python tools/bench_train.py --reference --preset sd15 --resolution 128 --methods lora,ti   # against the bound

Writes a random-weight base model with the preset's shapes (`sdtune make-base`; no download) or takes `--base`, a
folder of captioned random images, then runs `sdtune train` once per setting (its own process, so peak memory is that
setting's) and reads the per-step scalars the trainer logs to TensorBoard. Reports seconds per optimizer step after
`--warmup` steps, the ratio to the first setting (measured in the same run) and the peak CUDA memory the trainer
recorded.

`--reference` instead measures, per method (`ti`, `lora`: UNet only with cached text, `lora+te`, `ti+lora`; latents
cached), `sdtune train` against the minimal loop of `tools/reference_loop.py` (the same base, LoRA layers, vectors and
optimizer; inputs encoded once), each in its own process, alternating the two `--repeats` times; it reports the
medians and the ratios sdtune / reference of the steady step, the time to the first step and the peak memory.
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
from reference_loop import trainer_timing

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
    per_step, _, peak = trainer_timing(folder / "logs", warmup)
    wall = time.perf_counter() - started
    return {"setting": name, "seconds_per_step": per_step, "peak_mib": peak, "wall_seconds": wall}


METHODS = {  # --reference: name -> config keys on top of the common config (latents are always cached)
    "ti": {
        "method": "ti",
        "placeholder_token": "<thing>",
        "init_word": "object",
        "lora_rank": None,
        "lora_targets": None,
        "save_precision": None,
    },
    "lora": {"method": "lora", "train_text_encoder": False, "cache_text_encoder_outputs": True},
    "lora+te": {"method": "lora", "train_text_encoder": True},
    "ti+lora": {"method": "ti+lora", "placeholder_token": "<thing>", "init_word": "object"},
}
MEASURED = ("seconds_per_step", "first_step_seconds", "peak_mib")


def _child(kind: str, config: Path, steps: int, warmup: int, slow_ms: float = 0.0) -> dict:
    """One measurement by `tools/reference_loop.py` in its own process (its last output line is the JSON result)."""
    command = [sys.executable, str(REPO_ROOT / "tools" / "reference_loop.py"), kind, str(config)]
    command += ["--steps", str(steps), "--warmup", str(warmup), "--slow-ms", str(slow_ms)]
    completed = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if completed.returncode != 0:
        return {"kind": kind, "error": completed.stderr[-2000:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def against_reference(method: str, common: dict, work: Path, args, slow_ms: float = 0.0) -> dict:
    """sdtune and the reference loop on one method, alternated `args.repeats` times in ABBA order (each run in a
    fresh output folder); the medians of each measure and their ratios sdtune / reference."""
    runs: dict[str, list[dict]] = {"sdtune": [], "reference": []}
    for repeat in range(args.repeats):
        # ABBA order: neither side always runs second (a machine that drifts over the run favours no one)
        for kind in ("sdtune", "reference") if repeat % 2 == 0 else ("reference", "sdtune"):
            folder = work / f"{method}-{kind}-{repeat}"
            config = {**common, **METHODS[method], "output_dir": str(folder), "max_steps": args.steps}
            config = {key: value for key, value in config.items() if value is not None}
            path = folder.with_suffix(".yaml")
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            result = _child(kind, path, args.steps, args.warmup, slow_ms if kind == "sdtune" else 0.0)
            if "error" in result:
                return {"method": method, "error": f"{kind}: {result['error']}"}
            runs[kind].append(result)
    row = {"method": method, "runs": runs}
    for measure in MEASURED:
        for kind in runs:
            row[f"{kind}_{measure}"] = float(np.median([run[measure] for run in runs[kind]]))
        row[f"ratio_{measure}"] = row[f"sdtune_{measure}"] / row[f"reference_{measure}"]
    return row


def reference_markdown(rows: list[dict]) -> str:
    """The `--reference` results as a Markdown table (medians; ratios sdtune / reference)."""
    lines = [
        "| method | s/step sdtune | s/step reference | ratio | first step sdtune / reference (s) | "
        "peak memory sdtune / reference (MiB) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['sdtune_seconds_per_step']:.4f} | {r['reference_seconds_per_step']:.4f} | "
            f"{r['ratio_seconds_per_step']:.2f} | {r['sdtune_first_step_seconds']:.1f} / "
            f"{r['reference_first_step_seconds']:.1f} | {r['sdtune_peak_mib']:.0f} / {r['reference_peak_mib']:.0f} | "
            f"{r['ratio_peak_mib']:.2f} |"
        )
    return "\n".join(lines)


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15", help="sdtune make-base preset (sd15, sdxl, tiny, tiny-sdxl)")
    parser.add_argument("--base-dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the written base")
    parser.add_argument("--base", type=Path, help="an existing base model (folder or file) instead of a --preset one")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (allocator, kernels)")
    parser.add_argument("--only", help="comma-separated setting numbers (1-based) to run")
    parser.add_argument("--reference", action="store_true", help="measure methods against the reference loop")
    parser.add_argument("--methods", default="ti,lora,lora+te,ti+lora", help="--reference: methods to measure")
    parser.add_argument("--batch", type=int, default=1, help="--reference: batch size")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no", help="--reference: mixed precision")
    parser.add_argument("--repeats", type=int, default=3, help="--reference: alternations of sdtune and reference")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--slow-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slowed sdtune step
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} unknown; choose from {', '.join(METHODS)}")
    if args.only and not all(n.isdigit() and 1 <= int(n) <= len(SETTINGS) for n in args.only.split(",")):
        parser.error(f"--only: {args.only!r} must be setting numbers from 1 to {len(SETTINGS)}, e.g. 1,4")
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 1 and below --steps ({args.steps})")
    if args.preset not in PRESETS:
        parser.error(f"--preset: {args.preset!r} is not one of {', '.join(PRESETS)}")
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs every setting (or, with `--reference`, every method against the reference loop) and prints the table
    (Markdown); `--json` also writes the results."""
    args = _arguments(argv)
    work = Path(tempfile.mkdtemp(prefix="sdtune-bench-train-"))
    base = args.base or work / "base"
    if args.base is None:
        write_base_model(
            base, preset=args.preset, dtype={"fp32": torch.float32, "fp16": torch.float16}[args.base_dtype]
        )
    write_images(work / "images", 8, args.resolution)
    common = {
        "method": "lora", "base_model": str(base), "train_data_dir": str(work / "images"),
        "resolution": args.resolution, "lora_rank": args.rank, "lora_targets": "kohya", "learning_rate": 1e-4,
        "max_steps": args.steps, "save_precision": "fp16", "seed": 0,
    }  # fmt: skip
    if args.reference:
        common = {**common, "batch_size": args.batch, "mixed_precision": args.precision, "cache_latents": True}
        jobs = [
            (m, lambda m=m: against_reference(m, common, work, args, args.slow_ms)) for m in args.methods.split(",")
        ]
        table = reference_markdown
    else:
        chosen = list(SETTINGS.items())
        chosen = [chosen[int(n) - 1] for n in args.only.split(",")] if args.only else chosen
        jobs = [(name, lambda n=name, e=extra: run_setting(n, e, common, work, args.warmup)) for name, extra in chosen]
        table = markdown
    results = []
    for _, measure in jobs:
        results.append(measure())
        print(json.dumps({k: v for k, v in results[-1].items() if k != "runs"}), flush=True)
        if args.json:
            settings = {**vars(args), "json": None, "base": str(args.base)}
            args.json.write_text(json.dumps({"args": settings, "results": results}, indent=2, default=str))
    print(table(results))
    return results


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table; ratios are to the first setting that ran."""
    timed = [r for r in results if "seconds_per_step" in r]
    baseline = timed[0]["seconds_per_step"] if timed else None
    lines = ["| setting | s/step | ratio | peak memory (CUDA on a GPU, RSS on a CPU) |", "|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed | | |")
            continue
        peak = f"{r['peak_mib'] / 1024:.2f} GiB"
        lines.append(
            f"| {r['setting']} | {r['seconds_per_step']:.3f} | {r['seconds_per_step'] / baseline:.2f} | {peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
