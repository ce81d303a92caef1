"""Learning, not only running: personalizing the shipped world models moves the world metric the right way.

A reduced budget of the quality benchmark (`tools/quality_bench.py`, `docs/quality.md`): the same configs, the same
`sdtune train` path, the outputs loaded by diffusers' own loaders and scored by the world metric (`tools/world`).
The SDXL world model is scored through `StableDiffusionXLPipeline`, which encodes the prompts itself: a difference
between how sdtune conditions SDXL in training and how the pipeline does at inference would fail these tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_ROOT

from sdtune.config import load_config
from sdtune.train import train
from world import quality

WORLD_MODEL = REPO_ROOT / "sample_data" / "world-sd1"
WORLD_SDXL = REPO_ROOT / "sample_data" / "world-sdxl"
CONCEPT_DATA = REPO_ROOT / "sample_data" / "world"


@pytest.fixture(scope="module")
def untrained() -> dict:
    """The base model's scores on both concepts, before any training."""
    pipe = quality.load_pipeline(WORLD_MODEL, None, quality.CONCEPTS[0], None)
    scores = {concept.name: quality.measure(pipe, concept, prior=False)[0] for concept in quality.CONCEPTS}
    return {**scores, "prior": quality.prior_score(pipe)}


def _trained_scores(method: str, concept_name: str, steps: int, tmp_path, prior: bool, base=WORLD_MODEL) -> dict:
    concept = quality.concept_by_name(concept_name)
    config_path = REPO_ROOT / "configs" / f"world_{method.replace('+', '_')}.yaml"
    overrides = quality.train_overrides(method, concept, base, CONCEPT_DATA, tmp_path, steps)
    torch.manual_seed(0)
    train(load_config(config_path, overrides))
    return quality.measure(quality.load_pipeline(base, tmp_path, concept, method), concept, prior=prior)[0]


def test_the_base_model_draws_its_world_but_not_the_concepts(untrained):
    # 48 held-in and 28 unseen (shape, colour, background) prompts: the shipped model composes what it learned
    assert untrained["prior"] >= 0.95
    assert untrained["red_star"]["fidelity"] == 0.0  # it never saw a star
    assert untrained["purple_triangle"]["fidelity"] <= 0.3  # "<ptri>" means nothing to it yet


def test_lora_learns_a_shape_the_base_never_saw(untrained, tmp_path):
    scores = _trained_scores("lora", "red_star", 500, tmp_path, prior=False)
    assert scores["fidelity"] >= untrained["red_star"]["fidelity"] + 0.3


def test_textual_inversion_learns_an_in_span_concept_and_leaves_the_base_intact(untrained, tmp_path):
    scores = _trained_scores("ti", "purple_triangle", 200, tmp_path, prior=True)
    assert scores["fidelity"] >= untrained["purple_triangle"]["fidelity"] + 0.3
    assert scores["prior"] == untrained["prior"]  # same images: TI changes no base weight


@pytest.fixture(scope="module")
def untrained_sdxl() -> dict:
    """The SDXL world model's scores on the in-span concept and the base prompts, before any training."""
    from diffusers import StableDiffusionXLPipeline

    concept = quality.concept_by_name("purple_triangle")
    pipe = quality.load_pipeline(WORLD_SDXL, None, concept, None)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return {"purple_triangle": quality.measure(pipe, concept, prior=False)[0], "prior": quality.prior_score(pipe)}


def test_the_sdxl_world_model_draws_its_world_through_the_sdxl_pipeline(untrained_sdxl):
    assert untrained_sdxl["prior"] >= 0.9  # pretrained with the conditioning the pipeline computes
    assert untrained_sdxl["purple_triangle"]["fidelity"] <= 0.3


def test_sdxl_textual_inversion_learns_through_both_encoders_and_the_pooled_embedding(untrained_sdxl, tmp_path):
    """TI on SDXL trains the placeholder in both text encoders; the second one's vector also reaches the UNet through
    the pooled embedding. diffusers loads the file with one call per encoder and encodes the prompt itself."""
    scores = _trained_scores("ti", "purple_triangle", 200, tmp_path, prior=True, base=WORLD_SDXL)
    assert scores["fidelity"] >= untrained_sdxl["purple_triangle"]["fidelity"] + 0.3
    assert scores["prior"] == untrained_sdxl["prior"]  # same images: TI changes no base weight
