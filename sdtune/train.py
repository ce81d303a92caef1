"""The training loop, in the order it runs: `setup` (checks, base model, trainable parts, data, optimizer), then `fit`
(for each batch: `_train_step` -> `_loss`; then log, save, sample), for every method and family.

The method decides what is trainable (`methods.textual_inversion`, `methods.lora`); the family record decides how text
is encoded and files are named (`families`); checks that need no weights run first (`preflight`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from sdtune import compat, data, diffusion, export, formats, logs, methods, models, preflight, samples, state
from sdtune.config import ConfigError, TrainConfig
from sdtune.errors import SdtuneError
from sdtune.methods import Trainables, lora, textual_inversion
from sdtune.preflight import StepsPlan
from sdtune.run_folder import Claim, claim_output_folder, note_outputs, space_needed, space_problem

logger = logging.getLogger(__name__)
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# ---------------------------------------------------------------------------------------------------------------
# The run's types


@dataclass(kw_only=True)
class Run:
    """Everything the loop touches, built by `setup`. `unet`/`text_encoders` are what forward passes go through
    (wrapped by accelerate for multi-process runs); `base` keeps the plain modules."""

    config: TrainConfig
    accelerator: Accelerator
    base: models.BaseModel
    record: dict[str, str]  # the base's `sdtune.*` record, taken before placeholders changed its tokenizers
    trainables: Trainables
    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]
    noise_scheduler: DDPMScheduler
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    steps: StepsPlan
    dataset: dict  # what the LoRA metadata records about the data (`data.dataset_summary`)
    identity: state.RunIdentity  # what states record; the run id is set when `fit` claims the output folder
    started_at: float
    sample_grids: list = field(default_factory=list)  # every sample grid rendered so far, for progress.png
    text_cache: dict | None = None  # caption -> text-encoder output, with cache_text_encoder_outputs
    token_cache: dict = field(default_factory=dict)  # caption -> token ids (`models.token_ids`)

    @property
    def text_parts(self) -> dict:
        """Tokenizers and the (possibly wrapped) text encoders, by pipeline attribute name."""
        return {**self.base.tokenizers, **self.text_encoders}


@dataclass
class TrainResult:
    """What a finished run produced."""

    final_path: Path
    saved_paths: list[Path] = field(default_factory=list)
    steps: int = 0
    last_loss: float = float("nan")
    main_process: bool = True  # False on the other processes of a data-parallel run (they write nothing)
    samples_command: str | None = None  # `sdtune generate` that draws the last sample grid's images again


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; raised before it touches the weights (turned into `TrainingStopped`)."""

    def __init__(self, value: float):
        self.value = value
        super().__init__(f"loss is {value}")


class TrainingStopped(SdtuneError):
    """Training stopped at a non-finite loss; the last good state was saved first."""

    exit_code = 1


class TrainingInterrupted(SdtuneError):
    """Ctrl-C or SIGTERM stopped training after the state was saved; `state` is where to resume from. The exit code
    is the shell's for a process ended by that signal: 130 (SIGINT), 143 (SIGTERM)."""

    exit_code = 130

    def __init__(self, state_path: Path | None, steps: int, signal_number: int = signal.SIGINT):
        self.state, self.steps = state_path, steps
        self.exit_code = 128 + int(signal_number)
        where = f"state saved to {state_path}; continue with resume=latest"
        where = where if state_path else "no state saved (save_state off)"
        super().__init__(f"interrupted after {steps} steps: {where}")


# ---------------------------------------------------------------------------------------------------------------
# Setup


def setup(config: TrainConfig) -> Run:
    """Checks the input (see `preflight.preflight`), loads the base, attaches the method's trainable parts, and builds
    the data loader, optimizer and schedule.

    Raises:
        ConfigError: Bad data, tokens, model or LoRA file.
        models.ModelError: The base model cannot be loaded.
    """
    config = preflight.resolved(config)
    examples = preflight.preflight(config)
    started_at = time.time()
    accelerator = _accelerator(config)
    set_seed(config.seed)
    base = models.load_for_training(config)
    record = compat.base_record(base)  # before a placeholder changes the tokenizers
    trainables = methods.attach(config, base)
    methods.configure_modules(config, base, trainables)  # precision, gradient checkpointing, attention kernels
    for module in (base.unet, base.vae, *base.text_encoders.values()):
        module.to(accelerator.device)
    latents = None
    if config.cache_latents:  # every image encoded once (or read from the disk cache) instead of every step
        folder = models.cache_dir() / "latents" if config.cache_latents_to_disk else None
        vae_source = Path(config.vae) if config.vae else base.source
        latents = data.vae_latents(base.vae, folder, models.base_model_sha256(vae_source))
    processes = (accelerator.num_processes, accelerator.process_index)
    loader, dataset_summary = data.training_loader(config, examples, *processes, latents)
    steps = preflight.steps_plan(config, len(examples), len(loader))
    optimizer = methods.optimizer(config, trainables)
    lr_schedule = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=steps.total
    )
    problem = space_problem(Path(config.output_dir), *space_needed(config, trainables.groups(), steps.total))
    if problem and accelerator.is_main_process:
        raise ConfigError([problem], "before training")
    unet, text_encoders = _prepare_modules(accelerator, base, trainables)
    settings = state.resumable_settings(config, accelerator.num_processes)
    identity = state.RunIdentity("", settings, state.dataset_fingerprint(examples))
    return Run(
        config=config, accelerator=accelerator, base=base, record=record, trainables=trainables, unet=unet,
        text_encoders=text_encoders, noise_scheduler=DDPMScheduler.from_config(base.scheduler_config),
        loader=loader, optimizer=accelerator.prepare(optimizer), lr_schedule=lr_schedule, steps=steps,
        dataset=dataset_summary, identity=identity, started_at=started_at,
        text_cache={} if config.cache_text_encoder_outputs else None,
    )  # fmt: skip


def _accelerator(config: TrainConfig) -> Accelerator:
    """accelerate's Accelerator for this launch: accumulation, autocast, trackers, and data-parallel processes.

    Raises:
        ConfigError: The launcher started several processes but accelerate did not join them.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # what torchrun / accelerate launch started
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=logs.accelerate_trackers(config),
        cpu=launched > 1 and not torch.cuda.is_available(),  # torchrun on CPUs: gloo data-parallel
    )
    if accelerator.num_processes != launched:  # independent copies would write the same files
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes}; "
            "launch with `accelerate launch --multi_gpu --num_processes N` on GPUs or `torchrun --nproc_per_node N` "
            "on CPUs (docs/training.md, multi-process)."
        )
    return accelerator


def _prepare_modules(accelerator: Accelerator, base: models.BaseModel, trainables: Trainables):
    """(unet, text encoders) that forward passes go through: modules holding trainable parameters are prepared by
    accelerate (wrapped for multi-process runs) and set to training mode; the others stay as they are."""
    unet = accelerator.prepare(base.unet) if trainables.unet else base.unet
    unet.train(bool(trainables.unet))
    text_encoders = {}
    for name, encoder in base.text_encoders.items():
        trains = any(param.requires_grad for param in encoder.parameters())
        text_encoders[name] = accelerator.prepare(encoder) if trains else encoder
        text_encoders[name].train(trains)
    return unet, text_encoders


# ---------------------------------------------------------------------------------------------------------------
# One step


def _text(run: Run, prompts: list[str], device: torch.device) -> models.TextConditioning:
    """The run's text conditioning of `prompts` (with its `clip_skip`), see `models.encode_text`."""
    ids = models.token_ids(run.base.family, run.text_parts, prompts, device, run.token_cache)
    return models.encode_ids(run.base.family, run.text_parts, ids, run.config.clip_skip)


def _cached_text(run: Run, captions: list[str], device: torch.device) -> models.TextConditioning:
    """Text-encoder outputs with `cache_text_encoder_outputs`: each distinct caption is encoded once."""
    missing = sorted({caption for caption in captions if caption not in run.text_cache})
    if missing:
        with torch.no_grad():
            encoded = _text(run, missing, device)
        pooled = encoded.pooled if encoded.pooled is not None else [None] * len(missing)
        run.text_cache.update(zip(missing, zip(encoded.states, pooled, strict=True), strict=True))
    states, pooled = zip(*(run.text_cache[caption] for caption in captions), strict=True)
    return models.TextConditioning(torch.stack(states), None if pooled[0] is None else torch.stack(pooled))


def _predict(run: Run, unet, noisy, timesteps, text: models.TextConditioning, time_ids) -> torch.Tensor:
    """The UNet's prediction with the family's conditioning (SDXL adds the pooled embedding and the time ids)."""
    return unet(
        noisy, timesteps, text.states, **models.added_conditioning(run.base.family, text.pooled, time_ids)
    ).sample


def _latent_distribution(batch: dict, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the batch's VAE latent distributions, from the latent cache or the VAE, unscaled."""
    device = run.accelerator.device
    if "latent_mean" in batch:  # pinned on a GPU machine: the copy does not wait
        return batch["latent_mean"].to(device, non_blocking=True), batch["latent_std"].to(device, non_blocking=True)
    vae = run.base.vae
    distribution = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
    return distribution.mean.float(), distribution.std.float()


def _loss(batch: dict, run: Run, captions: list[str]) -> torch.Tensor:
    """Denoising loss of one batch: encode images, add noise at random timesteps, predict, compare; plus the
    prior-preservation loss when `prior_preservation_prompts` are set. Every random draw is the example's own
    (`diffusion.draw` with the item's `noise_seed`)."""
    device, scheduler, config = run.accelerator.device, run.noise_scheduler, run.config
    with torch.no_grad():
        mean, std = _latent_distribution(batch, run)
        high = min(config.max_timestep, scheduler.config.num_train_timesteps)
        draws = diffusion.draw(
            batch["noise_seed"].tolist(), tuple(mean.shape[1:]), (config.min_timestep, high), config.noise_offset,
            len(config.prior_preservation_prompts), device,
        )  # fmt: skip
        # sampling the latent distribution as latent_dist.sample() does, with the example's own draw
        # contiguous: the VAE can return channels-last latents on CPU; the cache stores contiguous ones
        latents = ((mean + std * draws.latent_noise) * run.base.vae.config.scaling_factor).contiguous()
    noisy = scheduler.add_noise(latents, draws.noise, draws.timesteps)
    if run.text_cache is not None:
        text = _cached_text(run, captions, device)
    else:
        with torch.set_grad_enabled(run.trainables.text_path_trains):  # no activations kept for a frozen text path
            text = _text(run, captions, device)
    prediction = _predict(run, run.unet, noisy, draws.timesteps, text, batch["time_ids"])
    weights = batch["loss_weight"].to(device, torch.float32) if config.uses_reg_images else None  # reg images
    if config.min_snr_gamma:
        snr_weights = diffusion.min_snr_weights(scheduler, draws.timesteps, config.min_snr_gamma)
        weights = snr_weights if weights is None else weights * snr_weights
    target = diffusion.training_target(scheduler, latents, draws.noise, draws.timesteps)
    loss = diffusion.denoising_loss(prediction, target, weights)
    if config.prior_preservation_prompts:
        prior = _prior_loss(run, noisy, draws.timesteps, draws.prior_picks, batch["time_ids"])
        loss = loss + config.prior_loss_weight * prior
    return loss


def _prior_loss(run: Run, noisy, timesteps, picks: list[int], time_ids=None) -> torch.Tensor:
    """How far the trained model's predictions for prior prompts (`picks`: one per example) are from the base
    model's, both on the batch's noisy latents: a distillation form of DreamBooth's prior preservation (Ruiz et al.
    2023) that needs no class images."""
    chosen, device = [run.config.prior_preservation_prompts[i] for i in picks], noisy.device
    with torch.no_grad(), lora.adapters_disabled(*run.base.adaptable().values()):
        text = _text(run, chosen, device)
        target = _predict(run, run.base.unet, noisy, timesteps, text, time_ids)  # no gradient: the unwrapped module
    if run.trainables.text_encoder:  # only a text-encoder LoRA changes these prompts' states
        text = _text(run, chosen, device)
    return diffusion.denoising_loss(_predict(run, run.unet, noisy, timesteps, text, time_ids), target)


def _train_step(run: Run, batch: dict) -> torch.Tensor:
    """Forward, backward and (at the end of an accumulation window) the optimizer and schedule step.

    Raises:
        NonFiniteLoss: On every process, when the loss is NaN or infinite on any (before the backward pass).
    """
    config, accelerator = run.config, run.accelerator
    with accelerator.accumulate(run.unet, *run.text_encoders.values()):
        captions = batch["caption"]
        if config.uses_ti:
            count = config.num_vectors
            captions = [textual_inversion.expand_placeholder(c, config.placeholder_token, count) for c in captions]
        with accelerator.autocast():
            loss = _loss(batch, run, captions)
        accelerator.backward(loss)
        # checked after the backward pass, so a GPU runs forward and backward without waiting for the check; the
        # weights change only at the optimizer step. Every process stops, or the others would hang.
        if _on_any_process(accelerator, not torch.isfinite(loss)):
            run.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(float(loss.detach()))
        if accelerator.sync_gradients:
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(run.trainables.parameters(), config.max_grad_norm)
            run.optimizer.step()
            run.lr_schedule.step()
            run.optimizer.zero_grad(set_to_none=True)
    return loss


def _on_any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` is true on any process (a collective call with several processes: all must make it)."""
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(count.item() > 0)


def _mean_over_processes(accelerator: Accelerator, value: torch.Tensor) -> float:
    """The mean of a scalar over all processes (the global batch's loss when every slice has the same size)."""
    if accelerator.num_processes == 1:
        return value.item()
    return accelerator.reduce(value.float().reshape(1), reduction="mean").item()


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig) -> TrainResult:
    """Trains an embedding (TI), a LoRA, or both jointly, as the config says, and writes them to `output_dir`.

    Args:
        config: A validated config (see `sdtune.config.load_config`).

    Returns:
        The files written, the number of optimizer steps and the last loss.

    Raises:
        ConfigError: Bad data, tokens, model or LoRA file, found before any weights load where possible.
        models.ModelError: The base model cannot be loaded.
        TrainingStopped: The loss became NaN or infinite (the last good state was saved).
        TrainingInterrupted: Ctrl-C / SIGTERM (the state was saved).
    """
    return fit(setup(config))


def fit(run: Run) -> TrainResult:
    """Runs the training loop of a prepared run and writes the outputs (the trained modules stay in `run.base`).

    Raises:
        TrainingStopped: The loss became NaN or infinite (the last good state was saved).
        TrainingInterrupted: Ctrl-C / SIGTERM; the state was saved first (with `save_state`).
        OutputInUse: Another training took the output folder after the checks.
        DiskFull: The disk filled up while saving (what was saved before is intact).
    """
    # the main process takes the output folder (lock, run record; `overwrite` deletes the earlier run's files)
    claim = claim_output_folder(run.config) if run.accelerator.is_main_process else Claim("", None)
    run.identity.run_id = claim.run_id
    try:
        return _fit(run)
    finally:
        claim.release()


def _fit(run: Run) -> TrainResult:
    config, accelerator, total = run.config, run.accelerator, run.steps.total
    result = TrainResult(final_path=Path(config.output_dir) / f"{config.output_name}.safetensors")
    result.main_process = accelerator.is_main_process
    start = _start(run, result)
    if accelerator.is_main_process:
        tqdm.write(preflight.batch_summary(config, accelerator.num_processes))
    log = logs.RunLog(config, accelerator)
    bar = tqdm(total=total, initial=result.steps, desc="train", unit="step", disable=not accelerator.is_main_process)
    if not config.resume:
        _render_samples(run, 0, log)
    started, last = time.perf_counter(), start
    with _stop_requests() as stop:
        for epoch, used, batch in _batches(run, start) if result.steps < total else ():
            try:
                loss = _train_step(run, batch)
            except NonFiniteLoss as error:
                bar.close()
                raise TrainingStopped(_non_finite_message(run, result.steps + 1, error.value, last)) from error
            if not accelerator.sync_gradients:
                continue
            result.steps += 1
            result.last_loss = _mean_over_processes(accelerator, loss.detach())
            _stop_embedding_if_due(run, result.steps)
            bar.update(1)
            lr = f"{run.lr_schedule.get_last_lr()[0]:.2e}"
            bar.set_postfix(loss=f"{result.last_loss:.4f}", lr=lr, refresh=False)  # tqdm redraws at most 10 times/s
            samples_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
            done, elapsed = result.steps - start.step, time.perf_counter() - started
            log.log_step(result.steps, result.last_loss, run.optimizer.param_groups, done, elapsed, samples_per_step)
            log.log_epoch_loss(epoch, result.steps, result.last_loss)
            last = state.Position(result.steps, epoch, used)
            _step_outputs(run, result, last, log)
            if _on_any_process(accelerator, bool(stop)):
                bar.close()
                raise TrainingInterrupted(_save_state(run, last), result.steps, stop[0] if stop else signal.SIGINT)
            if result.steps >= total:
                break
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result.saved_paths += _save_outputs(run, result.steps, final=True)
        _save_state(run, last)
        _render_samples(run, result.steps, log)
        result.samples_command = samples.reproduce_command(config) if config.sample_prompts else None
        log.finish(config, result.steps, result.last_loss)
    return result


def _start(run: Run, result: TrainResult) -> state.Position:
    """Where the loop begins: step 0, or the position of the state `resume` names (weights, optimizer, schedule and
    RNG restored)."""
    config = run.config
    if not config.resume:
        return state.Position(0, 0, 0)
    path = state.resolve(config.resume, Path(config.output_dir))
    digests = state.accepted_digests(config, run.accelerator.num_processes)
    groups = run.trainables.groups()
    position = state.load_state(path, groups, run.optimizer, run.lr_schedule, digests, run.accelerator.scaler)
    result.steps = position.step
    _stop_embedding_if_due(run, position.step)
    logger.info("resumed from %s at step %d", path, position.step)
    return position


def _batches(run: Run, start: state.Position):
    """(epoch, batches of that epoch used so far, batch) from `start` on, epoch after epoch; the caller stops."""
    sampler = run.loader.batch_sampler
    epoch, skip = start.epoch, start.batch
    if skip >= len(sampler):
        epoch, skip = epoch + 1, 0
    while True:
        sampler.set_epoch(epoch, skip)
        for used, batch in enumerate(run.loader, start=skip + 1):
            yield epoch, used, batch
        epoch, skip = epoch + 1, 0


def _stop_embedding_if_due(run: Run, step: int) -> None:
    """ti+lora: after `embedding_train_fraction` of the steps the vectors freeze; the LoRA keeps training."""
    if run.config.method == "ti+lora" and step >= math.ceil(run.config.embedding_train_fraction * run.steps.total):
        for vectors in run.trainables.embedding:
            vectors.requires_grad_(False)


def _render_samples(run: Run, step: int, log: logs.RunLog) -> None:
    """The sample grid of this step (main process, with `sample_prompts`), to `samples/` and the logs."""
    if run.config.sample_prompts and run.accelerator.is_main_process:
        grid = samples.render(run.config, run.base, run.accelerator.device, step, run.sample_grids)
        log.add_image("samples", grid, step)


def _step_outputs(run: Run, result: TrainResult, position: state.Position, log: logs.RunLog) -> None:
    """Intermediate saves (outputs + state) and sample grids due after an optimizer step."""
    config, total = run.config, run.steps.total
    is_save_step = bool(config.save_steps) and result.steps % config.save_steps == 0 and result.steps < total
    if is_save_step and run.accelerator.is_main_process:
        result.saved_paths += _save_outputs(run, result.steps, final=False)
        _save_state(run, position)
    every = config.sample_every_n_steps
    if (is_save_step or (every and result.steps % every == 0)) and result.steps < total:
        _render_samples(run, result.steps, log)


def _save_outputs(run: Run, steps: int, final: bool) -> list[Path]:
    """Writes the embedding and/or LoRA (`-stepNNNNNNNN` suffix for intermediate saves) with their metadata."""
    config, family = run.config, run.base.family
    folder, suffix = Path(config.output_dir), "" if final else f"-step{steps:08d}"
    written = []
    if run.trainables.embedding:
        vectors = {
            spec.embedding_key: v.detach()
            for spec, v in zip(family.text_encoders, run.trainables.embedding, strict=True)
        }
        metadata = export.embedding_metadata(config, family, run.record, steps)
        written.append(
            export.save_embedding(folder / f"{config.embedding_name}{suffix}.safetensors", vectors, metadata)
        )
    if config.uses_lora:
        components = run.base.adaptable()
        key_map, modules = formats.module_key_map(family, components), lora.extract(family, components)
        metadata = export.lora_metadata(config, family, run.record, _lora_run_facts(run, steps, final))
        path = folder / f"{config.output_name}{suffix}.safetensors"
        dtype = SAVE_DTYPES[config.save_precision]
        written.append(export.save_lora_kohya(path, modules, key_map, dtype, metadata, family))
        if final and "diffusers" in config.export_formats:
            written.append(export.save_lora_diffusers(folder / f"{config.output_name}_diffusers", family, components))
    note_outputs(folder, written)
    return written


def _lora_run_facts(run: Run, steps: int, final: bool) -> dict:
    """What kohya's metadata records about the run (`export.kohya_lora_metadata`'s `run`)."""
    adapted = run.base.adaptable().values()
    facts = {
        "started_at": run.started_at, "steps": steps, "epoch": math.ceil(steps / run.steps.per_epoch),
        "num_batches_per_epoch": run.dataset["batches_per_epoch"], "num_epochs": run.steps.epochs,
        "max_steps": run.steps.total, "learning_rates": run.config.group_learning_rates(), "dataset": run.dataset,
        "network_dim": lora.main_rank(*adapted), "network_alpha": lora.main_alpha(*adapted),
        "num_processes": run.accelerator.num_processes, "conv": lora.conv_settings(*adapted),
    }  # fmt: skip
    return {**facts, "finished_at": time.time()} if final else facts


def _save_state(run: Run, position: state.Position) -> Path | None:
    """Writes the resumable state (main process, with `save_state`); returns its folder."""
    if not run.config.save_state or not run.accelerator.is_main_process:
        return None
    return state.save_state(
        Path(run.config.output_dir), position, run.trainables.groups(), run.optimizer, run.lr_schedule,
        run.identity, run.config.keep_last_n, run.accelerator.scaler, run.steps.total,
    )  # fmt: skip


def _non_finite_message(run: Run, step: int, value: float, last: state.Position) -> str:
    """Where the loss broke, what was saved, the likely causes and what to change."""
    saved_state = _save_state(run, last)
    saved = f"the last good state (step {last.step}) is in {saved_state}"
    saved = saved if saved_state else "no state saved (save_state off)"
    rates = ", ".join(f"{g['name']} {g['lr']:.2e}" for g in run.optimizer.param_groups)
    return (
        f"step {step}: the loss is {value}, so training stopped before it reached the weights; {saved}. Likely "
        f"causes: a learning rate too high for this model and data ({rates}), exploding gradients, or an image "
        "that decodes to extreme values. Try a lower learning_rate, max_grad_norm: 1.0, or min_snr_gamma: 5, and "
        "start again (or resume from the saved state with the same settings to inspect it)."
    )


@contextmanager
def _stop_requests():
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step: a list, non-empty once a signal
    came, holding the signal numbers."""
    requested = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, _: requested.append(number)) for number in signals}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
