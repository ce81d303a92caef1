"""The bound a training step is measured against: a minimal hand-written loop that runs only the forward and backward
a method needs, on inputs encoded once beforehand, with sdtune's own LoRA layers, placeholder vectors and optimizer.

    python tools/reference_loop.py reference CONFIG.yaml --steps 30 --warmup 10   # prints one JSON line
    python tools/reference_loop.py sdtune CONFIG.yaml --warmup 10                 # `sdtune train`, measured alike

`tools/bench_train.py --reference` starts these as child processes (each its own process, so peak memory is its
own) and alternates them. Both print: seconds per steady step (after `warmup`), seconds from process start to the
end of the first optimizer step, and peak memory (CUDA allocated on a GPU, resident set size on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

STARTED = psutil.Process().create_time()  # the process start, so time to first step includes imports


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak: CUDA memory allocated on a GPU, else the resident set size."""
    from sdtune.logs import peak_rss_mib

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def _inputs(config, base, device):
    """The batches of one epoch through sdtune's own data pipeline, encoded once: VAE latent distributions, and
    token ids (or, when nothing in the text path trains, the text conditioning itself)."""
    from sdtune import data, models, preflight

    examples = preflight.preflight(config)
    latents = data.vae_latents(base.vae, None, "reference")
    loader, _ = data.training_loader(config, examples, latents=latents)
    batches = []
    for batch in loader:
        captions = batch["caption"]
        if config.uses_ti:
            from sdtune.methods.textual_inversion import expand_placeholder

            captions = [expand_placeholder(c, config.placeholder_token, config.num_vectors) for c in captions]
        ids = models.token_ids(base.family, base.components, captions, device)
        batches.append({
            "mean": batch["latent_mean"].to(device), "std": batch["latent_std"].to(device), "ids": ids,
            "time_ids": batch["time_ids"].to(device) if batch.get("time_ids") is not None else None,
        })  # fmt: skip
    return batches


def _text(config, base, trainables, batch):
    from sdtune import models

    if trainables.text_path_trains:
        return models.encode_ids(base.family, base.components, batch["ids"], config.clip_skip)
    if "text" not in batch:
        with torch.no_grad():
            batch["text"] = models.encode_ids(base.family, base.components, batch["ids"], config.clip_skip)
    return batch["text"]


def _step(config, base, trainables, scheduler, optimizer, batch, autocast) -> torch.Tensor:
    """One optimizer step: noise the cached latents, predict, mean squared error, backward, (clip), step."""
    from sdtune import diffusion, models

    latents = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * base.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast:
        text = _text(config, base, trainables, batch)
        added = models.added_conditioning(base.family, text.pooled, batch["time_ids"])
        prediction = base.unet(noisy, timesteps, text.states, **added).sample
    loss = diffusion.denoising_loss(prediction, diffusion.training_target(scheduler, latents, noise, timesteps))
    loss.backward()
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainables.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def run_reference(config_path: Path, steps: int, warmup: int) -> dict:
    """Loads the config's base with its method attached as `sdtune train` would, then times `steps` steps of the
    minimal loop (bf16 autocast with `mixed_precision: bf16`; fp32 otherwise)."""
    from diffusers import DDPMScheduler

    from sdtune import methods, models, preflight
    from sdtune.config import load_config

    config = preflight.resolved(load_config(config_path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    base = models.load_for_training(config)
    trainables = methods.attach(config, base)
    methods.configure_modules(config, base, trainables)
    for module in (base.unet, base.vae, *base.text_encoders.values()):
        module.to(device)
    base.unet.train(bool(trainables.unet))
    batches = _inputs(config, base, device)
    optimizer = methods.optimizer(config, trainables)
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    ends = []
    for step in range(1, steps + 1):
        _step(config, base, trainables, scheduler, optimizer, batches[(step - 1) % len(batches)], autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        if step == 1:
            first = time.time() - STARTED
        if config.method == "ti+lora" and step == math.ceil(config.embedding_train_fraction * steps):
            for vectors in trainables.embedding:  # as sdtune: the vectors freeze, the LoRA trains on
                vectors.requires_grad_(False)
    per_step = statistics.median(b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True))
    return {"seconds_per_step": per_step, "first_step_seconds": first, "peak_mib": peak_memory_mib(device)}


def run_sdtune(config_path: Path, warmup: int, slow_ms: float = 0.0) -> dict:
    """Runs `sdtune train CONFIG` in this process and reads its timing from the trainer's own TensorBoard scalars.
    `slow_ms` adds a sleep to every training step (the benchmark's own test: a slower step must show)."""
    from sdtune import cli, train

    if slow_ms:
        step = train._train_step

        def slowed(run, batch):
            time.sleep(slow_ms / 1000)
            return step(run, batch)

        train._train_step = slowed
    if cli.main(["train", str(config_path)]) != 0:
        raise SystemExit(1)
    from sdtune.config import load_config

    config = load_config(config_path)
    per_step, first_wall, peak = trainer_timing(Path(config.logging_dir), warmup)
    return {"seconds_per_step": per_step, "first_step_seconds": first_wall - STARTED, "peak_mib": peak}


def trainer_timing(log_dir: Path, warmup: int) -> tuple[float, float, float]:
    """(seconds per steady step after `warmup`, wall time of the first step's scalars, peak memory MiB) from the
    trainer's TensorBoard scalars.

    The trainer logs `speed/steps_per_second` = steps done / seconds since the loop started, so the time at step k
    is k / rate_k; the steady per-step time is the median of the steps after `warmup` (robust to a step another
    process on the machine interrupted; the reference loop is measured the same way)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    speed = events.Scalars("speed/steps_per_second")
    rates = {e.step: e.value for e in speed}
    last = max(rates)
    elapsed = {step: step / rate for step, rate in rates.items()}
    memory = next(tag for tag in events.Tags()["scalars"] if tag.startswith("memory/peak_"))
    peak = max(e.value for e in events.Scalars(memory))
    first_wall = min(e.wall_time for e in speed if e.step == 1)
    steady = [elapsed[step] - elapsed[step - 1] for step in range(warmup + 1, last + 1)]
    return statistics.median(steady), first_wall, peak


def main(argv: list[str] | None = None) -> None:
    """Runs one measurement and prints it as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("reference", "sdtune"))
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=30, help="reference: steps to run (sdtune: the config's)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--slow-ms", type=float, default=0.0, help="sdtune: sleep this long in every step (tests)")
    args = parser.parse_args(argv)
    if args.kind == "reference":
        result = run_reference(args.config, args.steps, args.warmup)
    else:
        result = run_sdtune(args.config, args.warmup, args.slow_ms)
    print(json.dumps({"kind": args.kind, **result}), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
