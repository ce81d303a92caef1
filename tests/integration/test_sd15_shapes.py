"""TI on a random-weight model with SD1.5's real shapes, read from a single-file checkpoint (about a minute on CPU).

The output must be what A1111 and ComfyUI load for an SD1.x model: one float32 tensor of width 768.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from client_rules import a1111_embedding_vectors, comfyui_embedding_vectors
from sdtune import models
from sdtune.config import parse_config
from sdtune.train import train

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ti_on_sd15_shaped_single_file_loads_in_a1111_and_comfyui_at_width_768(tmp_path):
    checkpoint = tmp_path / "v1-5-random.safetensors"
    models.write_base_model(None, checkpoint, preset="sd15", seed=1, dtype=torch.float16)
    shapes, metadata = models.read_checkpoint_header(checkpoint)
    assert models.EMBEDDED_CONFIG_KEY not in metadata  # read through the shipped SD1.5 config, like a real file
    assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)

    config = parse_config(
        {
            "method": "ti",
            "base_model": str(checkpoint),
            "train_data_dir": str(REPO_ROOT / "sample_data" / "star"),
            "placeholder_token": "<star>",
            "init_word": "star",
            "num_vectors": 2,
            "resolution": 64,
            "max_steps": 1,
            "output_dir": str(tmp_path / "out"),
            "output_name": "star",
        }
    )
    result = train(config)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.last_loss))
    with safe_open(str(result.final_path), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        vectors = handle.get_tensor("emb_params")
        assert handle.metadata()["sdtune.text_encoder_width"] == "768"
    assert vectors.shape == (2, 768) and vectors.dtype == torch.float32
    torch.testing.assert_close(a1111_embedding_vectors(result.final_path, expected_width=768), vectors)
    torch.testing.assert_close(comfyui_embedding_vectors(result.final_path, embedding_size=768), vectors)
    # Both clients refuse it for a model of another width (SD2.x: 1024), as they should.
    assert a1111_embedding_vectors(result.final_path, expected_width=1024) is None
    assert comfyui_embedding_vectors(result.final_path, embedding_size=1024) is None
