"""Generation speed with stacked LoRAs, unfused and fused, as ratios to the bare base model in the same run.

    python tools/bench_generate.py                       # the world model, 2 rank-8 attention LoRAs, CPU
    python tools/bench_generate.py --base MODEL --size 512 --images 8 --device cuda

The LoRAs are random kohya-layout files over every attention projection (what `lora_targets: attention` trains), so
the numbers measure the cost of the adapter layers, not any particular LoRA.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdtune import formats
from sdtune.inference import AdapterPipeline

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_random_lora(pipe: AdapterPipeline, path: Path, rank: int, seed: int) -> Path:
    """A kohya-layout LoRA with random factors on every UNet attention projection of the pipeline's base."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (component, _, module) in formats.module_key_map(pipe.base.family, pipe.base.adaptable()).items():
        if component == "unet" and "_attn" in key:
            weight = module.weight
            tensors[key + formats.DOWN] = torch.randn(rank, weight.shape[1], generator=generator) * 0.01
            tensors[key + formats.UP] = torch.randn(weight.shape[0], rank, generator=generator) * 0.01
            tensors[key + formats.ALPHA] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def seconds_per_image(pipe: AdapterPipeline, args) -> float:
    """Median over `args.repeats` timed runs of `args.images` images (after one warm-up run)."""
    prompts = ["a red circle on a blue background"] * args.images
    seeds = list(range(args.images))
    runs = []
    for _ in range(args.repeats + 1):
        started = time.perf_counter()
        pipe.generate(prompts, seeds, steps=args.steps, width=args.size, height=args.size)
        runs.append((time.perf_counter() - started) / args.images)
    return sorted(runs[1:])[len(runs[1:]) // 2]


def main() -> None:
    """Times the base, the base + 2 LoRAs, and the same fused; prints and optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(REPO_ROOT / "sample_data" / "world-sd1"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=16, help="images per timed run (one batch)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    pipe = AdapterPipeline.from_base(args.base, device=args.device)
    results = {"base": seconds_per_image(pipe, args)}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(2):
            pipe.add_lora(write_random_lora(pipe, Path(folder) / f"lora{index}.safetensors", args.rank, index))
        results["2 LoRAs, unfused"] = seconds_per_image(pipe, args)
        pipe.fuse()
        results["2 LoRAs, fused"] = seconds_per_image(pipe, args)
    print(f"{'setting':<20} {'s/image':>8} {'ratio to base':>14}")
    for name, value in results.items():
        print(f"{name:<20} {value:8.4f} {value / results['base']:14.2f}")
    if args.json:
        args.json.write_text(json.dumps({**vars(args), "json": None, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
