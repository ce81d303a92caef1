"""The training loop: check everything cheap first, load the base, then accumulate -> loss -> step -> log -> save."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdtune import compat, data, diffusion, export, models
from sdtune.config import ConfigError, TrainConfig, to_dict
from sdtune.methods import textual_inversion

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    final_path: Path
    saved_paths: list[Path] = field(default_factory=list)
    steps: int = 0
    last_loss: float = float("nan")


def preflight(config: TrainConfig) -> list[data.Example]:
    """Every check that needs no model weights: data files, captions, model family, tokens, method.

    Returns:
        The training examples.

    Raises:
        ConfigError: With all problems found; nothing has been loaded yet.
    """
    errors: list[str] = []
    if config.uses_lora:
        errors.append(
            f"method: {config.method!r} needs LoRA training, which this version of sdtune does not have yet; "
            "use method: ti."
        )
    placeholder = config.placeholder_token if config.uses_ti else None
    examples, data_errors = data.scan_dataset(config, placeholder)
    errors += data_errors
    try:
        tokenizer = models.load_tokenizer(config.base_model, config.base_model_config)
    except models.ModelError as error:
        errors.append(str(error))
    else:
        if config.uses_ti:
            token_errors = textual_inversion.check_tokens(
                tokenizer, config.placeholder_token, config.effective_num_vectors, config.init_word
            )
            errors += token_errors or _caption_length_problems(config, tokenizer, examples)
    if errors:
        raise ConfigError(errors, "checks before loading the model")
    return examples


def _caption_length_problems(config: TrainConfig, tokenizer, examples: list[data.Example]) -> list[str]:
    """Captions CLIP would cut: an error where the placeholder itself is cut off, a warning otherwise.

    `tokenizer` is a throwaway copy of the base tokenizer; the placeholder tokens are added to it here.
    """
    limit = tokenizer.model_max_length - 2  # BOS and EOS take two of the 77 positions
    placeholder, count = config.placeholder_token, config.effective_num_vectors
    tokenizer.add_tokens(textual_inversion.placeholder_tokens(placeholder, count))
    last_vector_id = tokenizer.convert_tokens_to_ids(textual_inversion.placeholder_tokens(placeholder, count)[-1])
    errors, truncated = [], []
    for example in examples:
        if example.caption is None:
            continue
        text = textual_inversion.expand_placeholder(example.caption, placeholder, count)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= limit:
            continue
        truncated.append(example.image_path.name)
        if last_vector_id not in ids[:limit]:
            errors.append(
                f"{example.image_path.name}: the caption is {len(ids)} tokens and CLIP reads only {limit}; the "
                f"placeholder {placeholder!r} falls after the cut. Move it to the front of the caption."
            )
    if truncated:
        logger.warning("%d caption(s) exceed %d tokens and are cut: %s", len(truncated), limit, ", ".join(truncated))
    return errors


def steps_plan(config: TrainConfig, num_examples: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total optimizer steps, epochs to run) for a dataset of `num_examples`.

    One epoch is `ceil(num_examples / batch_size)` batches; one optimizer step takes `gradient_accumulation_steps`
    batches (the last step of an epoch may take fewer). `max_steps`, when set, overrides `epochs`.
    """
    batches_per_epoch = math.ceil(num_examples / config.batch_size)
    updates_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total = config.max_steps or config.epochs * updates_per_epoch
    return updates_per_epoch, total, math.ceil(total / updates_per_epoch)


def _encode_prompts(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device))[0]


def _loss(batch: dict, base: models.BaseModel, scheduler, captions: list[str], device: torch.device) -> torch.Tensor:
    """Denoising loss of one batch: encode images, add noise at random timesteps, predict, compare."""
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device)
        latents = base.vae.encode(pixels).latent_dist.sample() * base.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = diffusion.sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden_states = _encode_prompts(base.tokenizer, base.text_encoder, captions, device)
    prediction = base.unet(noisy, timesteps, hidden_states).sample
    return diffusion.denoising_loss(prediction, diffusion.training_target(scheduler, latents, noise, timesteps))


def _embedding_metadata(config: TrainConfig, record: dict[str, str], base: models.BaseModel, steps: int) -> dict:
    metadata = export.modelspec_metadata(
        base.family, "textual-inversion", config.effective_output_name, config.resolution, base.prediction_type
    )
    metadata["modelspec.trigger_phrase"] = config.effective_output_name
    metadata.update(record)
    metadata.update(
        {
            "sdtune.kind": "textual_inversion",
            "sdtune.placeholder_token": config.placeholder_token,
            "sdtune.num_vectors": str(config.effective_num_vectors),
            "sdtune.init_word": config.init_word,
            "sdtune.steps": str(steps),
            "sdtune.resolution": str(config.resolution),
        }
    )
    return metadata


def _save(config, record, base, vectors: torch.Tensor, step: int, final: bool) -> Path:
    name = config.effective_output_name + ("" if final else f"-step{step:08d}")
    path = Path(config.output_dir) / f"{name}.safetensors"
    return export.save_embedding(path, vectors.detach(), _embedding_metadata(config, record, base, step))


def _writer(config: TrainConfig):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(config.effective_logging_dir))
    writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in to_dict(config).items()))
    return writer


@dataclass
class _Run:
    """Everything the loop touches, built by `_setup`."""

    config: TrainConfig
    accelerator: object
    base: models.BaseModel
    record: dict[str, str]
    vectors: torch.nn.Parameter
    noise_scheduler: object
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    total_steps: int
    num_epochs: int


def _setup(config: TrainConfig, examples: list[data.Example]) -> _Run:
    """Loads the base, attaches the placeholder, and builds data loader, optimizer and schedule."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)
    base = models.load_base_model(config.base_model, config.base_model_config)
    record = compat.base_record(base)  # before the placeholder changes the tokenizer
    vectors = textual_inversion.attach(
        base.tokenizer, base.text_encoder, config.placeholder_token, config.effective_num_vectors, config.init_word
    )
    dataset = data.ImageCaptionDataset(examples, config, templates_subject=config.placeholder_token)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    _, total_steps, num_epochs = steps_plan(config, len(dataset))
    # Only the new vectors are optimised; the base embedding table never reaches the optimizer.
    optimizer = torch.optim.AdamW([vectors], lr=config.effective_learning_rate, weight_decay=config.adam_weight_decay)
    lr_schedule = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps
    )
    base.text_encoder, optimizer, loader = accelerator.prepare(base.text_encoder, optimizer, loader)
    base.unet.to(accelerator.device)
    base.vae.to(accelerator.device)
    base.text_encoder.train()
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    return _Run(
        config,
        accelerator,
        base,
        record,
        vectors,
        noise_scheduler,
        loader,
        optimizer,
        lr_schedule,
        total_steps,
        num_epochs,
    )


def _log_step(run: _Run, writer, result: TrainResult, started: float) -> None:
    learning_rate = run.lr_schedule.get_last_lr()[0]
    if writer is not None:
        writer.add_scalar("loss", result.last_loss, result.steps)
        writer.add_scalar("lr", learning_rate, result.steps)
        writer.add_scalar("steps_per_second", result.steps / (time.perf_counter() - started), result.steps)


def _batches(run: _Run):
    """The batches of all epochs, as many as the planned steps need."""
    for _epoch in range(run.num_epochs):
        yield from run.loader


def train(config: TrainConfig) -> TrainResult:
    """Trains a textual-inversion embedding as the config says and writes it to `output_dir`.

    Args:
        config: A validated config (see `sdtune.config.load_config`).

    Returns:
        The files written, the number of optimizer steps and the last loss.

    Raises:
        ConfigError: Bad data, tokens or model, found before any weights load.
        models.ModelError: The base model cannot be loaded.
    """
    run = _setup(config, preflight(config))
    accelerator, placeholder, vectors = run.accelerator, config.placeholder_token, config.effective_num_vectors
    result = TrainResult(final_path=Path(config.output_dir) / f"{config.effective_output_name}.safetensors")
    writer = _writer(config) if accelerator.is_main_process else None
    progress = tqdm(total=run.total_steps, desc="train", unit="step", disable=not accelerator.is_main_process)
    started = time.perf_counter()
    for batch in _batches(run):
        with accelerator.accumulate(run.base.text_encoder):
            captions = [textual_inversion.expand_placeholder(c, placeholder, vectors) for c in batch["caption"]]
            loss = _loss(batch, run.base, run.noise_scheduler, captions, accelerator.device)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                run.optimizer.step()
                run.lr_schedule.step()
                run.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        result.steps += 1
        result.last_loss = loss.detach().item()
        progress.update(1)
        progress.set_postfix(loss=f"{result.last_loss:.4f}", lr=f"{run.lr_schedule.get_last_lr()[0]:.2e}")
        _log_step(run, writer, result, started)
        is_save_step = config.save_steps and result.steps % config.save_steps == 0
        if accelerator.is_main_process and is_save_step and result.steps < run.total_steps:
            result.saved_paths.append(_save(config, run.record, run.base, run.vectors, result.steps, final=False))
        if result.steps >= run.total_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result.saved_paths.append(_save(config, run.record, run.base, run.vectors, result.steps, final=True))
        writer.close()
    return result
