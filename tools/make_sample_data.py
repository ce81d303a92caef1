"""Writes sample_data/star: eight 64x64 images of a red five-pointed star on flat backgrounds, plus metadata.csv.

The images are the quickstart's default dataset. They are drawn, not downloaded, so anyone can regenerate them:
    python tools/make_sample_data.py
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from sdtune import data

BACKGROUNDS = {
    "blue": (40, 70, 200),
    "green": (40, 160, 70),
    "yellow": (230, 200, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "purple": (130, 50, 160),
    "cyan": (40, 190, 200),
    "gray": (128, 128, 128),
}
STAR_COLOR = (210, 30, 30)
SIZE = 64


def star_points(center: tuple[float, float], outer: float, inner: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a five-pointed star, alternating outer and inner radius."""
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = rotation + i * math.pi / 5 - math.pi / 2
        points.append((center[0] + radius * math.cos(angle), center[1] + radius * math.sin(angle)))
    return points


DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / "sample_data" / "star"


def main(folder: Path = DEFAULT_FOLDER) -> None:
    """Draws the images (small deterministic jitter in position, size and rotation) and writes the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, color) in enumerate(BACKGROUNDS.items()):
        image = Image.new("RGB", (SIZE, SIZE), color)
        jitter = (index % 3 - 1) * 2, (index % 2) * 2 - 1
        outer = 22 + index % 3
        points = star_points((SIZE / 2 + jitter[0], SIZE / 2 + jitter[1]), outer, outer * 0.42, index * 0.06)
        ImageDraw.Draw(image).polygon(points, fill=STAR_COLOR)
        file_name = f"star_{index:02d}_{name}.png"
        image.save(folder / file_name)
        rows.append({"file_name": file_name, "text": f"a red <star> on a {name} background"})
    data.write_metadata(folder, rows)


if __name__ == "__main__":
    main()
