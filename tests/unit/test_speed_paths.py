"""Speed paths of the training step: what they may change and what they must not (token ids tokenized once,
torch.compile within float tolerance of eager, TF32 only where it means something)."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_DATA
from safetensors.torch import load_file

from sdtune import models, preflight
from sdtune.config import ConfigError, parse_config
from sdtune.train import train


def _lora(tiny_base, tmp_path, **changes) -> dict:
    return {
        "method": "lora", "base_model": str(tiny_base["folder"]), "train_data_dir": str(SAMPLE_DATA),
        "resolution": 32, "batch_size": 2, "max_steps": 3, "lora_rank": 2, "learning_rate": 1e-2,
        "save_precision": "fp32", "output_dir": str(tmp_path / "out"), "seed": 3, **changes,
    }  # fmt: skip


def test_token_ids_are_tokenized_once_per_caption(tiny_base):
    base = models.load_base_model(tiny_base["folder"])
    parts, calls = dict(base.components), []
    tokenizer = parts["tokenizer"]

    def counting(prompts, **kwargs):
        calls.append(list(prompts))
        return tokenizer(prompts, **kwargs)

    counting.model_max_length = tokenizer.model_max_length
    parts["tokenizer"] = counting
    cache: dict = {}
    prompts = ["a star", "a blue star", "a star"]
    first = models.token_ids(base.family, parts, prompts, "cpu", cache)
    again = models.token_ids(base.family, parts, ["a blue star", "a star"], "cpu", cache)
    plain = models.token_ids(base.family, base.components, prompts, "cpu")
    assert calls == [["a star", "a blue star"]]  # each distinct caption once, nothing on the second call
    assert torch.equal(first["text_encoder"], plain["text_encoder"])
    assert torch.equal(again["text_encoder"], plain["text_encoder"][[1, 0]])


def test_torch_compile_trains_what_eager_trains(tiny_base, tmp_path):
    eager = train(parse_config(_lora(tiny_base, tmp_path / "eager")))
    compiled = train(parse_config(_lora(tiny_base, tmp_path / "compiled", torch_compile=True)))
    expected, got = load_file(str(eager.final_path)), load_file(str(compiled.final_path))
    assert expected.keys() == got.keys()  # compiled in place: the same module names in the file
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-2, atol=5e-4)  # fused kernels round otherwise
    assert compiled.last_loss == pytest.approx(eager.last_loss, rel=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_tf32_needs_cuda(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="tf32: true needs a CUDA GPU"):
        preflight.preflight(preflight.resolved(parse_config(_lora(tiny_base, tmp_path, tf32=True))))
