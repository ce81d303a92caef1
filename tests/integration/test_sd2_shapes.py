"""SD2.1 at its real shapes (the published 512-base and 768-v configs, built on the meta device: names and shapes, no
memory): kohya's module counts, every exported key under ComfyUI's and A1111's key rules, the OpenCLIP-H single-file
layout (24 layers, the last one unused) and how a real SD2 file is recognised and checked against its config."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from client_rules import a1111_sd2_unmatched_keys, comfyui_key_map, comfyui_unloaded_keys
from sdtune import checkpoint_keys, export, families, formats, models
from sdtune.methods import lora


def _meta_models(preset: str) -> dict:
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    configs = models.preset_configs(preset)
    text = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    with init_empty_weights():
        return {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
        }


@pytest.fixture(scope="module")
def sd2():
    return _meta_models("sd2-768v")


def _single_file_shapes(components: dict) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of an SD2.1 single file (what the released v2-1_768-ema-pruned file holds)."""
    keys = checkpoint_keys.unet_to_ldm(components["unet"].state_dict(), components["unet"].config)
    text = components["text_encoder"].state_dict()
    keys |= checkpoint_keys.text_encoder_to_checkpoint(text, families.SD2.text_encoders[0])
    keys |= {f"first_stage_model.{k}": torch.empty(0) for k in ("encoder.conv_in.weight", "decoder.conv_out.weight")}
    return {key: tuple(value.shape) for key, value in keys.items()}


def test_both_releases_have_the_published_shapes_and_kohyas_module_counts(sd2):
    configs_512, configs_768 = (
        families.shipped_configs(families.SD2),
        families.shipped_configs(families.SD2, "v_prediction"),
    )
    assert {k: v for k, v in configs_512["unet"].items() if k not in ("sample_size", "upcast_attention")} == {
        k: v for k, v in configs_768["unet"].items() if k not in ("sample_size", "upcast_attention")
    }  # the same weights' shapes: only the file's yaml (or a probe) tells them apart
    assert (configs_512["scheduler"]["prediction_type"], configs_768["scheduler"]["prediction_type"]) == (
        "epsilon", "v_prediction",
    )  # fmt: skip
    assert (families.native_resolution(families.SD2), families.native_resolution(families.SD2, "v_prediction")) == (
        512, 768,
    )  # fmt: skip
    assert sum(p.numel() for p in sd2["unet"].parameters()) == 865_910_724  # SD2.1's UNet
    assert len(lora.unet_targets(sd2["unet"], "kohya", 8, 8.0, None)) == 192
    assert len(lora.text_encoder_targets(sd2["text_encoder"], "kohya", 8, 8.0)) == 138  # 23 layers x 6
    assert len(lora.text_encoder_targets(sd2["text_encoder"], "attention", 8, 8.0)) == 92  # all four per layer


@pytest.mark.parametrize("conv", [None, (4, 2.0)], ids=["kohya", "kohya+locon"])
def test_every_exported_sd2_key_maps_in_comfyui_and_a1111(sd2, conv):
    targets = {
        "unet": lora.unet_targets(sd2["unet"], "kohya", 8, 8.0, conv),
        "text_encoder": lora.text_encoder_targets(sd2["text_encoder"], "kohya", 8, 8.0),
    }
    modules = {}
    for component, paths in targets.items():
        named = formats.adaptable_modules(sd2[component])
        for path in paths:
            shape = named[path].weight.shape
            down, up = torch.zeros(1, *shape[1:]), torch.zeros(shape[0], 1, *([1] * (len(shape) - 2)))
            modules[formats.lora_key(families.SD2, component, path)] = formats.LoraModule(down, up, 1.0)
    key_map = formats.module_key_map(families.SD2, sd2)
    assert export.lora_export_problems(modules, key_map, families.SD2) == []  # sdtune would write this file
    file_keys = [name + suffix for name in modules for suffix in formats.LORA_SUFFIXES]
    layout = _single_file_shapes(sd2)
    diffusers_names = [k for k in sd2["unet"].state_dict()]
    unet_keys = [k for k in layout if k.startswith("model.diffusion_model.")]
    assert comfyui_unloaded_keys(file_keys, comfyui_key_map(diffusers_names, unet_keys, 24)) == []  # clip_h: 24
    assert a1111_sd2_unmatched_keys(file_keys, layout) == []
    assert any("te_text_model_encoder_layers_22_" in k for k in file_keys)
    assert any("_resnets_" in k for k in file_keys) == (conv is not None)
    partial = [k for k in file_keys if "layers_5_self_attn_k_proj" not in k]  # A1111 then skips layer 5's attention
    assert a1111_sd2_unmatched_keys(partial, layout) == [
        f"lora_te_text_model_encoder_layers_5_self_attn_{p}_proj" for p in ("out", "q", "v")
    ]


def _write(path, shapes: dict) -> None:
    save_file({key: torch.zeros(shape if "input_blocks.0.0" in key else (1,)) for key, shape in shapes.items()}, path)


def test_a_real_sd2_file_is_recognised_and_checked_against_its_config(sd2, tmp_path):
    shapes = _single_file_shapes(sd2)
    prefix = "cond_stage_model.model.transformer.resblocks."
    assert {int(k[len(prefix) :].split(".")[0]) for k in shapes if k.startswith(prefix)} == set(range(24))
    assert shapes["cond_stage_model.model.text_projection"] == (1024, 1024)
    assert shapes[prefix + "0.attn.in_proj_weight"] == (3072, 1024)
    _write(tmp_path / "v2-1_768.safetensors", shapes)
    assert models.detect_family(tmp_path / "v2-1_768.safetensors") == "sd2"
    for prediction_type in ("epsilon", "v_prediction"):  # 24 OpenCLIP layers = the 23 the config uses + the unused
        folder = models._config_dir_for({}, families.SD2, prediction_type)
        models._check_config_matches(shapes, folder, tmp_path / "v2-1_768.safetensors", families.SD2)
    fewer = {k: v for k, v in shapes.items() if not k.startswith(prefix + "23.")}
    with pytest.raises(models.ModelError, match="text encoder layers 22 \\(config: 23\\)"):
        models._check_config_matches(fewer, folder, tmp_path / "x.safetensors", families.SD2)
    inpainting = {**shapes, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    _write(tmp_path / "inpainting.safetensors", inpainting)
    with pytest.raises(models.ModelError, match="is an inpainting Stable Diffusion 2.x model"):
        models.detect_family(tmp_path / "inpainting.safetensors")
