"""Objective and optimizer options: min-SNR weighting, gradient clipping, gradient checkpointing, optional
optimizers, and a non-finite loss that stops training after saving the last good state."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import assert_trained_alike
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from sdtune import diffusion, preflight, state, train
from sdtune.config import ConfigError, parse_config


@pytest.fixture
def lora_dict(ti_config_dict) -> dict:
    raw = {k: v for k, v in ti_config_dict.items() if k not in ("placeholder_token", "init_word", "num_vectors")}
    return {**raw, "method": "lora", "lora_rank": 2, "learning_rate": 1e-2, "save_precision": "fp32", "max_steps": 3}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    timesteps = torch.tensor([0, 100, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(diffusion.min_snr_weights(scheduler, timesteps, 5.0), expected)
    prediction, target = torch.zeros(4, 2, 2, 2), torch.ones(4, 2, 2, 2)
    assert diffusion.denoising_loss(prediction, target, expected).item() == pytest.approx(expected.mean().item())


def test_gradient_clipping_bounds_the_gradient_norm(lora_dict):
    run = train.setup(parse_config({**lora_dict, "max_grad_norm": 1e-3}))
    norms, step = [], run.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in run.trainables.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(*args, **kwargs)

    run.optimizer.step = recording_step
    train.fit(run)
    assert len(norms) == 3 and max(norms) <= 1e-3 * 1.001


def test_gradient_checkpointing_gives_the_same_training(lora_dict, tmp_path):
    plain = train.fit(train.setup(parse_config({**lora_dict, "output_dir": str(tmp_path / "a")})))
    run = train.setup(parse_config({**lora_dict, "output_dir": str(tmp_path / "b"), "gradient_checkpointing": True}))
    assert run.base.unet.is_gradient_checkpointing
    checkpointed = train.fit(run)
    a, b = load_file(str(plain.final_path)), load_file(str(checkpointed.final_path))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def test_min_snr_training_runs_and_changes_the_result(lora_dict, tmp_path):
    plain = train.fit(train.setup(parse_config({**lora_dict, "output_dir": str(tmp_path / "a")})))
    weighted = train.fit(
        train.setup(parse_config({**lora_dict, "output_dir": str(tmp_path / "b"), "min_snr_gamma": 0.1}))
    )
    a, b = load_file(str(plain.final_path)), load_file(str(weighted.final_path))
    assert any(not torch.equal(a[k], b[k]) for k in a) and all(torch.isfinite(v).all() for v in b.values())


def test_a_nan_loss_stops_after_saving_the_last_good_state(lora_dict, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = train.setup(parse_config({**lora_dict, "max_steps": 6, "output_dir": str(out)}))
    real_loss, calls, kept = train._loss, {"n": 0}, {}

    def loss_that_breaks(batch, run_, captions):
        calls["n"] += 1
        if calls["n"] == 3:
            kept.update({f"unet.{i}": p.detach().clone() for i, p in enumerate(run_.trainables.unet)})
            return real_loss(batch, run_, captions) * float("nan")  # in the graph, as a diverged loss is
        return real_loss(batch, run_, captions)

    monkeypatch.setattr(train, "_loss", loss_that_breaks)
    with pytest.raises(train.TrainingStopped) as stopped:
        train.fit(run)
    message = str(stopped.value)
    assert message.startswith("step 3: the loss is nan, so training stopped before it reached the weights")
    assert "the last good state (step 2) is in" in message and "max_grad_norm: 1.0" in message
    (folder,) = state.list_states(out)
    saved = load_file(str(folder / "trainable.safetensors"))
    assert all(torch.equal(saved[key], kept[key]) for key in kept)
    assert all(torch.equal(p.detach(), kept[f"unet.{i}"]) for i, p in enumerate(run.trainables.unet))
    assert all(p.grad is None for p in run.trainables.unet)  # the NaN gradients of its backward pass are dropped


def test_optional_optimizers_need_their_package(lora_dict):
    config = parse_config({**lora_dict, "optimizer_type": "adamw8bit"})
    with pytest.raises(ConfigError, match="optimizer_type: adamw8bit needs bitsandbytes: pip install bitsandbytes"):
        preflight.preflight(config)
    with pytest.raises(ConfigError, match="optimizer_type: 'adam8bit' is not one of"):
        parse_config({**lora_dict, "optimizer_type": "adam8bit"})


def test_gradient_accumulation_equals_the_larger_batch(lora_dict, tmp_path):
    """Every random draw is keyed by (seed, epoch, example), so a batch of 4 and two accumulated batches of 2 see the
    same examples with the same crops, noise and timesteps: the real objective, no patching."""
    from PIL import Image

    folder = tmp_path / "four"
    folder.mkdir()
    for index, color in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (32, 32), color).save(folder / f"{index}.png")
    (folder / "metadata.csv").write_text(
        "file_name,text\n0.png,a red square\n1.png,a green one\n2.png,blue\n3.png,white thing\n", encoding="utf-8"
    )
    raw = {**lora_dict, "train_data_dir": str(folder), "max_steps": 4, "random_flip": True, "noise_offset": 0.1}
    big = train.fit(train.setup(parse_config({**raw, "batch_size": 4, "output_dir": str(tmp_path / "big")})))
    accumulated = train.fit(
        train.setup(
            parse_config(
                {**raw, "batch_size": 2, "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "acc")}
            )
        )
    )
    a, b = load_file(str(big.final_path)), load_file(str(accumulated.final_path))
    # Adam divides by sqrt(v): float noise in a near-zero gradient can move a single entry by up to one step (lr);
    # everything else agrees to float precision
    assert_trained_alike(a, b, atol=5e-4, rtol=1e-3, step_size=raw["learning_rate"], steps=4)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_up" in k)  # it trained


def test_clip_skip_counts_as_kohya_and_a1111_and_reaches_generation(tiny_base):
    from sdtune import inference, models

    base = models.load_base_model(tiny_base["folder"])
    prompt = ["a red star on a blue background"]
    ids = base.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = models.encode_prompts(base.family, base.components, prompt, "cpu", clip_skip=2)
        hidden = base.text_encoder(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(ours, base.text_encoder.final_layer_norm(hidden[-2]))  # penultimate + final norm
        last = models.encode_prompts(base.family, base.components, prompt, "cpu")
        torch.testing.assert_close(last, base.text_encoder(ids)[0])
    pipe = inference.AdapterPipeline(base)
    images = [pipe.generate(prompt, [3], steps=2, width=32, height=32, clip_skip=c)[0] for c in (1, 2, 1)]
    assert images[0].tobytes() == images[2].tobytes() != images[1].tobytes()


def test_clip_skip_is_recorded_in_the_lora_header(lora_dict, tmp_path):
    from safetensors import safe_open

    result = train.fit(train.setup(parse_config({**lora_dict, "clip_skip": 2, "output_dir": str(tmp_path / "o")})))
    with safe_open(str(result.final_path), "pt") as handle:
        assert handle.metadata()["ss_clip_skip"] == "2"


def test_forced_v_prediction_trains_toward_the_velocity_and_is_recorded(lora_dict, tmp_path, monkeypatch):
    run = train.setup(parse_config({**lora_dict, "prediction_type": "v_prediction"}))
    assert run.noise_scheduler.config.prediction_type == "v_prediction"  # the tiny base itself is epsilon
    seen = {}
    original = diffusion.training_target

    def spy(scheduler, latents, noise, timesteps):
        seen["target"] = original(scheduler, latents, noise, timesteps)
        seen["velocity"] = scheduler.get_velocity(latents, noise, timesteps)
        return seen["target"]

    monkeypatch.setattr(diffusion, "training_target", spy)
    result = train.fit(run)
    torch.testing.assert_close(seen["target"], seen["velocity"])
    from safetensors import safe_open

    with safe_open(str(result.final_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v" and metadata["sdtune.prediction_type"] == "v_prediction"


def test_kohya_attention_and_v_flags_point_to_their_settings(lora_dict):
    with pytest.raises(ConfigError) as error:
        parse_config({**lora_dict, "v_parameterization": True, "mem_eff_attn": True})
    assert "v_parameterization: not a key here; use prediction_type: v_prediction." in str(error.value)
    assert "mem_eff_attn: not a key here; use xformers: true." in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_without_the_package_is_refused_before_loading(lora_dict, monkeypatch):
    from sdtune import models

    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(
        ConfigError, match=r"xformers: true needs the xformers package: pip install 'sdtune\[xformers\]'"
    ):
        train.setup(parse_config({**lora_dict, "xformers": True}))
