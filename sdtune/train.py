"""The training loop: check everything cheap first, load the base, then accumulate -> loss -> step -> log -> save."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdtune import checkpoint, compat, data, diffusion, export, formats, inference, logs, models
from sdtune.config import ConfigError, TrainConfig, to_dict
from sdtune.methods import lora, textual_inversion

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    final_path: Path
    saved_paths: list[Path] = field(default_factory=list)
    steps: int = 0
    last_loss: float = float("nan")
    main_process: bool = True  # False on the other processes of a data-parallel run (they write nothing)


def preflight(config: TrainConfig) -> list[data.Example]:
    """Every check that needs no model weights: data files, captions, model family, tokens, method.

    Returns:
        The training examples.

    Raises:
        ConfigError: With all problems found; nothing has been loaded yet.
    """
    errors: list[str] = _optimizer_problems(config) + _device_problems(config) + logs.missing_packages(config)
    if config.resume:
        try:
            checkpoint.resolve(config.resume, Path(config.output_dir))
        except checkpoint.StateError as error:
            errors.append(str(error))
    if config.network_weights:
        errors += lora.file_config_problems(Path(config.network_weights), config)
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
        caption = data.full_caption(example.caption, example.subset)
        text = textual_inversion.expand_placeholder(caption, placeholder, count)
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


def steps_plan(config: TrainConfig, num_examples: int, batches_per_epoch: int | None = None) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total optimizer steps, epochs to run) for a dataset of `num_examples`.

    One epoch is `ceil(num_examples / batch_size)` batches (or `batches_per_epoch`: with buckets every bucket ends
    in its own partial batch); one optimizer step takes `gradient_accumulation_steps` batches (the last step of an
    epoch may take fewer). `max_steps`, when set, overrides `epochs`.
    """
    batches_per_epoch = batches_per_epoch or math.ceil(num_examples / config.batch_size)
    updates_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total = config.max_steps or config.epochs * updates_per_epoch
    return updates_per_epoch, total, math.ceil(total / updates_per_epoch)


def _text_states(run: Run, prompts: list[str], device: torch.device) -> torch.Tensor:
    """The run's text-encoder states for `prompts` (with its `clip_skip`), see `models.encode_prompts`."""
    return models.encode_prompts(run.base.tokenizer, run.text_encoder, prompts, device, run.config.clip_skip)


def _cached_prompts(run: Run, captions: list[str], device: torch.device) -> torch.Tensor:
    """Text-encoder outputs with `cache_text_encoder_outputs`: each distinct caption is encoded once."""
    missing = sorted({caption for caption in captions if caption not in run.text_cache})
    if missing:
        with torch.no_grad():
            encoded = _text_states(run, missing, device)
        run.text_cache.update(zip(missing, encoded, strict=True))
    return torch.stack([run.text_cache[caption] for caption in captions])


def _latent_distribution(batch: dict, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the batch's VAE latent distributions, from the latent cache or the VAE, unscaled."""
    device = run.accelerator.device
    if "latent_mean" in batch:
        return batch["latent_mean"].to(device), batch["latent_std"].to(device)
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
        hidden_states = _cached_prompts(run, captions, device)
    else:
        with torch.set_grad_enabled(run.text_encoder_trains):  # no activations kept for a frozen text path
            hidden_states = _text_states(run, captions, device)
    prediction = run.unet(noisy, draws.timesteps, hidden_states).sample
    weights = None
    if config.uses_reg_images:  # regularization images count prior_loss_weight times
        weights = batch["loss_weight"].to(device, torch.float32)
    if config.min_snr_gamma:
        snr_weights = diffusion.min_snr_weights(scheduler, draws.timesteps, config.min_snr_gamma)
        weights = snr_weights if weights is None else weights * snr_weights
    target = diffusion.training_target(scheduler, latents, draws.noise, draws.timesteps)
    loss = diffusion.denoising_loss(prediction, target, weights)
    if config.prior_preservation_prompts:
        prior = _prior_loss(run, noisy, draws.timesteps, draws.prior_picks)
        loss = loss + config.effective_prior_loss_weight * prior
    return loss


def _prior_loss(run: Run, noisy: torch.Tensor, timesteps: torch.Tensor, picks: list[int]) -> torch.Tensor:
    """How far the trained model's predictions for prior prompts (`picks`: one per example) are from the base
    model's, both on the batch's noisy latents: a distillation form of DreamBooth's prior preservation (Ruiz et al.
    2023) that needs no class images."""
    chosen, device = [run.config.prior_preservation_prompts[i] for i in picks], noisy.device
    with torch.no_grad(), lora.adapters_disabled(run.base.unet, run.base.text_encoder):
        states = _text_states(run, chosen, device)
        target = run.base.unet(noisy, timesteps, states).sample  # no gradient: the unwrapped module
    if run.trainables.get("text_encoder"):  # only a text-encoder LoRA changes these prompts' states
        states = _text_states(run, chosen, device)
    return diffusion.denoising_loss(run.unet(noisy, timesteps, states).sample, target)


@dataclass
class Run:
    """Everything the loop touches, built by `setup`. `unet`/`text_encoder` are what forward passes go through
    (wrapped by accelerate for multi-process runs); `base` keeps the plain modules."""

    config: TrainConfig
    accelerator: object
    base: models.BaseModel
    record: dict[str, str]
    trainables: dict[str, list[torch.nn.Parameter]]
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    plan: tuple[int, int, int]
    dataset: dict
    started_at: float
    sample_grids: list = field(default_factory=list)  # every sample grid rendered so far, for progress.png
    text_cache: dict | None = None  # caption -> text-encoder output, with cache_text_encoder_outputs

    @property
    def text_encoder_trains(self) -> bool:
        """True when gradients must flow through the text encoder (TI vectors or text-encoder LoRA)."""
        return bool(self.trainables["embedding"] or self.trainables["text_encoder"])


def _attach(config: TrainConfig, base: models.BaseModel) -> dict[str, list[torch.nn.Parameter]]:
    """Injects the LoRA layers and/or adds the placeholder (TI); returns the new parameters per group.

    The LoRA goes in first: peft marks every non-LoRA parameter of a model it wraps as frozen, which would freeze
    placeholder vectors attached before it.
    """
    trainables = {"unet": [], "text_encoder": [], "embedding": []}
    if config.uses_lora:
        plan = lora.plan_for(config, base.unet, base.text_encoder)
        if plan.unet:
            trainables["unet"] = lora.inject(base.unet, plan.unet)
        if plan.text_encoder:
            trainables["text_encoder"] = lora.inject(base.text_encoder, plan.text_encoder)
        if plan.initial is not None:
            lora.load_factors(base.unet, base.text_encoder, plan.initial)
    if config.uses_ti:
        vectors = textual_inversion.attach(
            base.tokenizer, base.text_encoder, config.placeholder_token, config.effective_num_vectors, config.init_word
        )
        trainables["embedding"] = [vectors]
    return trainables


OPTIONAL_OPTIMIZERS = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}  # optimizer_type -> pip package


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _store_frozen_in_half(config: TrainConfig, base: models.BaseModel, trainables: dict) -> None:
    """With mixed precision: frozen weights in fp16/bf16 (half the memory), trainable parameters back in float32.
    The text encoder stays float32 while anything in it trains (TI vectors, text-encoder LoRA), the VAE with
    `no_half_vae`."""
    dtype = HALF_DTYPES.get(config.mixed_precision)
    if dtype is None:
        return
    base.unet.to(dtype)
    if not trainables["text_encoder"] and not trainables["embedding"]:
        base.text_encoder.to(dtype)
    if not config.no_half_vae:
        base.vae.to(dtype)
    with torch.no_grad():
        for param in (p for group in trainables.values() for p in group):
            param.data = param.data.float()


def _device_problems(config: TrainConfig) -> list[str]:
    """Settings this machine cannot run: fp16 autocast and xformers need CUDA; xformers needs its package."""
    import importlib.util

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
    return problems


def _optimizer_problems(config: TrainConfig) -> list[str]:
    import importlib.util

    package = OPTIONAL_OPTIMIZERS.get(config.optimizer_type)
    if package and importlib.util.find_spec(package) is None:
        return [f"optimizer_type: {config.optimizer_type} needs {package}: pip install {package} (or use adamw)."]
    return []


def _optimizer(config: TrainConfig, trainables: dict) -> torch.optim.Optimizer:
    """The configured optimizer over one parameter group per trainable part, each with its learning rate."""
    rates = config.group_learning_rates()
    groups = [{"params": params, "lr": rates[name], "name": name} for name, params in trainables.items() if params]
    if config.optimizer_type == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=config.adam_weight_decay)
    if config.optimizer_type == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(groups, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay)


def _launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started, from its environment."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _accelerator(config: TrainConfig):
    """accelerate's Accelerator for this launch: accumulation, autocast, trackers, and data-parallel processes.

    Raises:
        ConfigError: The launcher started several processes but accelerate did not join them.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=logs.accelerate_trackers(config),
        cpu=_launched_processes() > 1 and not torch.cuda.is_available(),  # torchrun on CPUs: gloo data-parallel
    )
    if accelerator.num_processes != _launched_processes():  # independent copies would write the same files
        raise ConfigError(
            f"launched as {_launched_processes()} processes (WORLD_SIZE) but accelerate set up "
            f"{accelerator.num_processes}; launch with `accelerate launch --multi_gpu --num_processes N` on GPUs or "
            "`torchrun --nproc_per_node N` on CPUs (docs/training.md, multi-process)."
        )
    return accelerator


def setup(config: TrainConfig) -> Run:
    """Checks the input (see `preflight`), loads the base, attaches the method's trainable parts, and builds the data
    loader, optimizer and schedule.

    Raises:
        ConfigError: Bad data, tokens, model or LoRA file.
        models.ModelError: The base model cannot be loaded.
    """
    examples = preflight(config)
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    started_at = time.time()
    accelerator = _accelerator(config)
    set_seed(config.seed)
    base = models.load_base_model(config.base_model, config.base_model_config)
    if config.prediction_type:  # forced: noise schedule, samples and the recorded base all follow it
        logger.info("prediction_type %s (the base's scheduler says %s)", config.prediction_type, base.prediction_type)
        base.scheduler_config = {**base.scheduler_config, "prediction_type": config.prediction_type}
    record = compat.base_record(base)  # before a placeholder changes the tokenizer
    trainables = _attach(config, base)
    _store_frozen_in_half(config, base, trainables)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if config.xformers:
        base.unet.enable_xformers_memory_efficient_attention()
    for module in (base.unet, base.vae, base.text_encoder):
        module.to(accelerator.device)
    loader, dataset_summary = _data_loader(config, examples, base, accelerator)
    plan = steps_plan(config, len(examples), len(loader))
    optimizer = _optimizer(config, trainables)
    lr_schedule = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=plan[1]
    )
    # Only modules with trainable parameters are prepared (wrapped for multi-process runs).
    unet = accelerator.prepare(base.unet) if trainables["unet"] else base.unet
    text_encoder = base.text_encoder
    if trainables["text_encoder"] or trainables["embedding"]:
        text_encoder = accelerator.prepare(base.text_encoder)
        text_encoder.train()
    unet.train(bool(trainables["unet"]))
    optimizer = accelerator.prepare(optimizer)  # the loader stays ours: its order is part of the resumable state
    return Run(
        config,
        accelerator,
        base,
        record,
        trainables,
        unet,
        text_encoder,
        DDPMScheduler.from_config(base.scheduler_config),
        loader,
        optimizer,
        lr_schedule,
        plan,
        dataset_summary,
        started_at,
        text_cache={} if config.cache_text_encoder_outputs else None,
    )


def _data_loader(config: TrainConfig, examples: list[data.Example], base: models.BaseModel, accelerator):
    """(loader, dataset summary for the metadata). Batches come from `data.BucketBatches`: square crops in one bucket,
    or with `enable_bucket` each image at its bucket size, batches drawn within a bucket; the order of every epoch
    follows from the seed, so a resumed run continues exactly, and each process takes its slice of every global
    batch. Latents come from a cache with `cache_latents`."""
    summary = data.dataset_summary(config, examples)
    sizes, extra = None, {}
    if config.enable_bucket:
        plan = data.bucket_plan(examples, config)
        sizes, extra = plan["assigned"], {"bucket_info": plan["ss_bucket_info"]}
    dataset = data.ImageCaptionDataset(examples, config, config.placeholder_token, sizes=sizes)
    _maybe_cache_latents(config, dataset, base)
    buckets = sizes or [(config.resolution, config.resolution)] * len(examples)
    sampler = data.BucketBatches(
        buckets, config.batch_size, config.seed, accelerator.num_processes, accelerator.process_index
    )
    # Its own generator: each new iterator (every epoch, and on resume) draws a worker base seed from it, which
    # would otherwise shift the global random stream that crops, flips and noise come from.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return loader, {**summary, **extra, "batches_per_epoch": len(loader)}


def _maybe_cache_latents(config: TrainConfig, dataset: data.ImageCaptionDataset, base: models.BaseModel) -> None:
    """With `cache_latents`: every image encoded once now (or read from the disk cache) instead of every step."""
    if not config.cache_latents:
        return
    folder = models.cache_dir() / "latents" if config.cache_latents_to_disk else None
    vae_id = f"{models.base_model_sha256(base.source)}:{next(base.vae.parameters()).dtype}"

    def encode(pixels: torch.Tensor):
        with torch.no_grad():
            distribution = base.vae.encode(pixels.to(base.vae.device, base.vae.dtype)).latent_dist
        return distribution.mean.float(), distribution.std.float()

    data.fill_latent_cache(dataset, data.LatentCache(folder, vae_id), encode, batch_size=config.batch_size)


def _log_step(writer, run: Run, step: int, loss: float, started: float, first_step: int) -> None:
    """Per-step scalars (TensorBoard / wandb): loss, learning rate per group, throughput since this run
    (re)started (all processes), peak memory (this process)."""
    if writer is None:
        return
    writer.add_scalar("loss", loss, step)
    for group in run.optimizer.param_groups:
        writer.add_scalar(f"lr/{group['name']}", group["lr"], step)
    elapsed = max(time.perf_counter() - started, 1e-9)
    done = step - first_step  # steps since this run started (a resumed run started at first_step)
    per_step = run.config.batch_size * run.config.gradient_accumulation_steps * run.accelerator.num_processes
    writer.add_scalar("speed/steps_per_second", done / elapsed, step)
    writer.add_scalar("speed/samples_per_second", done * per_step / elapsed, step)
    if torch.cuda.is_available():
        writer.add_scalar("memory/peak_cuda_allocated_mib", torch.cuda.max_memory_allocated() / 2**20, step)
    else:
        import resource

        writer.add_scalar("memory/peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step)


def _log_epoch(writer, epoch_losses: dict[int, list[float]], epoch: int, step: int) -> None:
    """`loss/epoch_mean` of every finished epoch (all but `epoch`), logged at `step` and then forgotten."""
    for finished in [e for e in epoch_losses if e != epoch]:
        if writer is not None:
            writer.add_scalar("loss/epoch_mean", sum(epoch_losses[finished]) / len(epoch_losses[finished]), step)
        del epoch_losses[finished]


def _log_hparams(writer, config: TrainConfig, result: TrainResult) -> None:
    """The run's settings (numbers, text, booleans) and final loss in TensorBoard's HPARAMS tab, to compare runs."""
    settings = {k: v for k, v in to_dict(config).items() if isinstance(v, (int, float, str, bool))}
    writer.add_hparams(settings, {"hparam/final_loss": result.last_loss, "hparam/steps": result.steps})


def _embedding_metadata(run: Run, steps: int) -> dict[str, str]:
    config = run.config
    metadata = export.modelspec_metadata(
        run.base.family, "textual-inversion", config.embedding_name, config.resolution, run.base.prediction_type
    )
    metadata["modelspec.trigger_phrase"] = config.embedding_name
    metadata.update(run.record)
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


def _lora_metadata(run: Run, steps: int, final: bool) -> dict[str, str]:
    config = run.config
    per_epoch, total, epochs = run.plan
    details = {
        "started_at": run.started_at,
        "steps": steps,
        "epoch": math.ceil(steps / per_epoch),
        "num_batches_per_epoch": run.dataset["batches_per_epoch"],
        "num_epochs": epochs,
        "max_steps": total,
        "learning_rates": config.group_learning_rates(),
        "dataset": run.dataset,
        "network_dim": lora.main_rank(run.base.unet, run.base.text_encoder),
        "network_alpha": lora.main_alpha(run.base.unet, run.base.text_encoder),
        "num_processes": run.accelerator.num_processes,
    }
    if final:
        details["finished_at"] = time.time()
    metadata = export.kohya_lora_metadata(
        config, run.base.family, run.record["sdtune.base_model_name"], run.record["sdtune.base_model_sha256"], details
    )
    metadata.update(
        export.modelspec_metadata(
            run.base.family, "lora", config.effective_output_name, config.resolution, run.base.prediction_type
        )
    )
    metadata.update(run.record)
    metadata.update({"sdtune.kind": "lora", "sdtune.steps": str(steps), "sdtune.resolution": str(config.resolution)})
    if config.uses_ti:  # pivotal tuning: the LoRA expects its embedding file
        metadata["modelspec.trigger_phrase"] = config.embedding_name
        metadata["sdtune.companion_embedding"] = f"{config.embedding_name}.safetensors"
        metadata["sdtune.placeholder_token"] = config.placeholder_token
    return metadata


_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _save_outputs(run: Run, steps: int, final: bool) -> list[Path]:
    """Writes the embedding and/or LoRA (`-stepNNNNNNNN` suffix for intermediate saves)."""
    config, folder, suffix = run.config, Path(run.config.output_dir), "" if final else f"-step{steps:08d}"
    written = []
    if run.trainables["embedding"]:
        path = folder / f"{config.embedding_name}{suffix}.safetensors"
        written.append(
            export.save_embedding(path, run.trainables["embedding"][0].detach(), _embedding_metadata(run, steps))
        )
    if config.uses_lora:
        modules = lora.extract(run.base.unet, run.base.text_encoder)
        key_map = formats.module_key_map(run.base.unet, run.base.text_encoder)
        path = folder / f"{config.effective_output_name}{suffix}.safetensors"
        metadata = _lora_metadata(run, steps, final)
        written.append(export.save_lora_kohya(path, modules, key_map, _SAVE_DTYPES[config.save_precision], metadata))
        if final and "diffusers" in config.export_formats:
            target = folder / f"{config.effective_output_name}_diffusers"
            written.append(export.save_lora_diffusers(target, run.base.unet, run.base.text_encoder))
    return written


def _render_samples(run: Run, step: int, writer) -> Path | None:
    """Renders `sample_prompts` with the current weights into `samples/step<N>.png` and TensorBoard, and stacks
    every grid of the run so far into `samples/progress.png` (first row: before training).

    Fixed seeds (`seed + prompt index`) make grids of different steps comparable; torch's global random state is
    saved and restored, so sampling never changes the training run.
    """
    config, base = run.config, run.base
    if not config.sample_prompts or not run.accelerator.is_main_process:
        return None
    modes = [(module, module.training) for module in (base.unet, base.text_encoder)]
    with torch.random.fork_rng(devices=[]):
        for module, _ in modes:
            module.eval()
        pipe = inference.pipeline_from_components(
            base.tokenizer, base.text_encoder, base.unet, base.vae, base.scheduler_config
        ).to(run.accelerator.device)
        images = inference.generate(
            pipe,
            list(config.sample_prompts),
            config.seed,
            config.resolution,
            config.sample_steps,
            config.sample_guidance_scale,
            clip_skip=config.clip_skip,
        )
    for module, training in modes:
        module.train(training)
    grid = inference.image_grid(images, columns=min(8, len(images)), scale=max(1, 128 // config.resolution))
    path = inference.save_png(grid, Path(config.output_dir) / "samples" / f"step{step:08d}.png")
    run.sample_grids.append(grid)
    if len(run.sample_grids) > 1:  # before/after at a glance: one row per render, training time flowing down
        progress = inference.image_grid(run.sample_grids, columns=1)
        inference.save_png(progress, Path(config.output_dir) / "samples" / "progress.png")
    if writer is not None:
        import numpy as np

        writer.add_image("samples", np.asarray(grid), step)
    return path


def _stop_embedding_if_due(run: Run, step: int) -> None:
    """ti+lora: after `embedding_train_fraction` of the steps the vectors freeze; the LoRA keeps training."""
    fraction = run.config.embedding_train_fraction
    if fraction is None or not run.trainables["embedding"]:
        return
    if step >= math.ceil(fraction * run.plan[1]):
        run.trainables["embedding"][0].requires_grad_(False)


def _batches(run: Run, start: checkpoint.Position):
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


def train(config: TrainConfig) -> TrainResult:
    """Trains an embedding (TI), a LoRA, or both jointly, as the config says, and writes them to `output_dir`.

    Args:
        config: A validated config (see `sdtune.config.load_config`).

    Returns:
        The files written, the number of optimizer steps and the last loss.

    Raises:
        ConfigError: Bad data, tokens, model or LoRA file, found before any weights load where possible.
        models.ModelError: The base model cannot be loaded.
    """
    return fit(setup(config))


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; raised before it touches the weights."""

    def __init__(self, value: float):
        self.value = value
        super().__init__(f"loss is {value}")


class TrainingStopped(Exception):
    """Training stopped at a non-finite loss; the last good state was saved first."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after the state was saved; `state` is where to resume from."""

    def __init__(self, state: Path | None, steps: int):
        self.state, self.steps = state, steps
        where = f"state saved to {state}; continue with resume=latest" if state else "no state saved (save_state off)"
        super().__init__(f"interrupted after {steps} steps: {where}")


def _config_digest(config: TrainConfig, processes: int = 1) -> str:
    """What a state must match to be resumed: every setting except where and how often outputs are written, and the
    number of processes (it sets the global batch)."""
    import hashlib
    import json

    ignored = {
        "resume",
        "keep_last_n",
        "save_state",
        "save_steps",
        "output_dir",
        "logging_dir",
        "log_with",
        "log_tracker_name",
        "dataloader_num_workers",
    }
    settings = {k: v for k, v in to_dict(config).items() if k not in ignored and not k.startswith("sample_")}
    if processes > 1:  # one-process digests stay what they were
        settings["num_processes"] = processes
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _start(run: Run, result: TrainResult) -> checkpoint.Position:
    """Where the loop begins: step 0, or the position of the state `resume` names (weights, optimizer, schedule and
    RNG restored)."""
    config = run.config
    if not config.resume:
        return checkpoint.Position(0, 0, 0)
    path = checkpoint.resolve(config.resume, Path(config.output_dir))
    digest = _config_digest(config, run.accelerator.num_processes)
    position = checkpoint.load_state(
        path, run.trainables, run.optimizer, run.lr_schedule, digest, run.accelerator.scaler
    )
    result.steps = position.step
    _stop_embedding_if_due(run, position.step)
    logger.info("resumed from %s at step %d", path, position.step)
    return position


def _save_state(run: Run, position: checkpoint.Position) -> Path | None:
    if not run.config.save_state or not run.accelerator.is_main_process:
        return None
    return checkpoint.save_state(
        Path(run.config.output_dir), position, run.trainables, run.optimizer, run.lr_schedule,
        _config_digest(run.config, run.accelerator.num_processes), run.config.keep_last_n, run.accelerator.scaler,
    )  # fmt: skip


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step (then saves and stops)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        import signal

        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._request)
        return self

    def _request(self, number, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _step_outputs(run: Run, result: TrainResult, position: checkpoint.Position, writer) -> None:
    """Intermediate saves (outputs + state) and sample grids due after an optimizer step."""
    config, total_steps = run.config, run.plan[1]
    is_save_step = bool(config.save_steps) and result.steps % config.save_steps == 0 and result.steps < total_steps
    if is_save_step and run.accelerator.is_main_process:
        result.saved_paths += _save_outputs(run, result.steps, final=False)
        _save_state(run, position)
    every = config.sample_every_n_steps
    if (is_save_step or (every and result.steps % every == 0)) and result.steps < total_steps:
        _render_samples(run, result.steps, writer)


def _non_finite_message(run: Run, step: int, value: float, last: checkpoint.Position) -> str:
    """Where the loss broke, what was saved, the likely causes and what to change."""
    state = _save_state(run, last)
    saved = f"the last good state (step {last.step}) is in {state}" if state else "no state saved (save_state off)"
    rates = ", ".join(f"{g['name']} {g['lr']:.2e}" for g in run.optimizer.param_groups)
    return (
        f"step {step}: the loss is {value}, so training stopped before it reached the weights; {saved}. Likely "
        f"causes: a learning rate too high for this model and data ({rates}), exploding gradients, or an image "
        "that decodes to extreme values. Try a lower learning_rate, max_grad_norm: 1.0, or min_snr_gamma: 5, and "
        "start again (or resume from the saved state with the same settings to inspect it)."
    )


def _batch_summary(config: TrainConfig, processes: int) -> str:
    """The effective batch: samples per optimizer step over all processes."""
    total = config.batch_size * config.gradient_accumulation_steps * processes
    return (
        f"effective batch: {config.batch_size} per process x {config.gradient_accumulation_steps} accumulation x "
        f"{processes} process{'es' if processes > 1 else ''} = {total} samples per optimizer step"
    )


def _mean_over_processes(accelerator, value: torch.Tensor) -> float:
    """The mean of a scalar over all processes (the global batch's loss when every slice has the same size)."""
    if accelerator.num_processes == 1:
        return value.item()
    return accelerator.reduce(value.float().reshape(1), reduction="mean").item()


def _on_any_process(accelerator, flag: bool) -> bool:
    """True when `flag` is true on any process (a collective call with several processes: all must make it)."""
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(count.item() > 0)


def _train_step(run: Run, batch: dict) -> torch.Tensor:
    """Forward, backward and (at the end of an accumulation window) the optimizer and schedule step."""
    config, accelerator = run.config, run.accelerator
    with accelerator.accumulate(run.unet, run.text_encoder):
        captions = batch["caption"]
        if config.uses_ti:
            count = config.effective_num_vectors
            captions = [textual_inversion.expand_placeholder(c, config.placeholder_token, count) for c in captions]
        with accelerator.autocast():
            loss = _loss(batch, run, captions)
        if _on_any_process(accelerator, not torch.isfinite(loss)):  # every process stops, or the others would hang
            raise NonFiniteLoss(float(loss))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if config.max_grad_norm:
                params = [p for group in run.trainables.values() for p in group]
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            run.optimizer.step()
            run.lr_schedule.step()
            run.optimizer.zero_grad(set_to_none=True)
    return loss


def fit(run: Run) -> TrainResult:
    """Runs the training loop of a prepared run and writes the outputs (the trained modules stay in `run.base`).

    Raises:
        TrainingInterrupted: Ctrl-C / SIGTERM; the state was saved first (with `save_state`).
    """
    config, accelerator, total_steps = run.config, run.accelerator, run.plan[1]
    result = TrainResult(final_path=Path(config.output_dir) / f"{config.effective_output_name}.safetensors")
    result.main_process = accelerator.is_main_process
    start = _start(run, result)
    if accelerator.is_main_process:
        tqdm.write(_batch_summary(config, accelerator.num_processes))
    writer = logs.RunLog(config, accelerator) if accelerator.is_main_process else None
    progress = tqdm(
        total=total_steps, initial=result.steps, desc="train", unit="step", disable=not accelerator.is_main_process
    )
    if not config.resume:
        _render_samples(run, 0, writer)
    started, last, epoch_losses = time.perf_counter(), start, {}
    with _StopRequest() as stop:
        for epoch, used, batch in _batches(run, start) if result.steps < total_steps else ():
            try:
                loss = _train_step(run, batch)
            except NonFiniteLoss as error:
                progress.close()
                raise TrainingStopped(_non_finite_message(run, result.steps + 1, error.value, last)) from error
            if not accelerator.sync_gradients:
                continue
            result.steps += 1
            result.last_loss = _mean_over_processes(accelerator, loss.detach())
            _stop_embedding_if_due(run, result.steps)
            progress.update(1)
            progress.set_postfix(loss=f"{result.last_loss:.4f}", lr=f"{run.lr_schedule.get_last_lr()[0]:.2e}")
            _log_step(writer, run, result.steps, result.last_loss, started, start.step)
            _log_epoch(writer, epoch_losses, epoch, result.steps)
            epoch_losses.setdefault(epoch, []).append(result.last_loss)
            last = checkpoint.Position(result.steps, epoch, used)
            _step_outputs(run, result, last, writer)
            if _on_any_process(accelerator, stop.requested):
                progress.close()
                raise TrainingInterrupted(_save_state(run, last), result.steps)
            if result.steps >= total_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result.saved_paths += _save_outputs(run, result.steps, final=True)
        _save_state(run, last)
        _render_samples(run, result.steps, writer)
        _log_epoch(writer, epoch_losses, -1, result.steps)
        _log_hparams(writer, config, result)
        writer.close()
    return result
