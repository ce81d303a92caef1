"""Training step time with cached VAE latents and text-encoder outputs, against encoding every step.

    python tools/bench_cache.py                                   # the world model, LoRA, 32x32
    python tools/bench_cache.py --base sd15.safetensors --resolution 256 --steps 10

Reports setup seconds (the cache is filled there), seconds per optimizer step and the ratio of cached to uncached
per-step time, from runs in the same process on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def timed_run(raw: dict) -> tuple[float, float]:
    """(setup seconds, seconds per optimizer step) of one training run."""
    from sdtune.config import parse_config
    from sdtune.train import fit, setup

    started = time.perf_counter()
    run = setup(parse_config(raw))
    ready = time.perf_counter()
    fit(run)
    return ready - started, (time.perf_counter() - ready) / raw["max_steps"]


def main() -> None:
    """Times uncached, latent-cached and latent+text-cached runs; prints a table, optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(REPO_ROOT / "sample_data" / "world-sd1"))
    parser.add_argument("--data", default=str(REPO_ROOT / "sample_data" / "world" / "red_star"))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("SDTUNE_CACHE_DIR", tempfile.mkdtemp())
    raw = {
        "method": "lora", "base_model": args.base, "train_data_dir": args.data, "resolution": args.resolution,
        "batch_size": args.batch_size, "max_steps": args.steps, "lora_rank": 8, "train_text_encoder": False,
        "save_precision": "fp16", "output_dir": tempfile.mkdtemp(),
    }  # fmt: skip
    settings = {
        "encode every step": {},
        "cache_latents": {"cache_latents": True},
        "cache_latents + cache_text_encoder_outputs": {"cache_latents": True, "cache_text_encoder_outputs": True},
    }
    results = {name: timed_run({**raw, **extra}) for name, extra in settings.items()}
    baseline = results["encode every step"][1]
    print(f"{'setting':<45} {'setup s':>8} {'s/step':>8} {'ratio':>6}")
    for name, (setup_seconds, per_step) in results.items():
        print(f"{name:<45} {setup_seconds:8.2f} {per_step:8.4f} {per_step / baseline:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
