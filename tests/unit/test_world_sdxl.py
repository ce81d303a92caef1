"""The SDXL world model's conditioning: the pretraining script conditions the UNet exactly as diffusers'
`StableDiffusionXLPipeline` does at inference, and the world is scored with the pipeline's own prompt encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune import families, inference, models


@pytest.fixture(scope="module")
def xl_run():
    import pretrain_world

    args = pretrain_world._arguments(["--family", "sdxl", "--lr", "1e-3"])  # every option at its default
    return pretrain_world.DenoiserRun((torch.zeros(1, 4, 16, 16), torch.ones(1, 4, 16, 16)), [], 1.0, args)


def _pipeline(run):
    import pretrain_world
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_config(pretrain_world.VAE_CONFIG)
    components = {**run.tokenizers, **run.text_encoders, "unet": run.unet, "vae": vae}
    pipe = inference.pipeline_from_components(
        families.SDXL, components, models.preset_configs("tiny-sdxl")["scheduler"]
    )
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return pipe


def test_sdxl_pretraining_conditions_the_unet_as_the_pipeline_does(xl_run):
    caption = "a red circle on a blue background"
    with torch.no_grad():
        states, extra = xl_run.conditioning([caption, ""])
        pipe = _pipeline(xl_run)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(caption, device="cpu")
        time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=16)
    assert states.shape == (2, 77, 32) and extra["added_cond_kwargs"]["text_embeds"].shape == (2, 16)
    torch.testing.assert_close(states[0], embeds[0], rtol=0, atol=1e-6)  # batch of 2 vs 1: rounding
    torch.testing.assert_close(extra["added_cond_kwargs"]["text_embeds"][0], pooled[0], rtol=0, atol=1e-6)
    # an empty caption is the unconditional branch, which the pipeline fills with zeros (force_zeros_for_empty_prompt)
    assert pipe.config.force_zeros_for_empty_prompt and not negative.any() and not negative_pooled.any()
    assert not states[1].any() and not extra["added_cond_kwargs"]["text_embeds"][1].any()
    torch.testing.assert_close(extra["added_cond_kwargs"]["time_ids"], time_ids.repeat(2, 1), rtol=0, atol=0)


def test_the_pipeline_encodes_plain_prompts_as_sdtune_does(tiny_sdxl):
    """Without placeholder tokens, sdtune's SDXL prompt encoding (what training computes) and the pipeline's own give
    the same images: the benchmark's pipeline-encoded scores measure the same conditioning training used."""
    base = models.load_base_model(tiny_sdxl["folder"])
    pipe = inference.pipeline_from_components(base.family, base.components, base.scheduler_config)
    prompts, seeds = ["a red star on a blue background", "a cat"], [1, 2]
    ours = inference.generate_images(pipe, base.family, prompts, seeds, (32, 32), steps=3, guidance=3.0)
    theirs = inference.generate_images(
        pipe, base.family, prompts, seeds, (32, 32), steps=3, guidance=3.0, pipeline_encodes=True
    )
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    with pytest.raises(ValueError, match="pipeline_encodes: the pipeline encodes at clip_skip 1 only"):
        inference.generate_images(pipe, base.family, prompts, seeds, (32, 32), clip_skip=2, pipeline_encodes=True)
