"""Every check that needs no model weights, run before anything long starts (`sdtune validate`, `sdtune train`):
data files and captions, the base model's family and tokenizers, placeholder tokens, a LoRA file to continue from,
optional packages, the device, a state to resume from; and the step arithmetic (`sdtune data`, `sdtune validate`).

Nothing here imports the training loop or loads weights.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from sdtune import data, families, logs, models, run_folder, state
from sdtune.config import ConfigError, TrainConfig, with_native_resolution
from sdtune.families import Family
from sdtune.methods import lora, textual_inversion

OPTIONAL_OPTIMIZERS = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}  # optimizer_type -> pip package
logger = logging.getLogger(__name__)


class StepsPlan(NamedTuple):
    """How a run's optimizer steps fall into epochs."""

    per_epoch: int  # optimizer steps per epoch
    total: int  # optimizer steps to train
    epochs: int  # epochs started


def steps_plan(config: TrainConfig, num_examples: int, batches_per_epoch: int | None = None) -> StepsPlan:
    """The steps of a dataset of `num_examples`.

    One epoch is `ceil(num_examples / batch_size)` batches (or `batches_per_epoch`: with buckets every bucket ends
    in its own partial batch); one optimizer step takes `gradient_accumulation_steps` batches (the last step of an
    epoch may take fewer). `max_steps`, when set, overrides `epochs`.
    """
    batches_per_epoch = batches_per_epoch or math.ceil(num_examples / config.batch_size)
    per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total = config.max_steps or config.epochs * per_epoch
    return StepsPlan(per_epoch, total, math.ceil(total / per_epoch))


def dataset_steps(config: TrainConfig, examples: list[data.Example]) -> StepsPlan:
    """The steps of training on `examples` with one process (with buckets: their batches per epoch)."""
    if not config.enable_bucket:
        return steps_plan(config, len(examples))
    plan = data.bucket_plan(examples, config)
    return steps_plan(config, len(examples), len(data.BucketBatches(plan["assigned"], config.batch_size, config.seed)))


def batch_summary(config: TrainConfig, processes: int) -> str:
    """The effective batch: samples per optimizer step over all processes."""
    total = config.batch_size * config.gradient_accumulation_steps * processes
    return (
        f"effective batch: {config.batch_size} per process x {config.gradient_accumulation_steps} accumulation x "
        f"{processes} process{'es' if processes > 1 else ''} = {total} samples per optimizer step"
    )


def resolved(config: TrainConfig) -> TrainConfig:
    """`config` with the defaults that follow from the base model's family filled in (`resolution`: its native size,
    768 for SD2.x v-prediction; the bucket bounds), the family read cheaply (checkpoint keys or `model_index.json`).
    Unchanged when the base model cannot be read: `preflight` says why.

    Raises:
        ConfigError: Bucket bounds that do not fit the resolution.
    """
    if config.resolution is not None:
        return config
    try:
        family = models.require_supported(models.detect_family(config.base_model), Path(config.base_model))
        predicts = models.prediction_type_of(config.base_model, config.prediction_type, config.base_model_config)
    except models.ModelError:
        return config
    return with_native_resolution(config, families.native_resolution(family, predicts))


def preflight(config: TrainConfig) -> list[data.Example]:
    """Every check that needs no model weights: data files, captions, model family, tokens, method, packages.
    `config` should be `resolved` (a config without a resolution skips the image-size checks).

    Returns:
        The training examples.

    Raises:
        ConfigError: With all problems found; nothing has been loaded yet.
    """
    errors: list[str] = _optimizer_problems(config) + _device_problems(config) + logs.missing_packages(config)
    examples, data_errors = data.scan_dataset(config, config.placeholder_token if config.uses_ti else None)
    errors += data_errors + _output_problems(config, examples)
    try:
        family, tokenizers = models.read_base(config.base_model, config.base_model_config)
        models.prediction_type_of(config.base_model, config.prediction_type, config.base_model_config)
    except models.ModelError as error:
        errors.append(str(error))
    else:
        errors += _family_problems(config, family)
        if config.network_weights:
            errors += lora.file_config_problems(Path(config.network_weights), config, family)
        errors += caption_problems(config, list(tokenizers.values()), examples)
    if errors:
        raise ConfigError(errors, "checks before loading the model")
    return examples


def _output_problems(config: TrainConfig, examples: list[data.Example]) -> list[str]:
    """The output folder: in use by another training, holding another run's outputs, or (with `resume`) a state
    that this config and data cannot continue."""
    folder = Path(config.output_dir)
    # only the launcher's first process writes (and locks) the folder: the others would see its lock
    main_process = int(os.environ.get("RANK", "0")) == 0
    in_use = run_folder.lock_problem(folder) if main_process else None
    if in_use:
        return [in_use]
    if not config.resume:
        return run_folder.ownership_problems(config) if main_process else []
    try:
        path = state.resolve(config.resume, folder)
    except state.StateError as error:
        return [str(error)]
    meta = state.read_meta(path)
    problems = run_folder.ownership_problems(config, meta.get("run_id")) if main_process else []
    return problems + _resume_problems(config, examples, path, meta)


def _resume_problems(config: TrainConfig, examples: list[data.Example], path: Path, meta: dict) -> list[str]:
    """What differs between the state `path` and this run: settings (named), data (what changed), and a length
    that the state has already reached. A longer or shorter run is stated, not refused."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's count; accelerate is not set up yet
    problems = []
    if "settings" in meta:
        changed = state.settings_changes(meta["settings"], state.resumable_settings(config, processes))
        if changed:
            problems.append(
                f"resume: {path} was saved with other settings ({'; '.join(changed)}); resume with the settings "
                "that wrote it (only output, logging, save and length settings may change), or start a new run."
            )
    elif meta["config_digest"] not in state.accepted_digests(config, processes):
        problems.append(
            f"resume: {path} was saved by a run with other training settings (method, data, batch, optimizer, "
            "number of processes...); resume with the config and launch that wrote it, or start a new output_dir."
        )
    problems += _resume_data_problems(path, meta, examples)
    if examples and not problems:
        problems += _resume_length_problems(config, examples, path, meta)
    return problems


def _resume_data_problems(path: Path, meta: dict, examples: list[data.Example]) -> list[str]:
    if "dataset" not in meta or not examples:
        return []
    refusals, notes = state.dataset_changes(meta["dataset"], state.dataset_fingerprint(examples))
    for note in notes:
        logger.warning("resume: %s since %s was saved; resuming", note, path)
    if not refusals:
        return []
    return [
        f"resume: the training data changed since {path} was saved: {'; '.join(refusals)}. Resuming would not "
        "continue the same run: restore the data, or start a new run (a new output_dir, or overwrite: true) that "
        "starts from the trained file (network_weights: for a LoRA)."
    ]


def _resume_length_problems(config: TrainConfig, examples: list[data.Example], path: Path, meta: dict) -> list[str]:
    total, done = dataset_steps(config, examples).total, meta["position"]["step"]
    if total <= done:
        return [
            f"resume: {path} is at step {done} and this config trains {total} steps in all; to train on, set "
            f"max_steps above {done}."
        ]
    planned = meta.get("total_steps")
    if planned and planned != total:
        logger.warning(
            "resume: the run now trains %d steps (it was saved planning %d): the learning-rate schedule (%s) "
            "spans %d steps from here on",
            total, planned, config.lr_scheduler, total,
        )  # fmt: skip
    return []


def _family_problems(config: TrainConfig, family: Family) -> list[str]:
    """Settings that mean nothing for the base model's family."""
    if config.clip_skip > 1 and not family.clip_skip:
        return [
            f"clip_skip: {config.clip_skip}, but {family.title} reads the penultimate layer of every text encoder by "
            "design, so clip_skip has no meaning for it (kohya ignores it with a warning); remove clip_skip."
        ]
    return []


def caption_problems(config: TrainConfig, tokenizers: list, examples: list[data.Example]) -> list[str]:
    """The placeholder and init word against every tokenizer of the base (TI), then the captions' lengths (every
    method): what `sdtune validate`, `sdtune data` and training check alike."""
    problems = []
    for tokenizer in tokenizers if config.uses_ti else ():
        problems += textual_inversion.check_tokens(
            tokenizer, config.placeholder_token, config.num_vectors, config.init_word
        )
    if not problems:
        for tokenizer in tokenizers:
            problems += _caption_length_problems(config, tokenizer, examples)
    return list(dict.fromkeys(problems))  # tokenizers sharing a vocabulary report a problem once


def _caption_length_problems(config: TrainConfig, tokenizer, examples: list[data.Example]) -> list[str]:
    """Captions CLIP would cut: an error where the TI placeholder itself is cut off, a warning otherwise.

    `tokenizer` is a throwaway copy of a base tokenizer; the placeholder tokens are added to it here.
    """
    limit = tokenizer.model_max_length - 2  # BOS and EOS take two of the 77 positions
    placeholder, count = (config.placeholder_token, config.num_vectors) if config.uses_ti else (None, 0)
    last_vector_id = None
    if placeholder:
        tokenizer.add_tokens(textual_inversion.placeholder_tokens(placeholder, count))
        last_vector_id = tokenizer.convert_tokens_to_ids(textual_inversion.placeholder_tokens(placeholder, count)[-1])
    errors, truncated = [], []
    for example in dict.fromkeys(e for e in examples if e.caption is not None):  # each image once, not per repeat
        text = data.full_caption(example.caption, example.subset)
        text = textual_inversion.expand_placeholder(text, placeholder, count) if placeholder else text
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= limit:
            continue
        truncated.append(example.image_path.name)
        if last_vector_id is not None and last_vector_id not in ids[:limit]:
            errors.append(
                f"{example.image_path.name}: the caption is {len(ids)} tokens and CLIP reads only {limit}; the "
                f"placeholder {placeholder!r} falls after the cut. Move it to the front of the caption."
            )
    if truncated:
        logger.warning("%d caption(s) exceed %d tokens and are cut: %s", len(truncated), limit, ", ".join(truncated))
    return errors


def _device_problems(config: TrainConfig) -> list[str]:
    """Settings this machine cannot run: fp16 autocast and xformers need CUDA; xformers needs its package."""
    problems = []
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("mixed_precision: fp16 needs a CUDA GPU (autocast on CPU runs bf16); use bf16 or no here.")
    if config.xformers and importlib.util.find_spec("xformers") is None:
        problems.append(
            "xformers: true needs the xformers package: pip install 'sdtune[xformers]' (it pins its own torch), "
            "or remove it: PyTorch's SDPA attention is the default and as fast on current torch."
        )
    elif config.xformers and not torch.cuda.is_available():
        problems.append("xformers: true needs a CUDA GPU (its kernels have no CPU version); remove it here.")
    if config.tf32 and not torch.cuda.is_available():
        problems.append("tf32: true needs a CUDA GPU (Ampere or newer); remove it here.")
    elif config.tf32 and config.mixed_precision != "no":
        problems.append(
            f"tf32: true speeds up float32 math, but mixed_precision is {config.mixed_precision}; remove one."
        )
    return problems


def _optimizer_problems(config: TrainConfig) -> list[str]:
    """An optimizer whose optional package is not installed."""
    package = OPTIONAL_OPTIMIZERS.get(config.optimizer_type)
    if package and importlib.util.find_spec(package) is None:
        return [f"optimizer_type: {config.optimizer_type} needs {package}: pip install {package} (or use adamw)."]
    return []
