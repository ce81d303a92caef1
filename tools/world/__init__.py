"""A tiny synthetic world for measuring whether training learns: one flat shape on a flat background, 32x32 pixels.

Captions name the shape, its colour and the background colour, so a generated image can be scored without any
learned model: the background is the median of the border ring, the object the pixels far from it, its colour their
median, its shape the best IoU against rendered templates of every shape.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
PRETRAIN_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
CONCEPT_SHAPES = ("star", "heart")  # never seen in pretraining: personalization concepts
ALL_SHAPES = PRETRAIN_SHAPES + CONCEPT_SHAPES
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One image's content: a `color` `shape` on a `background`."""

    shape: str
    color: str
    background: str
    style: str = "flat"  # "hollow": the same shape cut out of its centre; "small": drawn at the hole's size (`render`)

    def caption(self) -> str:
        """The canonical caption, `a {color} {shape} on a {background} background` (`a small red circle ...` for
        the small rendering, which a base model may learn: `tools/pretrain_world.py --small-per-scene`)."""
        size = "small " if self.style == "small" else ""
        return f"a {size}{self.color} {self.shape} on a {self.background} background"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.82
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        return [
            (
                cx + (r if i % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
                cy + (r if i % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    if shape == "heart":
        points = []
        for i in range(48):
            t = 2 * math.pi * i / 48  # the classic heart curve, scaled to fit radius r
            x, y = (
                16 * math.sin(t) ** 3,
                13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t),
            )
            points.append((cx + x * r / 17, cy - y * r / 17 - r * 0.1))
        return points
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    elif shape == "cross":
        arm, w = r * 0.95, r * 0.32
        draw.rectangle((cx - arm, cy - w, cx + arm, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - arm, cx + w, cy + arm), fill=fill)
    else:
        polygon = _polygon(shape, cx, cy, r)
        if polygon is None:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")
        draw.polygon(polygon, fill=fill)


STYLES = ("flat", "hollow", "small")
HOLE_SCALE = 0.4  # the hollow style's hole: the same shape at this fraction of the object's radius


def render(scene: Scene, offset: tuple[float, float] = (0.0, 0.0), radius: float = 10.0) -> Image.Image:
    """Draws a scene at 4x and downsamples (anti-aliased edges). `offset` moves the centre; `radius` sizes it.

    The `hollow` style cuts the same shape at `HOLE_SCALE` of the radius out of the object's centre (a thick
    outline, the world's line-art style): a rendering the world model never saw, built from palette colours and
    a band at least 5 pixels wide so that its 16x16-latent VAE can draw it (2-pixel outlines, or a second colour
    inside the object, it draws poorly: docs/quality.md#a-style)."""
    if scene.style not in STYLES:
        raise ValueError(f"unknown style {scene.style!r}; known: {', '.join(STYLES)}")
    big = SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    cx, cy = (SIZE / 2 + offset[0]) * _SUPERSAMPLE, (SIZE / 2 + offset[1]) * _SUPERSAMPLE
    draw = ImageDraw.Draw(image)
    if scene.style == "small":  # the hole's shape and size, in the object's colour (the pieces hollow is made of)
        radius *= HOLE_SCALE
    _draw(draw, scene.shape, cx, cy, radius * _SUPERSAMPLE, COLORS[scene.color])
    if scene.style == "hollow":
        _draw(draw, scene.shape, cx, cy, radius * HOLE_SCALE * _SUPERSAMPLE, COLORS[scene.background])
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def render_jittered(scene: Scene, rng: random.Random) -> Image.Image:
    """A scene with the small jitter the world uses: centre within +-2 px, radius 9 to 11 px."""
    return render(scene, (rng.uniform(-2, 2), rng.uniform(-2, 2)), rng.uniform(9, 11))


def all_scenes(shapes=PRETRAIN_SHAPES) -> list[Scene]:
    """Every (shape, colour, background) with different object and background colours."""
    return [Scene(s, c, b) for s in shapes for c in COLORS for b in COLORS if c != b]


def split_scenes(seed: int = 0, unseen_fraction: float = 0.1) -> tuple[list[Scene], list[Scene]]:
    """(held-in, unseen) pretraining scenes: a fixed `unseen_fraction` of triples is never trained on."""
    scenes = all_scenes()
    rng = random.Random(seed)
    unseen = set(rng.sample(range(len(scenes)), round(len(scenes) * unseen_fraction)))
    return [s for i, s in enumerate(scenes) if i not in unseen], [s for i, s in enumerate(scenes) if i in unseen]


# ---------------------------------------------------------------------------------------------------------------
# The metric

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


def _nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _template_masks() -> tuple[np.ndarray, list[str]]:
    masks, names = [], []
    for shape in ALL_SHAPES:
        for dx in (-2, -1, 0, 1, 2):
            for dy in (-2, -1, 0, 1, 2):
                for radius in (9.0, 10.0, 11.0):
                    image = render(Scene(shape, "white", "black"), (dx, dy), radius)
                    masks.append(np.asarray(image, dtype=np.float32).mean(axis=2) > 127)
                    names.append(shape)
    return np.stack(masks), names


_TEMPLATES: tuple[np.ndarray, list[str]] | None = None


@dataclass(frozen=True)
class Reading:
    """What the metric reads off an image."""

    shape: str | None
    color: str | None
    background: str
    shape_iou: float
    style: str = "flat"  # "hollow" when the object's main colour encloses a hole (`HOLE_MIN_SHARE`)
    area: int = 0  # pixels not in the background's colour

    def matches(self, scene: Scene) -> dict[str, bool]:
        """Per attribute: does the image show what the scene asked for (a flat scene must not read hollow)?"""
        return {
            "shape": self.shape == scene.shape,
            "color": self.color == scene.color,
            "background": self.background == scene.background,
            "style": self.style == scene.style,
        }


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Reads shape, object colour and background colour off a 32x32 RGB image.

    Every pixel is classified to its nearest palette colour. The background is the palette colour nearest to the
    median of the 2-pixel border ring; the object is every pixel classified otherwise, its colour their most common
    class, its shape the template (any shape, +-2 px, three sizes) with the best IoU.
    """
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _template_masks()
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    ring = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    background_index = _NAMES.index(_nearest_color(np.median(ring, axis=0)))
    classes = np.argmin(((pixels[:, :, None, :] - _PALETTE) ** 2).sum(axis=3), axis=2)
    mask = classes != background_index
    if mask.sum() < 4:
        return Reading(None, None, _NAMES[background_index], 0.0, area=int(mask.sum()))
    color_index = int(np.bincount(classes[mask], minlength=len(_NAMES)).argmax())
    masks, names = _TEMPLATES
    ious = (masks & mask).sum(axis=(1, 2)) / np.maximum((masks | mask).sum(axis=(1, 2)), 1)
    best = int(np.argmax(ious))
    style = "hollow" if _enclosed_share(classes == color_index) >= HOLE_MIN_SHARE else "flat"
    return Reading(
        names[best], _NAMES[color_index], _NAMES[background_index], float(ious[best]), style, int(mask.sum())
    )


HOLE_MIN_SHARE = 0.04  # of the area the main colour encloses (the style's hole is 0.16 of it; flat shapes: 0)


def _enclosed_share(main: np.ndarray) -> float:
    """Which share of the region that `main` (a boolean mask) covers, holes filled, is hole: pixels that cannot
    reach the image border without crossing `main` (4-connected). Whatever colour the hole is drawn in counts, so
    a blurred hole (red ring around a reddish-white centre) still reads."""
    outside = np.zeros_like(main)
    outside[[0, -1], :] = ~main[[0, -1], :]
    outside[:, [0, -1]] |= ~main[:, [0, -1]]
    while True:  # grow the outside through non-`main` pixels until it stops changing (a 32x32 image: fast)
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~main
        if (grown == outside).all():
            break
        outside = grown
    hole = ~main & ~outside
    return float(hole.sum() / max((main | hole).sum(), 1))


def score(images: list, scenes: list[Scene], min_shape_iou: float = 0.0) -> dict[str, float]:
    """Fractions of images whose shape, colour, background, and all three, match their scenes. With
    `min_shape_iou` a shape counts only if its template IoU reaches it (0: the best template always counts, so a
    scribble can read as the shape it overlaps most)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    totals = {"shape": 0, "color": 0, "background": 0, "style": 0, "all": 0}
    for image, scene in zip(images, scenes, strict=True):
        reading = read_image(image)
        matches = reading.matches(scene)
        matches["shape"] = matches["shape"] and reading.shape_iou >= min_shape_iou
        for key, ok in matches.items():
            totals[key] += ok
        totals["all"] += all(matches.values())
    return {key: value / len(scenes) for key, value in totals.items()}
