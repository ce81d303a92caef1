"""Textual Inversion: only the new rows train, and the exported file reproduces the trained encoder in diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdtune import models
from sdtune.config import parse_config
from sdtune.methods import textual_inversion as ti
from sdtune.train import fit, setup

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data" / "star"
PROMPT = "a red <star> on a blue background"


@pytest.fixture
def base(tiny_base):
    return models.load_base_model(tiny_base["folder"])


def _encode(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_placeholder_tokens_follow_diffusers_naming():
    assert ti.placeholder_tokens("<star>", 3) == ["<star>", "<star>_1", "<star>_2"]
    assert ti.expand_placeholder(PROMPT, "<star>", 2) == "a red <star> <star>_1 on a blue background"


def test_only_the_new_rows_are_trainable(base):
    table_before = base.text_encoder.get_input_embeddings().weight.clone()
    vectors = ti.attach(base.tokenizer, base.text_encoder, "<star>", 3, "star")
    trainable = [p for p in base.text_encoder.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is vectors and vectors.shape == (3, 32)
    assert base.tokenizer.convert_tokens_to_ids(["<star>", "<star>_1", "<star>_2"]) == [49408, 49409, 49410]
    optimizer = torch.optim.AdamW([vectors], lr=1e-2)
    loss = base.text_encoder(torch.tensor([[49406, 49408, 49409, 49410, 49407]]))[0].square().mean()
    loss.backward()
    optimizer.step()
    layer = base.text_encoder.get_input_embeddings()
    assert torch.equal(layer.base_layer.weight, table_before)  # the 49,408-row table is untouched
    assert layer.base_layer.weight.grad is None


def test_vectors_start_from_the_init_word(base):
    star_id = base.tokenizer("star", add_special_tokens=False).input_ids
    table = base.text_encoder.get_input_embeddings().weight
    vectors = ti.attach(base.tokenizer, base.text_encoder, "<star>", 2, "star")
    assert torch.equal(vectors[0], table[star_id[0]]) and torch.equal(vectors[1], table[star_id[0]])


def test_multi_token_init_word_spreads_over_vectors(base):
    ids = base.tokenizer("toy robot", add_special_tokens=False).input_ids
    table = base.text_encoder.get_input_embeddings()
    start = ti.initial_vectors(base.tokenizer, table, "toy robot", 4)
    expected = [table.weight[ids[i * len(ids) // 4]] for i in range(4)]
    assert len(ids) == 2 and all(torch.equal(start[i], expected[i]) for i in range(4))


def test_existing_words_are_refused_as_placeholders(base):
    errors = ti.check_tokens(base.tokenizer, "cat", 1, "cat")
    assert errors and "'cat' is already a word of the CLIP vocabulary" in errors[0]
    assert ti.check_tokens(base.tokenizer, "<my-cat>", 2, "cat") == []
    with pytest.raises(ValueError, match="already a word"):
        ti.attach(base.tokenizer, base.text_encoder, "dog", 1, "dog")


def test_exported_embedding_reloads_in_diffusers_with_the_trained_output(ti_config_dict, tiny_base):
    from diffusers import StableDiffusionPipeline

    run = setup(parse_config({**ti_config_dict, "learning_rate": 5e-2}))
    initial = run.trainables.embedding[0].detach().clone()
    result = fit(run)
    trained_vectors = run.trainables.embedding[0].detach()
    assert not torch.allclose(trained_vectors, initial)
    with safe_open(str(result.final_path), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        torch.testing.assert_close(handle.get_tensor("emb_params"), trained_vectors, rtol=0, atol=0)
    base = run.base
    trained = _encode(base.tokenizer, base.text_encoder, ti.expand_placeholder(PROMPT, "<star>", 2))

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_base["folder"], safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.load_textual_inversion(str(result.final_path), token="<star>")
    prompt = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)
    assert prompt == "a red <star> <star>_1 on a blue background"
    reloaded = _encode(pipe.tokenizer, pipe.text_encoder, prompt)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)
    untrained_pipe_output = _encode(pipe.tokenizer, pipe.text_encoder, "a red star on a blue background")
    assert not torch.allclose(untrained_pipe_output, trained, atol=1e-3)
