"""Personalization quality benchmark on the synthetic world: TI vs LoRA vs TI+LoRA, on two concepts.

    python tools/quality_bench.py --out docs/quality

Each method trains through the normal `sdtune train` command with its shipped config (`configs/world_<method>.yaml`),
then the outputs are loaded with diffusers' own loaders and scored with the world metric (`tools/world`):
- fidelity: `a <concept> on a <background> background` on the training backgrounds,
- editability: the same prompt on backgrounds no training image shows,
- prior: base prompts (held-in and unseen combinations) that the personalization must not break.
Writes `<out>/quality.json`, `<out>/quality.md` (the table) and one grid per method and concept; each row also holds
editability per unseen background. `--rescore` scores the runs an earlier command left in `--work` again (e.g. with
a larger `--per-background`) instead of training them. Comparing settings (one run's editability moves by up to
0.25 between seeds):

    python tools/quality_bench.py --methods lora --concepts red_star --seeds 42,7,123 --per-background 8 \
        --no-baseline [--config my_variant.yaml] [--set KEY=VALUE ...] --out /tmp/q

`--base sample_data/world-sdxl` runs the same on the SDXL world model (scored through `StableDiffusionXLPipeline`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from world import quality

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ti", "lora", "ti+lora")
MEAN_KEYS = ("fidelity", "editability", "prior", "cpu_seconds")


def _config_path(method: str, override: Path | None = None) -> Path:
    return override or REPO_ROOT / "configs" / f"world_{method.replace('+', '_')}.yaml"


def train_method(
    method: str,
    concept: quality.Concept,
    out: Path,
    base: Path,
    max_steps: int | None,
    extra: list[str] = (),
    config: Path | None = None,
) -> dict:
    """Runs `sdtune train` for one method and concept (plus `extra` key=value overrides); returns CPU and wall
    seconds."""
    overrides = quality.train_overrides(method, concept, base, REPO_ROOT / "sample_data" / "world", out, max_steps)
    overrides += list(extra)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sdtune", "train", str(_config_path(method, config)), *overrides]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"sdtune train failed for {method} on {concept.name}:\n{completed.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"cpu_seconds": round(cpu, 1), "wall_seconds": round(time.perf_counter() - started, 1)}


def _file_stats(folder: Path | None) -> dict:
    if folder is None:
        return {"trainable_parameters": 0, "file_bytes": 0}
    from safetensors.torch import load_file

    files = [p for p in folder.glob("*.safetensors") if "-step" not in p.name]
    parameters = sum(v.numel() for p in files for k, v in load_file(str(p)).items() if not k.endswith(".alpha"))
    return {"trainable_parameters": parameters, "file_bytes": sum(p.stat().st_size for p in files)}


def run_one(method: str | None, concept: quality.Concept, args, seed: int | None = None) -> dict:
    """Trains (unless `method` is None: the untrained baseline) with `seed` (None: the config's), measures and
    writes the grid of one row."""
    folder, timing = None, {"cpu_seconds": 0.0, "wall_seconds": 0.0}
    settings = list(args.set) + ([f"seed={seed}"] if seed is not None else [])
    suffix = "" if seed is None else f"-s{seed}"
    if method is not None:
        folder = _work_folder(method, concept, seed, args)
        if args.rescore:
            timing = _finished_run(folder)
        else:
            timing = train_method(method, concept, folder, args.base, args.max_steps, settings, args.config)
    pipe = quality.load_pipeline(args.base, folder, concept, method)
    scores, images = quality.measure(pipe, concept, method=method)
    label = method or "untrained"
    quality.save_grid(images, args.out / f"{concept.name}-{label.replace('+', '_')}{suffix}.png", columns=16)
    steps = 0 if method is None else _trained_steps(method, args)
    row = {"concept": concept.name, "method": label, "steps": steps, **scores, **timing, **_file_stats(folder)}
    row["editability_by_background"] = quality.editability_by_background(images, concept)
    return {**row, "seed": seed, "settings": " ".join(settings) if method else ""}


def _finished_run(folder: Path) -> dict:
    """The timing fields of a run `--rescore` reuses (unknown: it trained in an earlier command), after checking that
    `folder` holds a finished run (its `sdtune-run.json` and every output it lists)."""
    record = folder / "sdtune-run.json"
    outputs = json.loads(record.read_text(encoding="utf-8")).get("outputs", []) if record.is_file() else []
    missing = [name for name in outputs if not (folder / name).is_file()]
    if not outputs or missing:
        what = "missing " + ", ".join(missing) if missing else "no outputs"
        raise SystemExit(
            f"--rescore: {folder} holds no finished run ({what}); train it first with the same --work, --seeds, "
            "--set, --config and --max-steps, without --rescore"
        )
    return {"cpu_seconds": None, "wall_seconds": None}


def _work_folder(method: str, concept: quality.Concept, seed: int | None, args) -> Path:
    """Where one run trains: per concept, method and seed, plus a digest of what else changes the run (`--set`,
    `--config`, `--max-steps`), so that runs comparing settings never meet an earlier run's folder (which
    `sdtune train` refuses)."""
    name = f"{concept.name}-{method.replace('+', '_')}" + ("" if seed is None else f"-s{seed}")
    variant = [*args.set, *([f"config={args.config}"] if args.config else [])]
    variant += [f"max_steps={args.max_steps}"] if args.max_steps else []
    if variant:
        name += "-" + hashlib.sha1("\n".join(variant).encode()).hexdigest()[:8]
    return args.work / name


def _trained_steps(method: str, args) -> int:
    """The steps a run trained: a `--set max_steps=N` override, else `--max-steps`, else the config's."""
    pairs = [item.split("=", 1) for item in args.set]
    overridden = [int(float(value)) for key, value in pairs if key.strip() == "max_steps"]
    return (overridden or [None])[-1] or args.max_steps or _configured_steps(method, args.config)


def _configured_steps(method: str | None, config: Path | None = None) -> int:
    if method is None:
        return 0
    import yaml

    return int(yaml.safe_load(_config_path(method, config).read_text(encoding="utf-8"))["max_steps"])


def _seed_means(rows: list[dict]) -> list[dict]:
    """One row per (concept, method) trained with several seeds: the mean of its scores and CPU seconds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("seed") is not None:
            groups.setdefault((row["concept"], row["method"]), []).append(row)
    means = []
    for group in (g for g in groups.values() if len(g) > 1):
        mean = {key: _mean([r[key] for r in group]) for key in MEAN_KEYS}
        means.append({**group[0], **mean, "seed": f"mean of {len(group)}"})
    return means


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None where a value is unknown (CPU time of a rescored run)."""
    return None if None in values else sum(values) / len(values)


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table (with a seed column and per-seed means when `--seeds` was given)."""
    seeded = any(r.get("seed") is not None for r in rows)
    lines = [
        "| concept | method | " + ("seed | " if seeded else "") + "steps | fidelity | editability | prior | CPU s | "
        "trainable params | file size |",
        "|---|---|" + ("---|" if seeded else "") + "---|---|---|---|---|---|---|",
    ]
    for r in rows + _seed_means(rows):
        seed = f"{r['seed'] if r.get('seed') is not None else '—'} | " if seeded else ""
        cpu = "—" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.0f}"  # None: rescored, trained earlier
        lines.append(
            f"| {r['concept']} | {r['method']} | {seed}{r['steps']} | {r['fidelity']:.2f} | {r['editability']:.2f} | "
            f"{r['prior']:.2f} | {cpu} | "
            f"{r['trainable_parameters']:,} | "
            f"{r['file_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines) + "\n"


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO_ROOT / "sample_data" / "world-sd1")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "quality")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "output" / "quality_bench")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of ti,lora,ti+lora")
    parser.add_argument("--concepts", default=",".join(c.name for c in quality.CONCEPTS))
    parser.add_argument("--max-steps", type=int, help="override every config's max_steps (quick runs)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run (repeatable)"
    )
    parser.add_argument("--config", type=Path, help="train with this config instead of the shipped one (one method)")
    parser.add_argument("--seeds", help="comma-separated seeds: train every method once per seed, report the means")
    parser.add_argument(
        "--per-background", type=int, default=quality.SEEDS_PER_BACKGROUND, help="concept images per background"
    )
    parser.add_argument(
        "--min-shape-iou", type=float, default=0.0, help="shapes count from this template IoU (0.4: no scribbles)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained rows")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the runs an earlier command trained in --work (same --seeds, --set, --config, --max-steps) "
        "instead of training: e.g. more images per background on the same files",
    )
    args = parser.parse_args(argv)
    problems = _argument_problems(args)
    if problems:
        parser.error("; ".join(problems))  # exits with every problem before anything trains
    return args


def _argument_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the command line, each with the value and the fix."""
    problems = []
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        problems.append(f"--methods: {', '.join(unknown)} unknown; choose from {', '.join(METHODS)}")
    names = [c.name for c in (*quality.CONCEPTS, *quality.STYLES)]
    unknown = [c for c in args.concepts.split(",") if c not in names]
    if unknown:
        problems.append(f"--concepts: {', '.join(unknown)} unknown; choose from {', '.join(names)}")
    if args.seeds and not all(s.strip().lstrip("-").isdigit() for s in args.seeds.split(",")):
        problems.append(f"--seeds: {args.seeds!r} is not a comma-separated list of integers (e.g. 42,7,123)")
    if args.per_background < 1:
        problems.append(f"--per-background: {args.per_background} must be at least 1")
    if not 0.0 <= args.min_shape_iou <= 1.0:
        problems.append(f"--min-shape-iou: {args.min_shape_iou} is not an IoU between 0 and 1 (e.g. 0.4)")
    if args.config and "," in args.methods:
        problems.append("--config replaces one method's config: give one method with --methods")
    if args.config and not args.config.is_file():
        problems.append(f"--config: {args.config} is not a file; check the path")
    return problems


def main() -> None:
    """Runs every (concept, method[, seed]) plus the untrained baseline and writes the results."""
    args = _arguments()
    quality.SEEDS_PER_BACKGROUND = args.per_background
    quality.MIN_SHAPE_IOU = args.min_shape_iou
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    if args.rescore:  # every folder is checked before anything is scored: a missing run fails in seconds
        for concept in args.concepts.split(","):
            for method in args.methods.split(","):
                for seed in seeds:
                    _finished_run(_work_folder(method, quality.concept_by_name(concept), seed, args))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for concept in map(quality.concept_by_name, args.concepts.split(",")):
        if not args.no_baseline:
            rows.append(run_one(None, concept, args))
            print(json.dumps(rows[-1]), flush=True)
        for method in args.methods.split(","):
            for seed in seeds:
                rows.append(run_one(method, concept, args, seed))
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (args.out / "quality.md").write_text(markdown_table(rows), encoding="utf-8")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
