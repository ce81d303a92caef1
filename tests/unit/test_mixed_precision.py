"""Mixed precision on CPU: frozen weights stored in half precision, trainable parameters in float32, finite losses,
files that load; the text encoder stays float32 while it trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdtune import preflight, train
from sdtune.config import parse_config

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture
def lora_dict(ti_config_dict) -> dict:
    raw = {k: v for k, v in ti_config_dict.items() if k not in ("placeholder_token", "init_word", "num_vectors")}
    return {**raw, "method": "lora", "lora_rank": 2, "learning_rate": 1e-2, "save_precision": "fp32", "max_steps": 3}


@pytest.mark.parametrize(
    "precision",
    ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA"))],
)
def test_half_precision_training_keeps_trainables_in_float32(lora_dict, precision):
    run = train.setup(parse_config({**lora_dict, "mixed_precision": precision, "train_text_encoder": False}))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert run.base.unet.conv_in.weight.dtype == half and run.base.text_encoder.dtype == half
    assert run.base.vae.dtype == half
    assert all(p.dtype == torch.float32 for p in run.trainables.parameters())
    result = train.fit(run)
    assert torch.isfinite(torch.tensor(result.last_loss))
    factors = load_file(str(result.final_path))
    assert all(torch.isfinite(v).all() for v in factors.values())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in factors.items() if "lora_up" in k)


def test_text_encoder_training_and_no_half_vae_keep_float32(ti_config_dict):
    run = train.setup(parse_config({**ti_config_dict, "mixed_precision": "bf16", "no_half_vae": True, "max_steps": 2}))
    assert run.base.unet.dtype == torch.bfloat16
    assert run.base.text_encoder.dtype == torch.float32 and run.base.vae.dtype == torch.float32
    assert run.trainables.embedding[0].dtype == torch.float32
    assert torch.isfinite(torch.tensor(train.fit(run).last_loss))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fp16_without_a_gpu_is_refused_before_loading(lora_dict):
    from sdtune.config import ConfigError

    with pytest.raises(ConfigError, match="mixed_precision: fp16 needs a CUDA GPU"):
        preflight.preflight(parse_config({**lora_dict, "mixed_precision": "fp16"}))
