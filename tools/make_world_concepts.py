"""Writes the personalization concepts of the synthetic world into sample_data/world/ (8 images + metadata.csv each).

    python tools/make_world_concepts.py
    python tools/make_world_concepts.py --style-regularization DIR   # the style set's flat twins (reg images)

- `red_star`: a shape the base model never saw (outside its span: LoRA territory, TI's negative control).
- `purple_triangle`: a shape and colour it knows, as one new word (inside its span: TI can learn it).
- `hollow`: a rendering style it never saw (the shape cut out of its centre), 12 images over 4 shapes and 6
  colours (`StyleConcept.train_scenes`), captioned `<hollow> red circle on a yellow background` (and with
  the plain word `hollow` for a LoRA alone); `hollow_adjective`: the same images captioned `a <hollow> red circle
  on a yellow background`, for a base that knows `a small red circle ...` (`pretrain_world.py --small-per-scene`);
  `hollow_suffix`: the same images, the trigger after the caption; `hollow_adjective_square`: the adjective
  captions over a style set that holds out the square instead of the cross (`world.quality.style_sets`);
  `hollow_adjective_no_cross`: the square held out and the cross in neither set (12 images over circle, triangle
  and diamond: the shapes the world's VAE draws hollow besides the square, `tools/world_vae_check.py`).
Captions name the concept with a one-token placeholder, `a <star> on a blue background`. Training backgrounds are
`world.quality.TRAIN_BACKGROUNDS`; the others are kept for measuring editability.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import world
from sdtune import data
from world import quality

ROOT = Path(__file__).resolve().parent.parent / "sample_data" / "world"


def write_concept(concept: quality.Concept, per_background: int = 2, seed: int = 0) -> Path:
    """Renders `per_background` jittered images on each training background and writes metadata.csv."""
    folder = ROOT / concept.name
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = random.Random(seed), []
    for background in quality.TRAIN_BACKGROUNDS[concept.name]:
        for index in range(per_background):
            image = world.render_jittered(world.Scene(concept.shape, concept.color, background), rng)
            file_name = f"{concept.name}_{background}_{index}.png"
            image.save(folder / file_name)
            rows.append({"file_name": file_name, "text": f"a {concept.placeholder} on a {background} background"})
    data.write_metadata(folder, rows)
    return folder


def write_style(style: quality.StyleConcept = quality.STYLE, seed: int = 0) -> Path:
    """Renders the style set (`style.train_scenes`, jittered), captioned `<hollow> red circle on a yellow
    background` (column `text`, for TI and TI+LoRA) and `hollow red circle on a yellow background` (the plain
    trigger word a LoRA alone learns, column `quality.WORD_COLUMN`)."""
    folder = ROOT / style.name
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = random.Random(seed), []
    for scene in style.train_scenes:
        file_name = f"{style.name}_{scene.color}_{scene.shape}_{scene.background}.png"
        world.render_jittered(scene, rng).save(folder / file_name)
        rows.append(
            {"file_name": file_name, "text": style.prompt(scene), quality.WORD_COLUMN: style.prompt(scene, "lora")}
        )
    data.write_metadata(folder, rows, ("file_name", "text", quality.WORD_COLUMN))
    return folder


def write_style_regularization(folder: Path, seed: int = 1) -> Path:
    """Renders the style set's scenes flat, captioned without a trigger (`a red circle on a yellow background`, in
    both caption columns): regularization images that pair every style image with its content in the base look, so
    that only the trigger tells the two apart (`reg_data_dir`; docs/quality.md#results)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = random.Random(seed), []
    for scene in quality.STYLE_TRAIN_SCENES:
        flat = world.Scene(scene.shape, scene.color, scene.background)
        file_name = f"flat_{scene.color}_{scene.shape}_{scene.background}.png"
        world.render_jittered(flat, rng).save(folder / file_name)
        rows.append({"file_name": file_name, "text": flat.caption(), quality.WORD_COLUMN: flat.caption()})
    data.write_metadata(folder, rows, ("file_name", "text", quality.WORD_COLUMN))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--style-regularization", type=Path, help="instead: write the style set's flat twins to this folder"
    )
    args = parser.parse_args()
    if args.style_regularization:
        print(f"wrote {write_style_regularization(args.style_regularization)}")
    else:
        for concept in quality.CONCEPTS:
            print(f"wrote {write_concept(concept)}")
        for style in quality.STYLES:
            print(f"wrote {write_style(style)}")
