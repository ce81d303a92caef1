"""The world metric: ground truth scores 1.0, mismatched targets score chance, small noise changes nothing."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

import world


@pytest.fixture(scope="module")
def rendered():
    rng = random.Random(0)
    scenes = world.all_scenes(world.ALL_SHAPES)
    return scenes, [world.render_jittered(scene, rng) for scene in scenes]


def test_ground_truth_scores_one(rendered):
    scenes, images = rendered
    assert world.score(images, scenes) == {"shape": 1.0, "color": 1.0, "background": 1.0, "style": 1.0, "all": 1.0}


def test_mismatched_targets_score_chance(rendered):
    scenes, images = rendered
    shuffled = list(scenes)
    random.Random(1).shuffle(shuffled)
    scores = world.score(images, shuffled)
    assert scores["shape"] < 0.25 and scores["color"] < 0.25 and scores["background"] < 0.25  # chance: 1/7, 1/8
    assert scores["all"] < 0.02


@pytest.mark.parametrize("which", ["rendered", "hollow"])
def test_small_noise_and_blur_change_nothing(which, request):
    """Flat and hollow renders alike: noise (sigma 12) and a 0.6 px blur change at most 1-3% of readings."""
    from PIL import ImageFilter

    scenes, images = request.getfixturevalue(which)
    noise = np.random.default_rng(0)
    noisy = [np.clip(np.asarray(im, dtype=np.float32) + noise.normal(0, 12, (32, 32, 3)), 0, 255) for im in images]
    assert world.score(noisy, scenes)["all"] >= 0.99
    blurred = [im.filter(ImageFilter.GaussianBlur(0.6)) for im in images]
    assert world.score(blurred, scenes)["all"] >= 0.97


def test_blank_image_reads_no_shape():
    blank = np.full((32, 32, 3), world.COLORS["blue"], dtype=np.float32)
    reading = world.read_image(blank)
    assert (reading.shape, reading.color, reading.background) == (None, None, "blue")


def test_split_is_fixed_and_excludes_concepts():
    held_in, unseen = world.split_scenes()
    assert (len(held_in), len(unseen)) == (252, 28)
    assert not set(held_in) & set(unseen)
    assert all(scene.shape in world.PRETRAIN_SHAPES for scene in held_in + unseen)
    assert world.split_scenes() == (held_in, unseen)


def test_editability_by_background_reads_each_unseen_background():
    """The per-background split of `quality.measure`'s images: the concept drawn right on purple and black but on
    yellow where orange was asked for scores 1, 1, 0 (the failure docs/quality.md reports)."""
    from world import quality

    concept = quality.concept_by_name("red_star")
    per = quality.SEEDS_PER_BACKGROUND
    training = [world.render(world.Scene("star", "red", b)) for b in quality.TRAIN_BACKGROUNDS["red_star"]]
    drawn = {"purple": "purple", "orange": "yellow", "black": "black"}
    unseen = [world.render(world.Scene("star", "red", drawn[b])) for b in quality.unseen_backgrounds(concept)]
    images = [im for im in training for _ in range(per)] + [im for im in unseen for _ in range(per)]
    assert quality.unseen_backgrounds(concept) == ("purple", "orange", "black")
    assert quality.editability_by_background(images, concept) == {"purple": 1.0, "orange": 0.0, "black": 1.0}


def test_min_shape_iou_rejects_a_scribble_that_best_matches_a_shape():
    """By default the best template counts however poor its overlap; `min_shape_iou` rejects such readings while
    clean renders (IoU ~0.8-1.0) still count."""
    image = np.array(world.render(world.Scene("star", "red", "blue")))
    background = np.array(world.COLORS["blue"], dtype=np.uint8)
    image[:, :18] = background  # keep a corner of the star: a fragment that still overlaps the star best
    image[14:, :] = background
    reading = world.read_image(image)
    assert reading.shape is not None and reading.shape_iou < 0.4
    scene = world.Scene(reading.shape, "red", "blue")
    assert world.score([image], [scene])["all"] == 1.0
    assert world.score([image], [scene], min_shape_iou=0.4)["all"] == 0.0
    clean = [world.render(world.Scene(shape, "red", "blue")) for shape in world.PRETRAIN_SHAPES]
    scenes = [world.Scene(shape, "red", "blue") for shape in world.PRETRAIN_SHAPES]
    assert world.score(clean, scenes, min_shape_iou=0.4)["all"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The hollow style and its reading


@pytest.fixture(scope="module")
def hollow():
    rng = random.Random(2)
    scenes = [world.Scene(s.shape, s.color, s.background, "hollow") for s in world.all_scenes(world.ALL_SHAPES)]
    return scenes, [world.render_jittered(scene, rng) for scene in scenes]


def test_hollow_ground_truth_scores_one_and_reads_as_hollow(hollow):
    scenes, images = hollow
    assert world.score(images, scenes) == {"shape": 1.0, "color": 1.0, "background": 1.0, "style": 1.0, "all": 1.0}
    hole = np.asarray(world.render(world.Scene("square", "red", "blue", "hollow")))[16, 16]
    assert tuple(hole) == world.COLORS["blue"]  # the centre shows the background


def test_style_is_read_both_ways(rendered, hollow):
    """A flat render asked for as hollow fails on style alone, and the reverse: the style is read, not assumed."""
    flat_scenes, flat_images = rendered
    hollow_scenes, hollow_images = hollow
    as_hollow = [world.Scene(s.shape, s.color, s.background, "hollow") for s in flat_scenes]
    scores = world.score(flat_images, as_hollow)
    assert (scores["style"], scores["all"], scores["shape"], scores["color"]) == (0.0, 0.0, 1.0, 1.0)
    as_flat = [world.Scene(s.shape, s.color, s.background) for s in hollow_scenes]
    assert world.score(hollow_images, as_flat)["style"] == 0.0


def test_style_against_shuffled_targets_is_chance(rendered, hollow):
    """Half flat, half hollow images against shuffled scenes: style right about half the time, all four ~never."""
    scenes = rendered[0][::2] + hollow[0][1::2]
    images = rendered[1][::2] + hollow[1][1::2]
    shuffled = list(scenes)
    random.Random(3).shuffle(shuffled)
    scores = world.score(images, shuffled)
    assert 0.4 < scores["style"] < 0.6
    assert scores["all"] < 0.02


def test_a_hole_in_another_colour_still_reads_hollow():
    """What a blurred decoder draws: a ring of the object's colour around a centre of an in-between colour."""
    image = np.array(world.render(world.Scene("circle", "red", "white", "hollow")))
    image[14:19, 14:19] = world.COLORS["orange"]
    assert world.read_image(image).style == "hollow"
    solid = np.array(world.render(world.Scene("circle", "red", "white")))
    solid[15:17, 15:17] = world.COLORS["white"]  # a 4-pixel speck: under 2% of the area, below HOLE_MIN_SHARE
    assert world.read_image(solid).style == "flat"


def test_unknown_style_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown style 'striped'; known: flat, hollow"):
        world.render(world.Scene("circle", "red", "blue", "striped"))


@pytest.mark.parametrize(("new_shape", "left_out"), [("cross", ()), ("square", ()), ("square", ("cross",))])
def test_style_set_covers_six_colours_and_transfer_leaves_one_axis_out_at_a_time(new_shape, left_out):
    """Transfer = what the style set never shows, per axis (docs/quality.md#a-style), whichever shape is held out;
    a left-out shape is in neither set and the others share the 12 images evenly."""
    from world import quality

    train, transfer = quality.style_sets(new_shape, left_out)
    shapes, colors, backgrounds = ({getattr(s, a) for s in train} for a in ("shape", "color", "background"))
    assert len(train) == 12 and len(set(train)) == 12 and len(shapes) == 4 - len(left_out)
    assert all(sum(s.shape == shape for s in train) == 12 // len(shapes) for shape in shapes)
    assert colors == backgrounds and len(colors) == 6 and new_shape not in shapes
    every_scene = [*train, *(world.Scene(*t) for triples in transfer.values() for t in triples)]
    assert not any(s.shape in left_out for s in every_scene)
    assert all(len(transfer[axis]) == 4 for axis in ("new shape", "new colour", "new background"))
    assert all(sum(s.color == c for s in train) == 2 == sum(s.background == c for s in train) for c in colors)
    new = {axis: [world.Scene(*t) for t in triples] for axis, triples in transfer.items()}
    assert {s.shape for s in new["new shape"] + new["all new"]} == {new_shape}
    assert all(s.shape not in shapes and s.color in colors and s.background in backgrounds for s in new["new shape"])
    assert all(s.shape in shapes and s.color not in colors and s.background in backgrounds for s in new["new colour"])
    assert all(s.shape in shapes and s.color in colors and s.background not in colors for s in new["new background"])
    assert all(s.shape not in shapes and s.color not in colors and s.background not in colors for s in new["all new"])
    assert sum(map(len, transfer.values())) == 14
    assert quality.style_sets("cross") == (quality.STYLE_TRAIN_SCENES, quality.STYLE_TRANSFER)  # the first design


def test_style_trigger_takes_the_place_of_the_first_word():
    """One token where pretraining had the one-token `a`: every later word keeps its position (docs/quality.md)."""
    from world import quality

    scene = world.Scene("circle", "red", "yellow")
    assert quality.STYLE.prompt(scene, "ti+lora") == "<hollow> red circle on a yellow background"
    assert quality.STYLE.prompt(scene, "lora") == "hollow red circle on a yellow background"
    rows = (REPO_ROOT / "sample_data" / "world" / "hollow" / "metadata.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == f"file_name,text,{quality.WORD_COLUMN}" and len(rows) == 13
    assert "caption_column=text_word" in quality.train_overrides(
        "lora", quality.STYLE, Path("b"), Path("d"), Path("o")
    )
    assert not any(
        "caption_column" in o for o in quality.train_overrides("ti", quality.STYLE, Path("b"), Path("d"), Path("o"))
    )
    # the LoRA file is named for what `load_pipeline` reads, even when `--set train_data_dir=` points elsewhere
    assert "output_name=hollow" in quality.train_overrides("lora", quality.STYLE, Path("b"), Path("d"), Path("o"))
    assert not any(
        "output_name" in o for o in quality.train_overrides("ti+lora", quality.STYLE, Path("b"), Path("d"), Path("o"))
    )


def test_adjective_trigger_stands_where_a_size_word_would():
    """`hollow_adjective`: for a base that read `a small red circle ...` (pretrain_world.py --small-per-scene), the
    trigger takes the size word's place, in the prompts, the style set's captions and the composition prompts."""
    from world import quality

    style = quality.concept_by_name("hollow_adjective")
    scene = world.Scene("circle", "red", "yellow", "hollow")
    assert style.prompt(scene, "ti+lora") == "a <hollow> red circle on a yellow background"
    assert style.prompt(scene, "lora") == "a hollow red circle on a yellow background"
    assert world.Scene("circle", "red", "yellow", "small").caption() == "a small red circle on a yellow background"
    rows = (REPO_ROOT / "sample_data" / "world" / "hollow_adjective" / "metadata.csv").read_text("utf-8").splitlines()
    first = quality.STYLE_TRAIN_SCENES[0]
    assert rows[1].split(",")[1:] == [style.prompt(first), style.prompt(first, "lora")] and len(rows) == 13
    identity = quality.concept_by_name("purple_triangle")
    assert quality.composition_scenes(identity, style)[1][0] == "a hollow <ptri> on a red background"
    assert quality.composition_scenes(identity, style, "ti+lora")[1][0] == "a <hollow> <ptri> on a red background"


def test_suffix_trigger_follows_the_whole_caption():
    """`hollow_suffix`: the trigger after the caption, so that the causal text encoder reads every content word as
    it learned it (docs/quality.md), in the prompts, the style set's captions and the composition prompts."""
    from world import quality

    style = quality.concept_by_name("hollow_suffix")
    scene = world.Scene("circle", "red", "yellow", "hollow")
    assert style.prompt(scene, "ti+lora") == "a red circle on a yellow background <hollow>"
    assert style.prompt(scene, "lora") == "a red circle on a yellow background hollow"
    rows = (REPO_ROOT / "sample_data" / "world" / "hollow_suffix" / "metadata.csv").read_text("utf-8").splitlines()
    first = quality.STYLE_TRAIN_SCENES[0]
    assert rows[1].split(",")[1:] == [style.prompt(first), style.prompt(first, "lora")] and len(rows) == 13
    identity = quality.concept_by_name("purple_triangle")
    assert quality.composition_scenes(identity, style)[1][0] == "a <ptri> on a red background hollow"


def test_every_shipped_style_set_is_its_scenes_captioned_in_its_slot():
    """sample_data/world/<style>: one image per style-set scene, drawn in the style (read back so by the metric),
    captioned with the placeholder (`text`) and the plain word (`text_word`) in the style's slot."""
    import csv

    from world import quality

    for style in quality.STYLES:
        folder = REPO_ROOT / "sample_data" / "world" / style.name
        with (folder / "metadata.csv").open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == len(style.train_scenes) == 12
        for row, scene in zip(rows, style.train_scenes, strict=True):
            assert (row["text"], row[quality.WORD_COLUMN]) == (style.prompt(scene), style.prompt(scene, "lora"))
            assert all(world.read_image(Image.open(folder / row["file_name"]).convert("RGB")).matches(scene).values())


def test_pretrain_world_refuses_a_negative_small_count_by_name(capsys):
    import pretrain_world

    with pytest.raises(SystemExit):
        pretrain_world._arguments(["--small-per-scene", "-2"])
    assert "--small-per-scene: -2 is negative; give 0 (off) or a count such as 8" in capsys.readouterr().err
    assert pretrain_world._arguments(["--small-per-scene", "8"]).small_per_scene == 8


def test_pretrain_world_refuses_a_bad_filler_fraction_and_a_folder_without_a_unet(capsys, tmp_path):
    import pretrain_world

    for value in ("1.0", "-0.1"):
        with pytest.raises(SystemExit):
            pretrain_world._arguments(["--filler-fraction", value])
        assert f"--filler-fraction: {float(value)} is outside [0, 1); give e.g. 0.3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain_world._arguments(["--init-from", str(tmp_path)])
    assert f"--init-from: {tmp_path} has no unet/ folder" in capsys.readouterr().err
    assert pretrain_world._arguments(["--filler-fraction", "0.3"]).filler_fraction == 0.3


def test_pretrain_world_refuses_to_continue_from_a_base_of_another_architecture(capsys):
    """`--init-from` a saved base of the other family is refused by name before any work, with the differing
    config entries; a base of the same family is taken."""
    import pretrain_world

    sdxl_base = REPO_ROOT / "sample_data" / "world-sdxl"
    with pytest.raises(SystemExit):
        pretrain_world._arguments(["--family", "sd1", "--init-from", str(sdxl_base)])
    error = capsys.readouterr().err
    assert f"--init-from: {sdxl_base} is not the --family sd1 architecture (" in error
    assert "addition_embed_type: 'text_time' != None" in error
    assert pretrain_world._arguments(["--family", "sdxl", "--init-from", str(sdxl_base)]).init_from == sdxl_base


def test_filler_captions_put_one_unknown_token_where_the_size_word_goes():
    """`--filler-fraction`: the filler is one CLIP token, never a word the benchmarks use as a trigger or one of the
    world's own, only in full captions of flat scenes, at the asked rate; without it the captions (and so every
    shipped base's training stream) are unchanged."""
    import pretrain_world

    from sdtune import models

    tokenizer = models.build_clip_tokenizer("<|endoftext|>")
    fillers = pretrain_world.filler_words(tokenizer)
    assert len(fillers) > 20_000 and not set(fillers) & pretrain_world.FILLER_HELD_OUT
    assert {"hollow", "sks", "red", "circle", "small"} <= pretrain_world.FILLER_HELD_OUT
    sample = random.Random(0).sample(fillers, 200)
    assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in sample)
    scene, small = world.Scene("circle", "red", "blue"), world.Scene("circle", "red", "blue", "small")
    rng = random.Random(0)
    captions = [pretrain_world.caption_for(scene, rng, fillers, 0.3) for _ in range(4000)]
    full = [c.split() for c in captions if c.endswith("red circle on a blue background")]
    with_filler = [words for words in full if len(words) == 8]
    assert all(words[0] == "a" and words[1] in fillers for words in with_filler)
    assert len(full) - len(with_filler) == sum(c == "a red circle on a blue background" for c in captions)
    assert 0.25 < len(with_filler) / len(full) < 0.35  # of the full captions (75% of all)
    assert {pretrain_world.caption_for(small, rng, fillers, 0.9) for _ in range(300)} == {
        "",
        "a small circle on a blue background",
        "a small red circle on a blue background",
    }
    plain, seeded = random.Random(5), random.Random(5)
    assert [pretrain_world.caption_for(scene, plain) for _ in range(50)] == [
        pretrain_world.caption_for(scene, seeded, fillers, 0.0) for _ in range(50)
    ]


def test_small_rendering_is_the_hollow_styles_hole_in_the_objects_colour():
    """The pieces the hollow style is made of: `small` draws the same shape at the hole's size, and a base trained
    on both renderings sees `a small ...` captions for it (pretrain_world.caption_for)."""
    import pretrain_world

    def near(image, color):  # anti-aliased edges: nearer this palette colour than halfway to red or blue
        return np.abs(np.asarray(image, np.float32) - world.COLORS[color]).sum(axis=2) < 150

    hollow = world.render(world.Scene("square", "red", "blue", "hollow"))
    small = world.render(world.Scene("square", "red", "blue", "small"))
    hole = near(hollow, "blue")[8:24, 8:24]  # the centre: the hole is the only blue there
    assert (near(small, "red")[8:24, 8:24] == hole).mean() > 0.97
    assert near(small, "blue")[:8].all() and 20 < hole.sum() < 80
    rng = random.Random(0)
    captions = {pretrain_world.caption_for(world.Scene("square", "red", "blue", "small"), rng) for _ in range(200)}
    assert captions == {"", "a small square on a blue background", "a small red square on a blue background"}
    scenes = [world.Scene(s.shape, s.color, s.background, "small") for s in world.all_scenes()[::7]]
    small = [world.render_jittered(scene, rng) for scene in scenes]  # the base's `small` score reads these right
    assert pretrain_world.small_score(small, scenes) == {"color": 1.0, "background": 1.0, "small": 1.0, "all": 1.0}
    full = [world.render_jittered(world.Scene(s.shape, s.color, s.background), rng) for s in scenes]
    assert pretrain_world.small_score(full, scenes)["small"] == 0.0  # and full-size ones wrong


def test_composition_scores_count_identity_and_style_separately():
    from world import quality

    identity = quality.concept_by_name("purple_triangle")
    scenes, prompts = quality.composition_scenes(identity, quality.STYLE)
    assert prompts[0] == "hollow <ptri> on a red background" and len(scenes) == 7 * 4
    right = [world.render(scene) for scene in scenes]
    flat = [world.render(world.Scene(s.shape, s.color, s.background)) for s in scenes]
    other = [world.render(world.Scene("circle", "purple", s.background, "hollow")) for s in scenes]
    assert quality.composition_scores(right, scenes) == {"both": 1.0, "identity": 1.0, "style": 1.0}
    assert quality.composition_scores(flat, scenes) == {"both": 0.0, "identity": 1.0, "style": 0.0}
    assert quality.composition_scores(other, scenes) == {"both": 0.0, "identity": 0.0, "style": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Candidate style renderings for the VAE check (tools/world_vae_check.py)


def test_vae_check_renderings_draw_what_they_name():
    """Each candidate style puts its colours where docs/quality.md says (the VAE table is only as good as these)."""
    import world_vae_check as check

    scene = world.Scene("square", "red", "blue")
    red, blue, black = (np.array(world.COLORS[c], np.float32) for c in ("red", "blue", "black"))
    flat = check.render(scene, "flat")
    assert np.allclose(flat[16, 16], red, atol=1) and np.allclose(flat[1, 1], blue, atol=1)
    pastel = check.render(scene, "pastel")
    assert np.allclose(pastel[16, 16], red + 0.5 * (255 - red), atol=1)
    frame = check.render(scene, "frame")
    assert np.allclose(frame[1, 16], black) and np.allclose(frame[3, 16], black)
    assert np.allclose(frame[4, 4], blue, atol=2)
    outline = check.render(scene, "outline")  # the square's edge (half side 0.82 * 11.5 ~ 9.4 px) is accent
    assert np.allclose(outline[16, 16], red, atol=1) and np.allclose(outline[16, 16 + 8], black, atol=1)
    ground = check.render(scene, "ground")
    assert np.allclose(ground[30, 1], black) and np.allclose(ground[1, 1], blue) and np.allclose(ground[16, 16], red)
    shade = check.render(scene, "shade")
    assert np.allclose(shade[12, 16], red, atol=1) and np.allclose(shade[20, 16], black, atol=1)
    for style in ("hollow", "small"):  # the world's own renderings
        drawn = np.asarray(world.render(world.Scene(scene.shape, scene.color, scene.background, style)), np.float32)
        assert np.array_equal(check.render(scene, style), drawn)


def test_vae_check_reads_hollow_renders_back_per_shape():
    """With a VAE that returns its input, every hollow render reads back right; the real one loses some crosses."""
    import world_vae_check as check
    from diffusers import AutoencoderKL

    class Identity:
        def encode(self, pixels):
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": pixels})()})()

        def decode(self, latents):
            return type("Out", (), {"sample": latents})()

    assert check.read_back_by_shape(Identity()) == dict.fromkeys(world.PRETRAIN_SHAPES, 1.0)
    vae = AutoencoderKL.from_pretrained(REPO_ROOT / "sample_data" / "world-sd1-sizes", subfolder="vae").eval()
    by_shape = check.read_back_by_shape(vae)
    assert by_shape["circle"] == by_shape["square"] == 1.0 and by_shape["cross"] < 0.8


def test_vae_check_leaves_out_scenes_in_the_accent_colour():
    import world_vae_check as check

    assert len(check.scenes_for("flat")) == len(world.all_scenes()) == 280
    assert all(check.ACCENT not in (s.color, s.background) for s in check.scenes_for("outline"))
    assert len(check.scenes_for("outline")) == 5 * 7 * 6


def test_world_attention_shares_sum_to_one_and_a_trigger_of_a_moves_nothing():
    """tools/world_attention.py, on the shipped world model: the per-token shares and the padding's are the whole
    attention, and `a` in the place of `a` is no trigger at all (the zero the docs' trigger numbers compare with)."""
    import world_attention

    from world import quality

    models = world_attention.load(REPO_ROOT / "sample_data" / "world-sd1")
    tokens, padding = world_attention.attention_shares(models, "hollow red circle on a yellow background")
    assert [token for token, _ in tokens][1:3] == ["hollow</w>", "red</w>"]
    assert sum(share for _, share in tokens) + padding == pytest.approx(1.0, abs=1e-4)
    scenes = quality.STYLE_TRAIN_SCENES[:3]
    none = world_attention.trigger_effect(models, "a", scenes)
    assert none["trigger, own position"] == pytest.approx(0, abs=1e-4) and none["trigger, padding"] == pytest.approx(
        0, abs=1e-3
    )
    assert none["content change, padding"] > 1
    suffix = world_attention.trigger_effect(models, "hollow", scenes, slot="suffix")
    assert "trigger, own position" not in suffix and suffix["trigger, padding"] > 1
    adjective = world_attention.trigger_effect(models, "small", scenes, slot="adjective")
    assert "trigger, own position" not in adjective and adjective["trigger, padding"] > 0


def test_the_sizes_base_reads_a_trigger_after_the_a():
    """`world-sd1-sizes` read `a small red circle ...` in pretraining, so a plain word in that place reaches the
    padding states the UNet attends to (docs/quality.md: 10.5 there against 0.19 in the place of `a`)."""
    import world_attention

    from world import quality

    models = world_attention.load(REPO_ROOT / "sample_data" / "world-sd1-sizes")
    scenes = quality.STYLE_TRAIN_SCENES[:4]
    first = world_attention.trigger_effect(models, "hollow", scenes)["trigger, padding"]
    adjective = world_attention.trigger_effect(models, "hollow", scenes, slot="adjective")["trigger, padding"]
    assert adjective > 5 and adjective > 10 * first


def test_an_unknown_word_after_the_a_garbles_the_colour_words_after_it():
    """Why the adjective trigger's LoRA does not transfer to new colours (docs/quality.md): on `world-sd1-sizes` a
    word the text encoder never learned (`hollow`) where it read `small` breaks the colour words after it, while
    `small` there and the same word after the caption leave them as they were."""
    import world_attention

    from world import quality

    assert world_attention.with_trigger("a red circle on a blue background", "hollow", "adjective") == (
        "a hollow red circle on a blue background"
    )
    pipe = quality.base_pipeline(REPO_ROOT / "sample_data" / "world-sd1-sizes")
    scenes = quality.STYLE_TRAIN_SCENES
    plain = world_attention.content_kept(pipe, None, "adjective", scenes)
    assert plain == {"shape": 1.0, "color": 1.0, "background": 1.0}
    assert world_attention.content_kept(pipe, "hollow", "adjective", scenes)["color"] < 0.6
    assert world_attention.content_kept(pipe, "hollow", "suffix", scenes)["color"] == 1.0
    assert world_attention.content_kept(pipe, "small", "adjective", scenes)["color"] > 0.9


def test_a_base_that_saw_filler_words_reads_an_unknown_word_without_garbling():
    """`world-sd1-words` (`pretrain_world.py --filler-fraction`) saw random words where `small` goes: the trigger it
    never saw (`hollow`) leaves every content word readable and still reaches the padding states, a third of a
    change of content (docs/quality.md, "A base that reads any word")."""
    import world_attention

    from world import quality

    base = REPO_ROOT / "sample_data" / "world-sd1-words"
    scenes = quality.STYLE_TRAIN_SCENES
    kept = world_attention.content_kept(quality.base_pipeline(base), "hollow", "adjective", scenes)
    assert kept == {"shape": 1.0, "color": 1.0, "background": 1.0}
    effect = world_attention.trigger_effect(world_attention.load(base), "hollow", scenes[:4], slot="adjective")
    assert effect["trigger, padding"] > 0.2 * effect["content change, padding"]


def test_style_regularization_images_are_the_style_sets_scenes_drawn_flat(tmp_path):
    """`make_world_concepts.py --style-regularization`: one flat twin per style-set scene, captioned without a
    trigger in both caption columns, and read back by the metric as exactly that scene, flat."""
    import csv

    import make_world_concepts
    from PIL import Image

    from world import quality

    folder = make_world_concepts.write_style_regularization(tmp_path / "reg")
    with open(folder / "metadata.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    scenes = [world.Scene(s.shape, s.color, s.background) for s in quality.STYLE_TRAIN_SCENES]
    assert [row["text"] for row in rows] == [row[quality.WORD_COLUMN] for row in rows] == [s.caption() for s in scenes]
    images = [Image.open(folder / row["file_name"]).convert("RGB") for row in rows]
    assert world.score(images, scenes)["all"] == 1.0
