"""The world metric: ground truth scores 1.0, mismatched targets score chance, small noise changes nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest

import world


@pytest.fixture(scope="module")
def rendered():
    rng = random.Random(0)
    scenes = world.all_scenes(world.ALL_SHAPES)
    return scenes, [world.render_jittered(scene, rng) for scene in scenes]


def test_ground_truth_scores_one(rendered):
    scenes, images = rendered
    assert world.score(images, scenes) == {"shape": 1.0, "color": 1.0, "background": 1.0, "all": 1.0}


def test_mismatched_targets_score_chance(rendered):
    scenes, images = rendered
    shuffled = list(scenes)
    random.Random(1).shuffle(shuffled)
    scores = world.score(images, shuffled)
    assert scores["shape"] < 0.25 and scores["color"] < 0.25 and scores["background"] < 0.25  # chance: 1/7, 1/8
    assert scores["all"] < 0.02


def test_small_noise_and_blur_change_nothing(rendered):
    from PIL import ImageFilter

    scenes, images = rendered
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
