"""The `sdtune` command: a table of subcommands, each parsing its arguments and calling one function."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from sdtune import compat, data, formats, inference, jobs, labeling, preflight, prompts
from sdtune._version import __version__
from sdtune.config import ConfigError, load_config
from sdtune.errors import SdtuneError
from sdtune.models import PREDICTION_TYPES, PRESETS, ModelError, load_base_model, read_base, write_base_model

EXIT_BAD_INPUT = 2


def _quiet_libraries(diffusers: bool = True) -> None:
    """Hides the per-component loading bars of transformers (and diffusers); sdtune shows its own progress.
    `diffusers=False` on commands that never load it (it takes a second to import)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    if diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()  # e.g. "No LoRA keys associated to CLIPTextModel" for UNet-only files


def cmd_train(args: argparse.Namespace) -> int:
    """`sdtune train CONFIG [key=value ...]`."""
    from sdtune.train import train  # accelerate, diffusers and peft: only training needs them all

    config = load_config(args.config, args.overrides)
    _quiet_libraries()
    result = train(config)
    if not result.main_process:
        return 0
    print(f"trained {result.steps} steps, last loss {result.last_loss:.4f}")
    for path in result.saved_paths:
        print(f"wrote {path}")
    if result.samples_command:
        print(f"the last sample grid's images, drawn again from the saved files: {result.samples_command}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """`sdtune validate CONFIG [key=value ...]`: every check `train` makes before loading weights."""
    config = preflight.resolved(load_config(args.config, args.overrides))
    _quiet_libraries(diffusers=False)
    examples = preflight.preflight(config)
    captioned = len({example.image_path for example in examples if example.caption is not None})
    images = len({example.image_path for example in examples})
    repeats = "" if images == len(examples) else f" ({len(examples)} samples per epoch with repeats)"
    per_epoch, total, epochs = preflight.dataset_steps(config, examples)
    print(f"{args.config}: OK")
    print(f"  method {config.method}, base model {config.base_model}, resolution {config.resolution}")
    print(f"  {images} images, {captioned} with captions" + ("" if captioned else " (prompt templates)") + repeats)
    print(
        f"  {config.batch_size} images per batch x {config.gradient_accumulation_steps} accumulation = "
        f"{config.batch_size * config.gradient_accumulation_steps} per optimizer step"
    )
    print(f"  {per_epoch} optimizer steps per epoch, {total} steps in {epochs} epoch(s)")
    print(f"  output: {config.output_dir}/{config.output_name}.safetensors")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """`sdtune data CONFIG [key=value ...]`: what training would read, per subset, and the step arithmetic."""
    config = preflight.resolved(load_config(args.config, args.overrides))
    if config.resolution is None:
        raise ConfigError(
            [f"resolution: unset, and base_model {config.base_model} cannot be read to take its family's native "
             "size; run `sdtune validate` for why, or set resolution."], "data",
        )  # fmt: skip
    placeholder = config.placeholder_token if config.uses_ti else None
    skipped: list[str] = []
    examples, problems = data.scan_dataset(config, placeholder, skipped)
    print("\n".join(data.describe_dataset(examples)))
    if skipped:
        print(f"skipped {len(skipped)} image(s) (bad_images: skip):")
        print("\n".join(f"  - {reason}" for reason in skipped))
    if examples:
        if config.enable_bucket:
            print("\n".join(data.describe_buckets(data.bucket_plan(examples, config))))
        per_epoch, total, epochs = preflight.dataset_steps(config, examples)
        print(
            f"total: {len(examples)} samples per epoch; {config.batch_size} per batch x "
            f"{config.gradient_accumulation_steps} accumulation -> {per_epoch} optimizer steps per epoch; "
            f"{total} steps in {epochs} epoch(s)"
        )
    try:  # tokenizers only (no weights): the caption checks `validate` makes
        _, tokenizers = read_base(config.base_model, config.base_model_config)
        problems += preflight.caption_problems(config, list(tokenizers.values()), examples)
    except ModelError as error:  # the data can still be shown; `validate` reports the base model
        print(f"caption lengths not checked: {error}", file=sys.stderr)
    if problems:
        raise ConfigError(problems, "data")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    """`sdtune label DIR [--backend template|openclip|blip] ...`: write or update DIR/metadata.csv."""
    labeling.folder_images(Path(args.folder))  # a wrong folder is reported before any model is looked up
    result = labeling.label_folder(
        Path(args.folder),
        _captioner(args),
        trigger=args.trigger,
        prefix=args.prefix,
        suffix=args.suffix,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        caption_column=args.caption_column,
        bad_images=args.bad_images,
    )
    print(f"wrote {result.written} caption(s), kept {result.kept} existing: {result.path}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} image(s) that do not decode (--bad-images skip)", file=sys.stderr)
    top = list(result.tag_frequency.items())[:15]
    if top:
        print("tags: " + ", ".join(f"{tag} ({count})" for tag, count in top))
    return 0


def _captioner(args: argparse.Namespace) -> labeling.Captioner:
    """The captioner of `--backend`, its model and options checked on disk (nothing loaded or downloaded yet)."""
    used = {"template": (), "blip": ("model",), "openclip": ("model", "pretrained", "model_config", "tags")}
    ignored = [name for name in ("model", "pretrained", "model_config", "tags") if getattr(args, name)]
    ignored = [f"--{name.replace('_', '-')}" for name in ignored if name not in used[args.backend]]
    if ignored:
        raise labeling.LabelError(f"{', '.join(ignored)}: not used by --backend {args.backend}; drop it or change it.")
    if args.backend == "template":
        return labeling.TemplateCaptioner(args.template, args.trigger or "")
    if not args.model:
        raise labeling.LabelError(f"--backend {args.backend} needs --model (an open_clip model name / a BLIP folder).")
    if args.backend == "blip":
        return labeling.BlipCaptioner(args.model, device=args.device)
    if args.model_config:
        labeling.register_openclip_config(args.model_config)
    tags = labeling.read_tags(args.tags) if args.tags else labeling.DEFAULT_TAGS
    return labeling.OpenClipTagger(args.model, args.pretrained, tags, args.top_k, args.threshold, args.device)


def cmd_inspect(args: argparse.Namespace) -> int:
    """`sdtune inspect FILE [--base MODEL]`: what a LoRA or embedding is, and whether it fits a base model."""
    artifact = formats.read_artifact(args.file)
    print(formats.to_json(artifact) if args.json else formats.describe(artifact))
    if not args.base:
        return 0
    _quiet_libraries()
    base = load_base_model(args.base, args.base_config)
    report = compat.check_fit(artifact, base)
    if not report.fits:
        print(compat.incompatibility_message(artifact, base, report), file=sys.stderr)
        return EXIT_BAD_INPUT
    what = "every key maps to a module of it with matching shapes" if artifact.kind == "lora" else "widths match"
    print(f"fits {args.base}: {what}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """`sdtune generate --base MODEL (--prompt P | --prompts-file F | --jobs F) [...]`: batch generation."""
    defaults = {
        "negative_prompt": args.negative, "n": args.n, "seed": args.seed, "steps": args.steps,
        "guidance": args.guidance, "width": args.width, "height": args.height, "sampler": args.sampler,
        "clip_skip": args.clip_skip,
    }  # fmt: skip
    jobs.make_job({"prompt": ""}, defaults, "command line")  # its own values, even where every job overrides them
    work = [jobs.make_job({"prompt": p}, defaults, f"--prompt {jobs.shorten(p)!r}") for p in args.prompt]
    for path in args.prompts_file + args.jobs:
        work += jobs.read_jobs(Path(path), defaults)
    if not work:
        raise jobs.JobError("nothing to generate: give --prompt, --prompts-file or --jobs")
    jobs.check_run_options(Path(args.out), args.batch_size)
    library = prompts.AdapterLibrary(args.lora_dir, args.embedding_dir)
    loras = []
    for spec in args.lora:  # weights read before the model loads
        path, numbers = jobs.split_spec(spec)
        loras.append((path, prompts.lora_weights(Path(path).stem, numbers, f"--lora {spec}")))
    _quiet_libraries()
    pipe = inference.AdapterPipeline.from_base(
        args.base, args.sampler, args.device, args.base_config, args.prediction_type
    )
    for path, (te, unet) in loras:
        jobs.report_warnings(pipe.add_lora(path, text_encoder_weight=te, unet_weight=unet, force=args.force))
    for spec in args.embedding:
        path, token = jobs.split_spec(spec)
        jobs.report_warnings(pipe.add_embedding(path, token=token[0] if token else None, force=args.force))
    pipe.fuse(args.fuse)
    runner = jobs.BatchRunner(pipe, library, Path(args.out), force=args.force)
    written = runner.run(work, batch_size=args.batch_size, grid=args.grid)
    print(f"wrote {len(written)} file(s) and {Path(args.out) / jobs.MANIFEST}")
    return 0


def cmd_make_base(args: argparse.Namespace) -> int:
    """`sdtune make-base DIR [--checkpoint FILE]`: write a random-weight base model (SD1.x, SD2.x or SDXL) offline."""
    _quiet_libraries()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    write_base_model(args.folder, args.checkpoint, args.preset, args.seed, dtype, overwrite=args.overwrite)
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
        ("data", cmd_data, "show what training would read: subsets, captions, tags, steps (no model loaded)"),
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
    sub = commands.add_parser("make-base", help="write a random-weight SD1.x, SD2.x or SDXL base model (offline)")
    sub.add_argument("folder", nargs="?", help="diffusers folder to write")
    sub.add_argument("--checkpoint", help="also write a single-file .safetensors checkpoint (original layout)")
    sub.add_argument(
        "--preset",
        choices=PRESETS,
        default="tiny",
        help="tiny, tiny-sd2, tiny-sd2-v, tiny-sdxl (a few M params); sd15, sd2, sd2-768v, sdxl (real shapes)",
    )
    sub.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    sub.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the checkpoint file")
    sub.add_argument("--overwrite", action="store_true", help="replace a folder/file an earlier make-base wrote")
    sub.set_defaults(function=cmd_make_base)
    sub = commands.add_parser("label", help="caption an image folder into metadata.csv (file_name,text)")
    _add_label_arguments(sub)
    sub.set_defaults(function=cmd_label)
    sub = commands.add_parser("generate", help="generate images with stacked LoRAs and embeddings")
    _add_generate_arguments(sub)
    sub.set_defaults(function=cmd_generate)
    return parser


def _add_label_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("folder", help="image folder; DIR/metadata.csv is written or updated")
    sub.add_argument("--backend", choices=("template", "openclip", "blip"), default="template")
    sub.add_argument("--template", default="a photo of {trigger}", help="template backend: the caption")
    sub.add_argument("--trigger", help="trigger word, put first in every caption (unless already there)")
    sub.add_argument("--prefix", help="text before every caption")
    sub.add_argument("--suffix", help="text after every caption")
    sub.add_argument("--overwrite", action="store_true", help="replace existing captions (default: keep them)")
    sub.add_argument("--batch-size", type=int, default=8, help="images per model call")
    sub.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    sub.add_argument("--caption-column", default="text", help="caption column of metadata.csv")
    bad = "openclip/blip: an image that does not decode stops the run (error) or stays uncaptioned (skip)"
    sub.add_argument("--bad-images", choices=("error", "skip"), default="error", help=bad)
    sub.add_argument("--model", help="openclip: model name (e.g. ViT-B-32); blip: model folder or downloaded hub name")
    sub.add_argument(
        "--pretrained", help="openclip: local checkpoint file, or pretrained tag (e.g. openai) already downloaded"
    )
    sub.add_argument("--model-config", help="openclip: JSON config of a model open_clip does not list")
    sub.add_argument("--tags", help="openclip: tag vocabulary file, one tag per line (default: a built-in list)")
    sub.add_argument("--top-k", type=int, default=5, help="openclip: tags per image")
    sub.add_argument("--threshold", type=float, default=-1.0, help="openclip: minimum cosine similarity")


def _add_generate_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--base", required=True, help="base model: diffusers folder or single-file checkpoint")
    sub.add_argument("--base-config", help="for single-file bases with non-standard shapes: their config folder")
    sub.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="what the base predicts, when its file does not say (SD2.x single files: 768-v predicts v_prediction)",
    )
    sub.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); <lora:NAME:W> tags work")
    sub.add_argument("--prompts-file", action="append", default=[], help="text file, one prompt per line")
    sub.add_argument("--jobs", action="append", default=[], help="YAML or JSONL job file (per-job settings)")
    sub.add_argument("--negative", default="", help="negative prompt")
    sub.add_argument("--n", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    sub.add_argument("--seed", type=int, help="first seed, 0 to 2**64-1 (default or -1: random, recorded)")
    sub.add_argument("--batch-size", type=int, default=1, help="images per forward pass (same images, faster)")
    sub.add_argument("--steps", type=int, default=20, help="sampling steps")
    sub.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (CFG) scale")
    sub.add_argument("--width", type=int, help="image width (default: the base model's native size)")
    sub.add_argument("--height", type=int, help="image height (default: the base model's native size)")
    sub.add_argument("--sampler", choices=list(inference.SAMPLERS), default="dpmpp_2m", help="sampler")
    sub.add_argument("--clip-skip", type=int, default=1, help="text-encoder layer from the end (A1111: 1 = last)")
    sub.add_argument(
        "--lora", action="append", default=[], help="LoRA for every image: FILE[:W] or FILE[:TE_W:UNET_W]"
    )
    sub.add_argument("--embedding", action="append", default=[], help="embedding: FILE[:TOKEN] (token: file stem)")
    sub.add_argument("--lora-dir", action="append", default=[], help="folder that <lora:NAME:W> names resolve in")
    sub.add_argument("--embedding-dir", action="append", default=[], help="folder of embeddings used by file stem")
    sub.add_argument("--out", default="output/generated", help="output folder (PNGs + manifest.jsonl)")
    sub.add_argument("--grid", action="store_true", help="also write grid.png, a contact sheet of this run")
    sub.add_argument("--fuse", action="store_true", help="bake LoRA weights into the model (faster sampling)")
    sub.add_argument("--force", action="store_true", help="accept files made on another checkpoint of the family")
    sub.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdtune` command. Returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    if args.command == "make-base" and not (args.folder or args.checkpoint):
        print("sdtune make-base: give a folder, --checkpoint FILE, or both.", file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.function(args)
    except SdtuneError as error:  # written for the user: the message, no traceback
        print(f"sdtune {args.command}: {error}", file=sys.stderr)
        return error.exit_code
