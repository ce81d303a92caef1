"""Sample grids during training: `sample_prompts` drawn with the current weights, exactly as `sdtune generate` draws
the same prompts from the saved files (`inference.generate_images`), and the job file and command that do so.

Prompt `i` is drawn from seed `seed + i` with the samples' settings; the jobs are written to
`<output_dir>/sample_prompts.yaml`, so `sdtune generate --jobs` reproduces the last grid's images bit for bit when
the saved files hold the trained weights unrounded (`save_precision: fp32`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdtune import inference, jobs
from sdtune.config import TrainConfig
from sdtune.models import BaseModel

SAMPLER = "dpmpp_2m"
JOB_FILE = "sample_prompts.yaml"
MAX_COLUMNS = 8


def sample_jobs(config: TrainConfig) -> list[jobs.Job]:
    """The sample prompts as `sdtune generate` jobs: prompt `i` from seed `seed + i`, the samples' settings."""
    return [
        jobs.Job(
            prompt,
            seed=config.seed + i,
            steps=config.sample_steps,
            guidance=config.sample_guidance_scale,
            width=config.resolution,
            height=config.resolution,
            sampler=SAMPLER,
            clip_skip=config.clip_skip,
        )  # fmt: skip
        for i, prompt in enumerate(config.sample_prompts)
    ]


def render(config: TrainConfig, base: BaseModel, device: torch.device, step: int, grids: list) -> np.ndarray:
    """Draws the sample prompts with the base's current (adapted) modules into `samples/step<N>.png`, adds the grid
    to `grids` (this run's grids so far) and stacks them into `samples/progress.png` (one row per render, training
    time flowing down), and writes the job file. The modules' train/eval modes and torch's global random state are
    left as they were.

    Returns:
        The grid as an RGB array (for TensorBoard / wandb).
    """
    folder = Path(config.output_dir)
    todo = sample_jobs(config)
    jobs.write_jobs(folder / JOB_FILE, todo)
    modes = [(module, module.training) for module in base.adaptable().values()]
    with torch.random.fork_rng(devices=[]):
        for module, _ in modes:
            module.eval()
        pipe = inference.pipeline_from_components(base.family, base.components, base.scheduler_config, SAMPLER)
        images = inference.generate_images(
            pipe.to(device), base.family, [job.prompt for job in todo], [job.seed for job in todo],
            (config.resolution, config.resolution), config.sample_steps, config.sample_guidance_scale,
            clip_skip=config.clip_skip,
        )  # fmt: skip
    for module, training in modes:
        module.train(training)
    grid = inference.image_grid(images, columns=min(MAX_COLUMNS, len(images)), scale=max(1, 128 // config.resolution))
    inference.save_png(grid, folder / "samples" / f"step{step:08d}.png")
    grids.append(grid)
    if len(grids) > 1:  # before/after at a glance
        inference.save_png(inference.image_grid(grids, columns=1), folder / "samples" / "progress.png")
    return np.asarray(grid)


def reproduce_command(config: TrainConfig) -> str:
    """The `sdtune generate` command that draws the last grid's images again from the run's final files."""
    folder = Path(config.output_dir)
    embeddings = (
        [(folder / f"{config.embedding_name}.safetensors", config.placeholder_token)] if config.uses_ti else []
    )
    loras = [folder / f"{config.output_name}.safetensors"] if config.uses_lora else []
    batch_size = min(len(config.sample_prompts), 16)
    command = jobs.generate_command(
        config.base_model, folder / JOB_FILE, embeddings, loras, batch_size, config.base_model_config,
        config.prediction_type,
    )  # fmt: skip
    if config.uses_lora and config.save_precision != "fp32":
        command += f"  # the LoRA file holds {config.save_precision} factors: close to the grid, not bit for bit"
    return command
