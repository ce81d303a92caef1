"""Which renderings can the world model's VAE draw? Encodes and decodes every candidate style over the world's
scenes and reports how much survives (docs/quality.md#the-style-and-why-this-one).

    python tools/world_vae_check.py [--base sample_data/world-sd1]

A style a method should learn has to survive the VAE first: the UNet only ever produces latents, and a rendering
that the decoder cannot draw from any latent cannot come out of any training. For each rendering: the mean absolute
error per channel (0-255) and the fraction of pixels whose nearest colour (the world's palette, plus the pastel
palette for `pastel`) is the same after the round trip as before it. `flat` is the world itself; `small` the
shape at the hollow style's hole size (what `sample_data/world-sd1-sizes` learned to draw). Then, per shape, how
many hollow renders the metric still reads fully right after the round trip (the ceiling of any style row).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

import world

FRAME, OUTLINE, GROUND_ROWS, SHADE_FROM_ROW, PASTEL = 4, 3.0, 10, 17, 0.5
ACCENT = "black"  # the second colour of the frame, outline, ground and shade renderings
RENDERINGS = ("flat", "hollow", "small", "pastel", "frame", "outline", "ground", "shade")


def _alpha(shape: str, radius: float) -> np.ndarray:
    """Coverage (0-1, anti-aliased) of `shape` at `radius`, centred."""
    mask = np.asarray(world.render(world.Scene(shape, "white", "black"), radius=radius), np.float32)
    white, black = world.COLORS["white"][0], world.COLORS["black"][0]
    return np.clip((mask.mean(axis=2, keepdims=True) - black) / (white - black), 0, 1)


def render(scene: world.Scene, rendering: str) -> np.ndarray:
    """`scene` (centred, radius 10) drawn in `rendering` (`RENDERINGS`), float RGB 0-255."""
    color, background = (np.array(world.COLORS[name], np.float32) for name in (scene.color, scene.background))
    accent = np.array(world.COLORS[ACCENT], np.float32)
    if rendering in ("hollow", "small"):  # the world's own renderings (`world.STYLES`)
        return np.asarray(world.render(world.Scene(scene.shape, scene.color, scene.background, rendering)), np.float32)
    if rendering == "outline":  # an accent band OUTLINE px wide around a shape of the usual overall size
        inner, outer = _alpha(scene.shape, 10 - OUTLINE / 2), _alpha(scene.shape, 10 + OUTLINE / 2)
        return background * (1 - outer) + accent * (outer - inner) + color * inner
    alpha = _alpha(scene.shape, 10)
    ground = np.broadcast_to(background, (world.SIZE, world.SIZE, 3)).copy()
    if rendering == "ground":  # the lowest rows of the background in the accent colour, behind the object
        ground[-GROUND_ROWS:] = accent
    fill = np.broadcast_to(color, (world.SIZE, world.SIZE, 3)).copy()
    if rendering == "shade":  # the object's part below a fixed row in the accent colour
        fill[SHADE_FROM_ROW:] = accent
    image = ground * (1 - alpha) + fill * alpha
    if rendering == "frame":  # an accent band FRAME px wide along the image border, over everything
        image[:FRAME], image[-FRAME:], image[:, :FRAME], image[:, -FRAME:] = accent, accent, accent, accent
    if rendering == "pastel":  # every colour blended PASTEL of the way to white
        image = image + PASTEL * (255 - image)
    return image


def _palette(rendering: str) -> np.ndarray:
    flat = np.array(list(world.COLORS.values()), np.float32)
    return np.concatenate([flat, flat + PASTEL * (255 - flat)]) if rendering == "pastel" else flat


def scenes_for(rendering: str) -> list[world.Scene]:
    """The world's pretraining scenes (5 shapes x every colour pair), without the accent colour where the
    rendering draws in it (an accent outline on an accent object would not show)."""
    uses_accent = rendering in ("frame", "outline", "ground", "shade")
    return [s for s in world.all_scenes() if not (uses_accent and ACCENT in (s.color, s.background))]


def round_trip(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """Encodes (the latent mean) and decodes a batch of float RGB images, 0-255."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()


def check(vae: AutoencoderKL, rendering: str) -> dict[str, float]:
    """Mean absolute error and nearest-colour agreement of `rendering` after the VAE's round trip."""
    before = np.stack([render(scene, rendering) for scene in scenes_for(rendering)]).astype(np.float32)
    after = round_trip(vae, before)
    palette = _palette(rendering)

    def nearest(images: np.ndarray) -> np.ndarray:
        return np.argmin(((images[..., None, :] - palette) ** 2).sum(axis=-1), axis=-1)

    return {
        "images": len(before),
        "mean_abs_error": float(np.abs(after - before).mean()),
        "pixels_same_colour": float((nearest(after) == nearest(before)).mean()),
    }


def read_back_by_shape(vae: AutoencoderKL, style: str = "hollow") -> dict[str, float]:
    """Per shape, the fraction of the world's scenes drawn in `style` (a `world.STYLES` entry) that the metric reads
    fully right (shape, colours and style) after the VAE's round trip: the most any training can score on them."""
    scenes = [world.Scene(s.shape, s.color, s.background, style) for s in world.all_scenes()]
    after = round_trip(vae, np.stack([np.asarray(world.render(scene), np.float32) for scene in scenes]))
    right: dict[str, list[bool]] = {}
    for scene, image in zip(scenes, after, strict=True):
        reading = world.read_image(np.clip(image, 0, 255).astype(np.uint8))
        right.setdefault(scene.shape, []).append(all(reading.matches(scene).values()))
    return {shape: sum(values) / len(values) for shape, values in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("sample_data/world-sd1"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae", torch_dtype=torch.float32).eval()
    print("| rendering | images | mean abs error (0-255) | pixels keeping their colour |\n|---|---|---|---|")
    for rendering in RENDERINGS:
        result = check(vae, rendering)
        error, kept = result["mean_abs_error"], result["pixels_same_colour"]
        print(f"| {rendering} | {result['images']} | {error:.1f} | {kept:.3f} |")
    by_shape = read_back_by_shape(vae)
    print("\n| hollow, read back fully right | " + " | ".join(by_shape) + " |\n|---|" + "---|" * len(by_shape))
    print("| after the round trip | " + " | ".join(f"{value:.2f}" for value in by_shape.values()) + " |")


if __name__ == "__main__":
    main()
