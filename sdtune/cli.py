"""The `sdtune` command: a table of subcommands, each parsing its arguments and calling one function."""

from __future__ import annotations

import argparse
import os
import sys

from sdtune import __version__
from sdtune.config import ConfigError, load_config
from sdtune.formats import FormatError
from sdtune.models import PRESETS, ModelError

EXIT_BAD_INPUT = 2


def _quiet_libraries() -> None:
    """Hides the per-component loading bars of diffusers/transformers; sdtune shows its own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace) -> int:
    """`sdtune train CONFIG [key=value ...]`."""
    from sdtune.train import train

    config = load_config(args.config, args.overrides)
    _quiet_libraries()
    result = train(config)
    print(f"trained {result.steps} steps, last loss {result.last_loss:.4f}")
    for path in result.saved_paths:
        print(f"wrote {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """`sdtune validate CONFIG [key=value ...]`: every check `train` makes before loading weights."""
    from sdtune.train import preflight, steps_plan

    config = load_config(args.config, args.overrides)
    _quiet_libraries()
    examples = preflight(config)
    captioned = sum(example.caption is not None for example in examples)
    per_epoch, total, epochs = steps_plan(config, len(examples))
    print(f"{args.config}: OK")
    print(f"  method {config.method}, base model {config.base_model}")
    print(f"  {len(examples)} images, {captioned} with captions" + ("" if captioned else " (prompt templates)"))
    print(
        f"  {config.batch_size} images per batch x {config.gradient_accumulation_steps} accumulation = "
        f"{config.batch_size * config.gradient_accumulation_steps} per optimizer step"
    )
    print(f"  {per_epoch} optimizer steps per epoch, {total} steps in {epochs} epoch(s)")
    print(f"  output: {config.output_dir}/{config.effective_output_name}.safetensors")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """`sdtune inspect FILE [--base MODEL]`: what a LoRA or embedding is, and whether it fits a base model."""
    from sdtune import artifacts
    from sdtune.models import load_base_model

    artifact = artifacts.read_artifact(args.file)
    print(artifacts.to_json(artifact) if args.json else artifacts.describe(artifact))
    if not args.base:
        return 0
    _quiet_libraries()
    problems = artifacts.fit_problems(artifact, load_base_model(args.base, args.base_config))
    if problems:
        print(f"does NOT fit {args.base}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    what = "every key maps to a module of it with matching shapes" if artifact.kind == "lora" else "widths match"
    print(f"fits {args.base}: {what}")
    return 0


def cmd_make_base(args: argparse.Namespace) -> int:
    """`sdtune make-base DIR [--checkpoint FILE]`: write a random-weight SD1-family base model offline."""
    import torch

    from sdtune.models import write_base_model

    _quiet_libraries()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    write_base_model(args.folder, args.checkpoint, preset=args.preset, seed=args.seed, dtype=dtype)
    for path in (args.folder, args.checkpoint):
        if path:
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="sdtune", description="Stable Diffusion personalization: TI and LoRA.")
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, function, help_text in (
        ("train", cmd_train, "train as a YAML config says"),
        ("validate", cmd_validate, "check a config, its data and base model without training"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="YAML config file")
        sub.add_argument("overrides", nargs="*", help="key=value settings that override the file")
        sub.set_defaults(function=function)
    sub = commands.add_parser("inspect", help="describe a LoRA or embedding file; check it against a base model")
    sub.add_argument("file", help="LoRA (.safetensors, kohya or diffusers layout) or embedding (.safetensors / .pt)")
    sub.add_argument("--base", help="base model (diffusers folder or checkpoint) to check the file against")
    sub.add_argument("--base-config", help="for single-file bases with non-standard shapes: their config folder")
    sub.add_argument("--json", action="store_true", help="print the summary as JSON")
    sub.set_defaults(function=cmd_inspect)
    sub = commands.add_parser("make-base", help="write a random-weight SD1-family base model (offline)")
    sub.add_argument("folder", nargs="?", help="diffusers folder to write")
    sub.add_argument("--checkpoint", help="also write a single-file .safetensors checkpoint (original layout)")
    sub.add_argument("--preset", choices=PRESETS, default="tiny", help="tiny (~2 M params) or sd15 (SD1.5's shapes)")
    sub.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    sub.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the checkpoint file")
    sub.set_defaults(function=cmd_make_base)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdtune` command. Returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    if args.command == "make-base" and not (args.folder or args.checkpoint):
        print("sdtune make-base: give a folder, --checkpoint FILE, or both.", file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.function(args)
    except (ConfigError, ModelError, FormatError) as error:
        print(f"sdtune {args.command}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
