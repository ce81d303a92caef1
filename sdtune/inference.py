"""Image generation with diffusers pipelines built from loaded components (samples during training, benchmarks).

Only builds pipelines and generates; it never imports training code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

SAMPLERS = {
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
}


def pipeline_from_components(tokenizer, text_encoder, unet, vae, scheduler_config: dict, sampler: str = "dpmpp_2m"):
    """A `StableDiffusionPipeline` over already loaded (possibly adapted) components, with the chosen sampler."""
    import diffusers

    scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(scheduler_config)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe, prompts: list[str], seed: int, size: int, steps: int = 20, guidance: float = 7.5, batch_size: int = 16
) -> list[Image.Image]:
    """One image per prompt; prompt `i` always uses seed `seed + i`, whatever the batching, so runs compare."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            output = pipe(
                chunk,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
            )
        images += output.images
    return images


def image_grid(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    """The images tiled left to right, top to bottom (nearest-neighbour upscaled by `scale`)."""
    width, height = images[0].width * scale, images[0].height * scale
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, image in enumerate(images):
        tile = image if scale == 1 else image.resize((width, height), Image.Resampling.NEAREST)
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    """Writes a PNG through a temporary file and a rename."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)
    return path
