"""Generating and scoring images of the synthetic world (`world`, this package): what the quality benchmark and the
pretraining script measure with. Fixed seeds throughout, so equal weights give equal scores. The world's models are
of the SD1 family (`sample_data/world-sd1`) and the SDXL family (`sample_data/world-sdxl`); the pipelines encode the
prompts their own way, so a model trained by sdtune is scored under the conventions diffusers uses at inference."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

import world
from sdtune import families, inference, models

SAMPLER_STEPS = 20
GUIDANCE = 3.0


def world_pipeline(family, components: dict, scheduler_config: dict):
    """A pipeline of `family` over the components (by pipeline attribute name) with DPM-Solver++ (the sampler the
    world is scored with)."""
    return inference.pipeline_from_components(family, components, scheduler_config, "dpmpp_2m")


def family_of(pipe) -> families.Family:
    """The family of a world pipeline (SDXL pipelines have a second text encoder)."""
    return families.SDXL if getattr(pipe, "text_encoder_2", None) is not None else families.SD1


def generate(pipe, prompts: list[str], seed: int = 0) -> list[Image.Image]:
    """One 32x32 image per prompt at the world's sampler settings, the prompts encoded by the pipeline itself;
    prompt `i` uses seed `seed + i`."""
    seeds = [seed + i for i in range(len(prompts))]
    size = (world.SIZE, world.SIZE)
    return inference.generate_images(
        pipe, family_of(pipe), prompts, seeds, size, SAMPLER_STEPS, GUIDANCE, batch_size=64, pipeline_encodes=True
    )


def evaluate(pipe, scenes: list[world.Scene], prompts: list[str] | None = None, seed: int = 0) -> dict[str, float]:
    """Scores of images generated for `scenes` (from their captions unless `prompts` are given)."""
    prompts = prompts if prompts is not None else [scene.caption() for scene in scenes]
    return world.score(generate(pipe, prompts, seed), scenes, MIN_SHAPE_IOU)


def save_grid(images: list[Image.Image], path: Path, columns: int = 8, scale: int = 3) -> Path:
    """Writes images as a grid PNG, upscaled so 32x32 images are visible."""
    return inference.save_png(inference.image_grid(images, columns, scale), path)


# ---------------------------------------------------------------------------------------------------------------
# Personalization concepts and what is measured about them


@dataclass(frozen=True)
class Concept:
    """A concept to personalize: a `color` `shape` named by a one-token `placeholder`."""

    name: str
    shape: str
    color: str
    placeholder: str
    init_word: str


CONCEPTS = (
    Concept("red_star", "star", "red", "<star>", "diamond"),  # outside the base's span: a shape it never saw
    Concept("purple_triangle", "triangle", "purple", "<ptri>", "triangle"),  # inside: known shape and colour
)
TRAIN_BACKGROUNDS = {
    "red_star": ("blue", "green", "yellow", "white"),
    "purple_triangle": ("blue", "green", "white", "orange"),
}
SEEDS_PER_BACKGROUND = 4
MIN_SHAPE_IOU = 0.0  # the benchmark's default reading; docs/quality.md also reports 0.4 (scribbles rejected)


# The style set: 12 images, every one of 6 colours twice as the object and twice as the background, split evenly
# over the shapes it shows (3 per shape over 4 shapes, 4 per shape over 3).
# Transfer, per axis: the shape it never shows (a style's `new_shape`), the colours it never shows (purple, orange)
# as the object, as the background, and all of them at once.
_STYLE_PAIRS = (
    ("red", "yellow"), ("blue", "green"), ("white", "black"),
    ("yellow", "blue"), ("green", "white"), ("black", "red"),
    ("red", "green"), ("blue", "black"), ("white", "yellow"),
    ("yellow", "red"), ("green", "blue"), ("black", "white"),
)  # fmt: skip


def style_sets(
    new_shape: str, left_out: tuple[str, ...] = ()
) -> tuple[tuple[world.Scene, ...], dict[str, tuple[tuple[str, str, str], ...]]]:
    """(style set scenes, transfer (shape, colour, background) triples per axis) for a style set drawn over the
    world's other shapes: `new_shape` held out for transfer, `left_out` shapes (ones the world's VAE cannot draw in
    the style) in neither set."""
    shapes = [shape for shape in world.PRETRAIN_SHAPES if shape != new_shape and shape not in left_out]
    per_shape = len(_STYLE_PAIRS) // len(shapes)
    train = tuple(
        world.Scene(shape, color, background, "hollow")
        for index, shape in enumerate(shapes)
        for color, background in _STYLE_PAIRS[index * per_shape : (index + 1) * per_shape]
    )
    axis_shapes = [shapes[index % len(shapes)] for index in range(4)]  # four scenes per axis, the shapes in turn
    new_pairs = (("red", "blue"), ("white", "green"), ("yellow", "black"), ("blue", "red"))
    new_colours, their_backgrounds = ("purple", "orange", "purple", "orange"), ("yellow", "green", "white", "black")
    old_colours, new_backgrounds = ("blue", "white", "yellow", "red"), ("purple", "orange", "purple", "orange")
    transfer = {
        "new shape": tuple((new_shape, color, background) for color, background in new_pairs),
        "new colour": tuple(zip(axis_shapes, new_colours, their_backgrounds, strict=True)),
        "new background": tuple(zip(axis_shapes, old_colours, new_backgrounds, strict=True)),
        "all new": ((new_shape, "purple", "orange"), (new_shape, "orange", "purple")),
    }
    return train, transfer


@dataclass(frozen=True)
class StyleConcept:
    """A rendering style to personalize. Its trigger replaces a caption's first word (`slot` "first": `<hollow> red
    circle on a blue background`) or stands where a base that knows sizes reads `small` (`slot` "adjective": `a
    <hollow> red circle on a blue background`; `tools/pretrain_world.py --small-per-scene`). One token in the place
    of the one-token `a` keeps every later word at its pretraining position, and CLIP's causal text encoder gives
    the first token the same state in every prompt: a clean switch.
    (`a red circle on a blue background in hollow style` leaves the words as well but makes the trigger's state
    depend on the content before it; `<hollow>` as plain text is three tokens and garbles the world model's
    colours and shapes: docs/quality.md#a-style.)"""

    name: str
    style: str  # a `world.STYLES` entry
    placeholder: str  # the learned token (TI, TI+LoRA)
    word: str  # the plain one-token trigger word a LoRA alone learns (its captions' `word_column`)
    init_word: str
    slot: str = "first"  # where the trigger stands: "first" (in the place of `a`), "adjective" (after it), "suffix"
    new_shape: str = "cross"  # the shape the style set leaves out, for transfer (`style_sets`)
    left_out: tuple[str, ...] = ()  # shapes in neither the style set nor transfer (`style_sets`)

    @property
    def train_scenes(self) -> tuple[world.Scene, ...]:
        """The style set's scenes (`style_sets`)."""
        return style_sets(self.new_shape, self.left_out)[0]

    @property
    def transfer(self) -> dict[str, tuple[tuple[str, str, str], ...]]:
        """Transfer (shape, colour, background) triples per axis (`style_sets`)."""
        return style_sets(self.new_shape, self.left_out)[1]

    @property
    def transfer_scenes(self) -> tuple[world.Scene, ...]:
        """Every transfer scene, axis by axis, in the style."""
        return tuple(world.Scene(*triple, self.style) for triples in self.transfer.values() for triple in triples)

    def trigger(self, method: str | None) -> str:
        """The trigger the captions of `method` use: the word for LoRA alone, else the placeholder."""
        return self.word if method == "lora" else self.placeholder

    def prompt(self, scene: world.Scene, method: str | None = None) -> str:
        """`scene`'s caption with `method`'s trigger in its `slot`."""
        return self.triggered(method, scene.caption().removeprefix("a "))

    def triggered(self, method: str | None, rest: str) -> str:
        """`rest` of a caption (what follows its `a`) with `method`'s trigger in this style's slot."""
        if self.slot == "suffix":
            return f"a {rest} {self.trigger(method)}"
        return ("a " if self.slot == "adjective" else "") + f"{self.trigger(method)} {rest}"


STYLE = StyleConcept("hollow", "hollow", "<hollow>", "hollow", "outline")
# The same style for a base that read `a small red circle ...` in pretraining: the trigger where `small` stands.
STYLE_ADJECTIVE = StyleConcept("hollow_adjective", "hollow", "<hollow>", "hollow", "outline", slot="adjective")
# The trigger after the caption: the causal text encoder reads every content word as without it (docs/quality.md).
STYLE_SUFFIX = StyleConcept("hollow_suffix", "hollow", "<hollow>", "hollow", "outline", slot="suffix")
# The adjective style with the square held out instead of the cross, whose hollow band (1.9 px) the world's VAE
# draws poorly (docs/quality.md#a-style).
STYLE_ADJECTIVE_SQUARE = StyleConcept(
    "hollow_adjective_square", "hollow", "<hollow>", "hollow", "outline", slot="adjective", new_shape="square"
)
# The adjective style over the four shapes the world's VAE draws hollow (`tools/world_vae_check.py`: circle 1.00,
# square 1.00, diamond 0.96, triangle 0.82, cross 0.66): the cross in neither set, the square held out.
STYLE_ADJECTIVE_NO_CROSS = StyleConcept(
    "hollow_adjective_no_cross",
    "hollow",
    "<hollow>",
    "hollow",
    "outline",
    slot="adjective",
    new_shape="square",
    left_out=("cross",),
)
STYLES = (STYLE, STYLE_ADJECTIVE, STYLE_SUFFIX, STYLE_ADJECTIVE_SQUARE, STYLE_ADJECTIVE_NO_CROSS)
WORD_COLUMN = "text_word"  # the style set's captions with the plain trigger word (metadata.csv)
STYLE_TRAIN_SCENES, STYLE_TRANSFER = style_sets(STYLE.new_shape)  # the first style's sets
STYLE_TRANSFER_SCENES = STYLE.transfer_scenes


def base_pipeline(base: Path):
    """The base model as diffusers' own pipeline for its family (SD1 or SDXL), with the benchmark's sampler."""
    xl = (Path(base) / "text_encoder_2").is_dir()
    pipeline_class = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    options = models.without_safety_checker(pipeline_class)
    pipe = pipeline_class.from_pretrained(base, torch_dtype=torch.float32, **options)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_embedding(pipe, path: Path, token: str) -> None:
    """Loads an sdtune embedding file with diffusers' own loader: from the file for a one-encoder family, one call
    per text encoder (the family record's keys and attributes) for SDXL (diffusers' way, docs/formats.md#sdxl)."""
    encoders = family_of(pipe).text_encoders
    if len(encoders) == 1:
        pipe.load_textual_inversion(str(path), token=token)
        return
    state = load_file(str(path))
    for spec in encoders:
        pipe.load_textual_inversion(
            state[spec.embedding_key],
            token=token,
            text_encoder=getattr(pipe, spec.component),
            tokenizer=getattr(pipe, spec.tokenizer),
        )


def load_pipeline(base: Path, folder: Path | None, concept: Concept, method: str | None):
    """The base model as a pipeline, with the embedding and/or LoRA that `method` wrote to `folder` (under the
    world configs' file names) loaded by diffusers' own loaders; `method` None gives the base alone."""
    pipe = base_pipeline(base)
    if method in ("ti", "ti+lora"):
        load_embedding(pipe, folder / f"{concept.placeholder.strip('<>')}.safetensors", concept.placeholder)
    if method in ("lora", "ti+lora"):
        name = f"{concept.placeholder.strip('<>')}_lora" if method == "ti+lora" else concept.name
        pipe.load_lora_weights(str(folder / f"{name}.safetensors"))
    return pipe


def train_overrides(
    method: str, concept: Concept, base: Path, data_dir: Path, out: Path, max_steps: int | None = None
) -> list[str]:
    """`key=value` overrides that point a world config (`configs/world_<method>.yaml`) at a concept's images."""
    overrides = [f"base_model={base}", f"train_data_dir={data_dir / concept.name}", f"output_dir={out}"]
    if isinstance(concept, StyleConcept) and method == "lora":
        overrides.append(f"caption_column={WORD_COLUMN}")
    if method == "lora":  # the name `load_pipeline` reads, whatever folder a `--set train_data_dir=...` points at
        overrides.append(f"output_name={concept.name}")
    if method != "lora":
        overrides += [f"placeholder_token={concept.placeholder}", f"init_word={concept.init_word}"]
    if max_steps:
        overrides.append(f"max_steps={max_steps}")
    return overrides


def concept_by_name(name: str) -> Concept | StyleConcept:
    """The concept (or the style) called `name`."""
    return next(concept for concept in (*CONCEPTS, *STYLES) if concept.name == name)


def unseen_backgrounds(concept: Concept) -> tuple[str, ...]:
    """Backgrounds the concept's training images do not show (for editability)."""
    return tuple(b for b in world.COLORS if b != concept.color and b not in TRAIN_BACKGROUNDS[concept.name])


def concept_scenes(concept: Concept, backgrounds) -> tuple[list[world.Scene], list[str]]:
    """(scenes, prompts): the concept on each background, `SEEDS_PER_BACKGROUND` times."""
    scenes = [world.Scene(concept.shape, concept.color, b) for b in backgrounds for _ in range(SEEDS_PER_BACKGROUND)]
    return scenes, [f"a {concept.placeholder} on a {scene.background} background" for scene in scenes]


def prior_scenes(count: int = 48, seed: int = 0) -> list[world.Scene]:
    """Base prompts that personalization must not break: `count` held-in scenes plus every unseen combination."""
    held_in, unseen = world.split_scenes()
    return random.Random(seed).sample(held_in, count) + unseen


def style_scenes(style: StyleConcept, scenes, method: str | None) -> tuple[list[world.Scene], list[str]]:
    """(scenes, prompts): each style scene `SEEDS_PER_BACKGROUND` times, prompted with `method`'s trigger."""
    repeated = [scene for scene in scenes for _ in range(SEEDS_PER_BACKGROUND)]
    return repeated, [style.prompt(scene, method) for scene in repeated]


def measure(
    pipe, concept: Concept | StyleConcept, seed: int = 0, prior: bool = True, method: str | None = None
) -> tuple[dict[str, float], list[Image.Image]]:
    """Fidelity (concept on training backgrounds), editability (on unseen ones) and, unless `prior` is False, prior
    preservation (base prompts), as fractions of fully correct images; plus the concept images (training, then
    unseen backgrounds). For a style: fidelity on the style set's scenes, editability = transfer to the scenes with
    shapes, colours and backgrounds the style set never shows (shape, colour, background and style all right),
    prompted with the trigger `method` trained."""
    if isinstance(concept, StyleConcept):
        fidelity_scenes, fidelity_prompts = style_scenes(concept, concept.train_scenes, method)
        edit_scenes, edit_prompts = style_scenes(concept, concept.transfer_scenes, method)
    else:
        fidelity_scenes, fidelity_prompts = concept_scenes(concept, TRAIN_BACKGROUNDS[concept.name])
        edit_scenes, edit_prompts = concept_scenes(concept, unseen_backgrounds(concept))
    images = generate(pipe, fidelity_prompts + edit_prompts, seed)
    split = len(fidelity_prompts)
    scores = {
        "fidelity": world.score(images[:split], fidelity_scenes, MIN_SHAPE_IOU)["all"],
        "editability": world.score(images[split:], edit_scenes, MIN_SHAPE_IOU)["all"],
    }
    if prior:
        scores["prior"] = prior_score(pipe, seed)
    return scores, images


def editability_by_background(images: list[Image.Image], concept: Concept | StyleConcept) -> dict[str, float]:
    """Fraction fully right per unseen background, from `measure`'s images (training backgrounds first); for a
    style, per transfer axis (`StyleConcept.transfer`: new shape, new colour, new background, all new)."""
    if isinstance(concept, StyleConcept):
        start, result = SEEDS_PER_BACKGROUND * len(concept.train_scenes), {}
        for axis, triples in concept.transfer.items():
            scenes = [world.Scene(*triple, "hollow") for triple in triples for _ in range(SEEDS_PER_BACKGROUND)]
            result[axis] = world.score(images[start : start + len(scenes)], scenes, MIN_SHAPE_IOU)["all"]
            start += len(scenes)
        return result
    start = SEEDS_PER_BACKGROUND * len(TRAIN_BACKGROUNDS[concept.name])
    result = {}
    for background in unseen_backgrounds(concept):
        scenes = [world.Scene(concept.shape, concept.color, background)] * SEEDS_PER_BACKGROUND
        result[background] = world.score(images[start : start + SEEDS_PER_BACKGROUND], scenes, MIN_SHAPE_IOU)["all"]
        start += SEEDS_PER_BACKGROUND
    return result


def prior_score(pipe, seed: int = 0) -> float:
    """Fraction of the `prior_scenes` base prompts drawn fully right (the same prompts and seeds for every concept)."""
    return evaluate(pipe, prior_scenes(), seed=seed + 5000)["all"]


# ---------------------------------------------------------------------------------------------------------------
# Composition: an identity and a style, trained separately, used together


def composition_scenes(
    identity: Concept, style: StyleConcept, style_method: str = "lora"
) -> tuple[list[world.Scene], list[str]]:
    """(scenes, prompts): the identity in the style on every background but its own colour, `SEEDS_PER_BACKGROUND`
    times each, with the trigger of the style's `style_method` in the place of the first word: `hollow <ptri> on a
    green background` for a style LoRA, `<hollow> <ptri> ...` for a TI+LoRA style."""
    backgrounds = [b for b in world.COLORS if b != identity.color]
    scenes = [
        world.Scene(identity.shape, identity.color, b, style.style)
        for b in backgrounds
        for _ in range(SEEDS_PER_BACKGROUND)
    ]
    prompts = [style.triggered(style_method, f"{identity.placeholder} on a {s.background} background") for s in scenes]
    return scenes, prompts


def composition_scores(images: list, scenes: list[world.Scene]) -> dict[str, float]:
    """Fractions of images with the identity right (shape, colour, background), in the style, and both."""
    readings = [world.read_image(image).matches(scene) for image, scene in zip(images, scenes, strict=True)]
    identity = [r["shape"] and r["color"] and r["background"] for r in readings]
    return {
        "both": sum(i and r["style"] for i, r in zip(identity, readings, strict=True)) / len(scenes),
        "identity": sum(identity) / len(scenes),
        "style": sum(r["style"] for r in readings) / len(scenes),
    }
