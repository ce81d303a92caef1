"""SD2.x on tiny in-code models (512-base style and 768-v style): the OpenCLIP-H single-file layout, TI, LoRA, LoCon,
TI+LoRA and continuing from a LoRA reloaded through diffusers' own loaders, kohya's SD2 metadata, each route to the
prediction type, stacking on SD2 bases, and the cross-family gates."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from adapters_factory import a1111_embedding, apply_reference, kohya_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import compat, families, formats, models, preflight
from sdtune.config import parse_config
from sdtune.train import fit, setup, train

PROMPT = "a red <star> on a blue background"


@pytest.fixture
def sd2_dict(tiny_sd2, tmp_path) -> dict:
    """A small LoRA config on the tiny SD2 512-base single file (fp32 saves, so reloads compare exactly)."""
    from conftest import SAMPLE_DATA

    return {
        "method": "lora", "base_model": str(tiny_sd2["checkpoint"]), "train_data_dir": str(SAMPLE_DATA),
        "resolution": 32, "batch_size": 2, "max_steps": 3, "learning_rate": 5e-2, "lora_rank": 4, "lora_alpha": 2,
        "save_precision": "fp32", "output_dir": str(tmp_path / "out"), "seed": 3,
    }  # fmt: skip


def _outputs(parts: dict, unet, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, UNet prediction) of a prompt, with fixed latents."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = models.encode_prompts(families.SD2, parts, [text], "cpu")
        return context, unet(latents, torch.tensor([321]), context).sample


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def test_the_single_file_holds_openclip_h_as_released_and_loads_as_the_folder(tiny_sd2):
    folder, single = models.load_base_model(tiny_sd2["folder"]), models.load_base_model(tiny_sd2["checkpoint"])
    assert folder.family is single.family is families.SD2 and single.prediction_type == "epsilon"
    for name in ("unet", "vae", "text_encoder"):
        a, b = folder.components[name].state_dict(), single.components[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    tensors = load_file(str(tiny_sd2["checkpoint"]))
    prefix = "cond_stage_model.model.transformer.resblocks."
    assert {int(k[len(prefix) :].split(".")[0]) for k in tensors if k.startswith(prefix)} == set(range(6))
    for key in [k for k in tensors if k.startswith(prefix + "4.")]:  # the layer the model does not run: kohya's copy
        assert torch.equal(tensors[key.replace(".4.", ".5.", 1)], tensors[key])
    assert torch.equal(tensors["cond_stage_model.model.text_projection"], torch.eye(48))
    q_weight = single.text_encoder.state_dict()["encoder.layers.2.self_attn.q_proj.weight"]
    assert torch.equal(tensors[prefix + "2.attn.in_proj_weight"][:48], q_weight)
    ids = single.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[3:5] == [49407, 0]  # OpenCLIP's tokenizer pads with "!" (id 0)
    tokens = single.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    context = models.encode_prompts(single.family, single.components, ["a cat"], "cpu")
    hidden = single.text_encoder(tokens, output_hidden_states=True).hidden_states[-1]  # the 23rd = LDM's penultimate
    torch.testing.assert_close(context, single.text_encoder.final_layer_norm(hidden), rtol=0, atol=0)


@pytest.mark.parametrize(
    "variant",
    [{}, {"conv_rank": 2, "conv_alpha": 1, "train_text_encoder": False}, {"method": "ti+lora", "v": True}],
    ids=["unet-te", "locon", "ti+lora-768v"],
)
def test_exported_sd2_lora_reloads_in_diffusers_with_the_trained_outputs(sd2_dict, tiny_sd2, variant):
    raw = {**sd2_dict, **{k: v for k, v in variant.items() if k != "v"}}
    if variant.get("v"):
        raw["base_model"] = str(tiny_sd2["v_checkpoint"])
    if raw["method"] == "ti+lora":
        raw |= {"placeholder_token": "<star>", "init_word": "star"}
    run = setup(parse_config(raw))
    result = fit(run)
    text = PROMPT if "placeholder_token" in raw else PROMPT.replace("<star>", "star")
    trained = _outputs(run.base.components, run.base.unet, text)
    pipe = _pipe(tiny_sd2["v_folder" if variant.get("v") else "folder"])
    pipe.load_lora_weights(str(result.final_path))
    if "placeholder_token" in raw:
        pipe.load_textual_inversion(str(result.final_path.with_name("star.safetensors")), token="<star>")
        text = pipe.maybe_convert_prompt(text, pipe.tokenizer)
    reloaded = _outputs(pipe.components, pipe.unet, text)
    for ours, theirs in zip(trained, reloaded, strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    keys = load_file(str(result.final_path)).keys()
    assert {key.split("_")[1] for key in keys} == (
        {"unet"} if raw.get("train_text_encoder") is False else {"unet", "te"}
    )
    assert not any("input_blocks" in key or "output_blocks" in key for key in keys)  # diffusers names, as kohya's SD2
    if raw.get("train_text_encoder") is not False:  # all of q, k, v, out in every layer (A1111's OpenCLIP rule)
        attention = {k.split(".")[0].rsplit("_", 2)[-2] for k in keys if "self_attn" in k and "layers_3_" in k}
        assert attention == {"q", "k", "v", "out"}


def test_sd2_files_carry_kohyas_and_modelspec_values_for_each_release(sd2_dict, tiny_sd2, tmp_path):
    for release, base, version, architecture, spec in (
        ("512", tiny_sd2["checkpoint"], "sd_v2", "stable-diffusion-v2-512", "epsilon"),
        ("768", tiny_sd2["v_checkpoint"], "sd_v2_v", "stable-diffusion-v2-768-v", "v"),
    ):
        raw = {**sd2_dict, "base_model": str(base), "output_dir": str(tmp_path / release), "max_steps": 1}
        result = train(parse_config({**raw, "method": "ti+lora", "placeholder_token": "<star>", "init_word": "star"}))
        with safe_open(str(result.final_path), "pt") as handle:
            lora_metadata = handle.metadata()
        with safe_open(str(result.final_path.with_name("star.safetensors")), "pt") as handle:
            assert {key: handle.get_tensor(key).shape for key in handle.keys()} == {"emb_params": (1, 48)}  # noqa: SIM118
            embedding_metadata = handle.metadata()
        expected = {
            "ss_base_model_version": version, "ss_v2": "True", "ss_v_parameterization": str(spec == "v"),
            "modelspec.architecture": f"{architecture}/lora", "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": spec, "sdtune.model_family": "sd2", "sdtune.text_encoder_width": "48",
        }  # fmt: skip
        assert {key: lora_metadata.get(key) for key in expected} == expected
        assert embedding_metadata["modelspec.architecture"] == f"{architecture}/textual-inversion"
        assert embedding_metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
        assert formats.read_artifact(result.final_path).family == "sd2"


def test_continuing_from_an_sd2_lora_starts_where_it_is(sd2_dict, tmp_path):
    from sdtune.methods import lora

    first = train(parse_config(sd2_dict))
    tensors = load_file(str(first.final_path))
    raw = {k: v for k, v in sd2_dict.items() if k not in ("lora_rank", "lora_alpha")}
    run = setup(parse_config({**raw, "network_weights": str(first.final_path), "output_dir": str(tmp_path / "c")}))
    continued = lora.extract(run.base.family, run.base.adaptable())
    assert continued.keys() == {k.partition(".")[0] for k in tensors}
    for name, module in continued.items():
        torch.testing.assert_close(module.up, tensors[name + ".lora_up.weight"], rtol=0, atol=0)
        torch.testing.assert_close(module.down, tensors[name + ".lora_down.weight"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The prediction type: said by the file or what comes with it, set by the user, or probed with a warning


def _unstated_copy(source, target, output_bias: float | None = None):
    """A copy of a tiny single file whose recorded config does not say what it predicts; with `output_bias`, its UNet
    answers every input with that constant (conv_out weights zero), imitating at t=999 an epsilon model (0.5: its
    input back, the noise) or a v model (-1: minus the clean image)."""
    tensors, metadata = formats.read_safetensors(source)
    configs = json.loads(metadata[models.EMBEDDED_CONFIG_KEY])
    del configs["scheduler"]["prediction_type"]
    metadata[models.EMBEDDED_CONFIG_KEY] = json.dumps(configs)
    if output_bias is not None:
        tensors["model.diffusion_model.out.2.weight"] = torch.zeros_like(tensors["model.diffusion_model.out.2.weight"])
        tensors["model.diffusion_model.out.2.bias"] = torch.full_like(
            tensors["model.diffusion_model.out.2.bias"], output_bias
        )
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.mark.parametrize(("bias", "expected", "native"), [(0.5, "epsilon", 512), (-1.0, "v_prediction", 768)])
def test_a_file_that_says_nothing_is_probed_as_a1111_probes_with_a_warning(
    tiny_sd2, sd2_dict, tmp_path, caplog, bias, expected, native
):
    path = _unstated_copy(tiny_sd2["checkpoint"], tmp_path / f"unstated{bias}.safetensors", bias)
    with caplog.at_level(logging.WARNING, logger="sdtune.models"):
        base = models.load_base_model(path)
        assert models.prediction_type_of(path) == expected  # probed once per file
    assert base.prediction_type == expected
    warnings = [record.getMessage() for record in caplog.records]
    assert (
        len(warnings) == 1 and f"does not say whether it predicts epsilon or v (no unstated{bias}.yaml" in warnings[0]
    )
    assert f"it is taken as {expected} (sdtune's shipped sd2" in warnings[0] and "set prediction_type:" in warnings[0]
    config = preflight.resolved(
        parse_config({**{k: v for k, v in sd2_dict.items() if k != "resolution"}, "base_model": str(path)})
    )
    assert config.resolution == native  # 768-v's native size follows


def test_the_probe_reads_the_unet_as_a1111_does(tiny_sd2):
    unet = models.load_base_model(tiny_sd2["folder"]).unet
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        for value, expected in ((0.5, "epsilon"), (-0.4, "epsilon"), (-0.6, "v_prediction")):
            unet.conv_out.bias.fill_(value)  # output - input = value - 0.5; v below -1
            assert models.probe_prediction_type(unet) == expected


def test_a_yaml_beside_the_file_decides_as_in_a1111(tiny_sd2, tmp_path, caplog):
    path = _unstated_copy(tiny_sd2["checkpoint"], tmp_path / "model.safetensors")
    beside = tmp_path / "model.yaml"
    beside.write_text(yaml.safe_dump({"model": {"params": {"parameterization": "v", "linear_start": 0.00085}}}))
    with caplog.at_level(logging.WARNING, logger="sdtune.models"):
        assert models.load_base_model(path).prediction_type == "v_prediction"
        beside.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion"}}))
        assert models.prediction_type_of(path) == "epsilon"  # LDM's default parameterization
    assert caplog.records == []  # the yaml says it: nothing probed, nothing to warn about
    beside.write_text(yaml.safe_dump({"model": {"params": {"parameterization": "x0"}}}))
    with pytest.raises(models.ModelError, match="model.yaml: model.params.parameterization is 'x0'; sdtune trains"):
        models.prediction_type_of(path)
    beside.write_text("model: [unclosed")
    with pytest.raises(models.ModelError, match="model.yaml: could not be read as the model's yaml"):
        models.load_base_model(path)
    with caplog.at_level(logging.WARNING, logger="sdtune.models"):
        assert models.prediction_type_of(path, "v_prediction") == "v_prediction"  # the config key still decides
    assert "prediction_type: v_prediction is used; " in caplog.records[-1].getMessage()


def test_the_config_key_decides_and_says_what_it_overrides(tiny_sd2, sd2_dict, tmp_path, caplog):
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    path = _unstated_copy(tiny_sd2["checkpoint"], tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="sdtune.models"):
        run = setup(parse_config({**sd2_dict, "base_model": str(path), "prediction_type": "epsilon"}))
    assert run.noise_scheduler.config.prediction_type == "epsilon"
    assert [r.getMessage() for r in caplog.records] == [
        f"prediction_type: epsilon overrides {tmp_path / 'model.yaml'}, which says v_prediction"
    ]
    assert models.prediction_type_of(tiny_sd2["v_folder"]) == "v_prediction"  # a folder's scheduler config
    assert models.load_base_model(tiny_sd2["v_checkpoint"]).scheduler_config["_class_name"] == "DDIMScheduler"


# ---------------------------------------------------------------------------------------------------------------
# Inference: stacking on SD2 bases, the gates, inspect


def test_two_loras_and_an_embedding_stack_on_sd2_as_the_formula_says(tiny_sd2, tmp_path):
    from sdtune.inference import AdapterPipeline

    base = models.load_base_model(tiny_sd2["folder"])
    factors_a = kohya_lora(base, tmp_path / "a.safetensors", seed=1, metadata={"ss_base_model_version": "sd_v2"})
    factors_b = kohya_lora(base, tmp_path / "b.safetensors", seed=2, alpha=2.0)
    vectors = torch.randn(2, 48, generator=torch.Generator().manual_seed(3))
    a1111_embedding(tmp_path / "myemb.pt", vectors)
    pipe = AdapterPipeline.from_base(tiny_sd2["checkpoint"])
    pipe.add_lora(tmp_path / "a.safetensors", weight=0.7)
    pipe.add_lora(tmp_path / "b.safetensors", text_encoder_weight=-0.4, unet_weight=1.3)
    pipe.add_embedding(tmp_path / "myemb.pt")
    pipe.apply()
    unet, text_encoder = apply_reference(base, [(factors_a, 0.7, 0.7), (factors_b, -0.4, 1.3)])
    ids = pipe.pipe.tokenizer("a photo", padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    with torch.no_grad():
        for model, encoder in ((pipe.pipe.unet, pipe.pipe.text_encoder), (unet, text_encoder)):
            context = encoder(ids).last_hidden_state
            outputs.append((context, model(latents, torch.tensor([500]), context).sample))
    for got, want in zip(*outputs, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    embedded = pipe.pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(embedded[pipe.pipe.tokenizer.convert_tokens_to_ids(["myemb", "myemb_1"])], vectors)


def test_other_families_files_are_refused_on_sd2_and_sd2_files_elsewhere(sd2_dict, tiny_sd2, tiny_base, tmp_path):
    from sdtune.inference import AdapterPipeline

    sd1 = models.load_base_model(tiny_base["folder"])
    pipe = AdapterPipeline.from_base(tiny_sd2["checkpoint"])
    sd1_lora = tmp_path / "sd1.safetensors"
    kohya_lora(sd1, sd1_lora, seed=1, metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(
        compat.IncompatibleArtifactError, match="made for Stable Diffusion 1.x, the base is Stable Diff"
    ):
        pipe.add_lora(sd1_lora)
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "sd1emb.safetensors"))
    with pytest.raises(compat.IncompatibleArtifactError, match="embedding width 32, the base's text encoder takes 48"):
        pipe.add_embedding(tmp_path / "sd1emb.safetensors")
    assert (
        pipe.adapters == {} and not pipe.pipe.get_list_adapters() and "sd1emb" not in pipe.pipe.tokenizer.get_vocab()
    )
    result = train(parse_config({**sd2_dict, "max_steps": 1}))
    refused = compat.check_fit(formats.read_artifact(result.final_path), sd1).blocking
    assert refused[0] == "made for Stable Diffusion 2.x, the base is Stable Diffusion 1.x"
    on_768 = compat.check_fit(
        formats.read_artifact(result.final_path), models.load_base_model(tiny_sd2["v_checkpoint"])
    )
    assert not on_768.blocking and any(
        "made on a model predicting epsilon (sdtune.prediction_type), this base predicts v_prediction" in p
        for p in on_768.other_base
    )


def test_inspect_names_sd2_files_and_their_prediction_type(tmp_path, capsys):
    from sdtune import cli

    down, up = torch.zeros(4, 1024), torch.zeros(320, 4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata={"ss_base_model_version": "sd_v2_v"})
    assert cli.main(["inspect", str(tmp_path / "kohya.safetensors")]) == 0
    out = capsys.readouterr().out
    assert (
        "family: Stable Diffusion 2.x" in out
        and "made on a model predicting: v_prediction (ss_base_model_version)" in out
    )
    save_file({"emb_params": torch.zeros(3, 1024)}, str(tmp_path / "emb.safetensors"))
    assert cli.main(["inspect", str(tmp_path / "emb.safetensors"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["family"], summary["vectors"], summary["prediction_type"]) == ("sd2", {"text": [3, 1024]}, None)


def test_the_sample_grid_of_a_768v_run_is_drawn_again_with_its_prediction_type(tiny_sd2, sd2_dict, tmp_path, capsys):
    """A single file that does not say it predicts v, trained with `prediction_type: v_prediction`: the printed
    `sdtune generate` command passes `--prediction-type` on (without it the file would be probed) and redraws the
    last sample grid pixel for pixel."""
    import shlex

    import numpy as np
    from PIL import Image

    from sdtune import cli, inference

    path = _unstated_copy(tiny_sd2["v_checkpoint"], tmp_path / "sd21-768.safetensors")
    raw = {**sd2_dict, "base_model": str(path), "prediction_type": "v_prediction", "method": "ti+lora"}
    raw |= {"placeholder_token": "<star>", "init_word": "star", "max_steps": 2, "sample_prompts": [PROMPT, "a cat"]}
    raw |= {"sample_steps": 3, "sample_guidance_scale": 3.0}
    result = train(parse_config(raw))
    assert "--prediction-type v_prediction" in result.samples_command
    assert cli.main([*shlex.split(result.samples_command)[1:], "--out", str(tmp_path / "again")]) == 0
    assert "wrote 2 file(s)" in capsys.readouterr().out
    drawn = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "again").glob("*.png"))]
    with Image.open(tmp_path / "out" / "samples" / "step00000002.png") as grid:
        assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(inference.image_grid(drawn, 2, scale=4)))
