"""SDXL at its real shapes (SDXL 1.0 base's published configs, built on the meta device: names and shapes, no
memory): kohya's module counts, every exported key under ComfyUI's and A1111's key rules, and family detection on
single files with each family's real key layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from client_rules import a1111_sdxl_unmatched_keys, comfyui_sdxl_key_map, comfyui_unloaded_keys
from sdtune import checkpoint_keys, export, families, formats, models
from sdtune.methods import lora


def _meta_models(preset: str) -> dict:
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    configs, family = models.preset_configs(preset), models.PRESETS[preset][0]
    components = {}
    with init_empty_weights():
        components["unet"] = UNet2DConditionModel.from_config(configs["unet"])
        for spec in family.text_encoders:
            text = {k: v for k, v in configs[spec.component].items() if k not in ("architectures", "model_type")}
            components[spec.component] = getattr(transformers, spec.model_class)(transformers.CLIPTextConfig(**text))
    return components


@pytest.fixture(scope="module")
def sdxl():
    return _meta_models("sdxl")


def _checkpoint_keys(preset: str, components: dict) -> dict[str, tuple[int, ...]]:
    """The single-file keys (and shapes) of a preset's real layout."""
    configs, family = models.preset_configs(preset), models.PRESETS[preset][0]
    keys = checkpoint_keys.unet_to_ldm(components["unet"].state_dict(), configs["unet"])
    for spec in family.text_encoders:
        keys |= checkpoint_keys.text_encoder_to_checkpoint(components[spec.component].state_dict(), spec)
    keys |= {
        f"first_stage_model.{name}": torch.empty(0) for name in ("encoder.conv_in.weight", "decoder.conv_out.weight")
    }
    return {key: tuple(value.shape) for key, value in keys.items()}


def test_kohya_preset_on_sdxl_shapes_matches_kohya_module_counts(sdxl):
    assert len(lora.unet_targets(sdxl["unet"], "kohya", 8, 8.0, None)) == 722
    assert len(lora.text_encoder_targets(sdxl["text_encoder"], "kohya", 8, 8.0)) == 72
    assert len(lora.text_encoder_targets(sdxl["text_encoder_2"], "kohya", 8, 8.0)) == 192
    attention = lora.text_encoder_targets(sdxl["text_encoder_2"], "attention", 8, 8.0)
    assert len(attention) == 128  # every preset keeps all four of q, k, v, out per OpenCLIP layer (A1111's rule)


def _factors(components: dict, targets: dict) -> dict[str, formats.LoraModule]:
    """Rank-1 factors of the right shapes for every target, under SDXL's kohya names."""
    modules = {}
    unet_config = components["unet"].config
    for component, paths in targets.items():
        named = formats.adaptable_modules(components[component])
        for path in paths:
            weight_shape = named[path].weight.shape
            down = torch.zeros(1, *weight_shape[1:])
            up = torch.zeros(weight_shape[0], 1, *([1] * (len(weight_shape) - 2)))
            modules[formats.lora_key(families.SDXL, component, path, unet_config)] = formats.LoraModule(down, up, 1.0)
    return modules


@pytest.mark.parametrize("conv", [None, (4, 2.0)], ids=["kohya", "kohya+locon"])
def test_every_exported_sdxl_key_maps_in_comfyui_and_a1111(sdxl, conv):
    targets = {
        "unet": lora.unet_targets(sdxl["unet"], "kohya", 8, 8.0, conv),
        "text_encoder": lora.text_encoder_targets(sdxl["text_encoder"], "kohya", 8, 8.0),
        "text_encoder_2": lora.text_encoder_targets(sdxl["text_encoder_2"], "kohya", 8, 8.0),
    }
    modules = _factors(sdxl, targets)
    key_map = formats.module_key_map(families.SDXL, sdxl)
    assert export.lora_export_problems(modules, key_map, families.SDXL) == []  # sdtune would write this file
    file_keys = [name + suffix for name in modules for suffix in formats.LORA_SUFFIXES]
    layout = _checkpoint_keys("sdxl", sdxl)
    comfy = comfyui_sdxl_key_map([k for k in layout if k.startswith("model.diffusion_model.")], 12, 32)
    assert comfyui_unloaded_keys(file_keys, comfy) == []
    assert a1111_sdxl_unmatched_keys(file_keys, layout) == []
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv") for k in file_keys) == (conv is not None)


def test_a_q_v_only_te2_attention_is_what_a1111_ignores(sdxl):
    targets = {"text_encoder_2": {"text_model.encoder.layers.0.self_attn.q_proj": (1, 1.0)}}
    targets["text_encoder_2"]["text_model.encoder.layers.0.self_attn.v_proj"] = (1, 1.0)
    modules = _factors(sdxl, targets)
    file_keys = [name + suffix for name in modules for suffix in formats.LORA_SUFFIXES]
    assert a1111_sdxl_unmatched_keys(file_keys, _checkpoint_keys("sdxl", sdxl))  # the client rule, transcribed
    problems = export.lora_export_problems(modules, formats.module_key_map(families.SDXL, sdxl), families.SDXL)
    assert problems[0] == (
        "text_encoder_2 layer 0: attention LoRA on q, v only; A1111 applies an OpenCLIP encoder's attention LoRA only "
        "when q, k, v and out are all present, so it would silently do nothing there (train all four, as every sdtune "
        "preset does, or none)"
    )


def _write(path, shapes: dict) -> None:
    save_file({key: torch.zeros(shape if "input_blocks.0.0" in key else (1,)) for key, shape in shapes.items()}, path)


def test_family_detection_on_each_familys_real_single_file_layout(sdxl, tmp_path):
    sd1_shapes = _checkpoint_keys("sd15", _meta_models("sd15"))
    xl_shapes = _checkpoint_keys("sdxl", sdxl)
    assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in xl_shapes  # FORMATS.md's marker
    cases = {"sd1.safetensors": sd1_shapes, "sdxl.safetensors": xl_shapes}
    cases["vpred.safetensors"] = {**xl_shapes, "v_pred": (0,), "ztsnr": (0,)}
    for name, shapes in cases.items():
        _write(tmp_path / name, shapes)
    assert models.detect_family(tmp_path / "sd1.safetensors") == "sd1"
    assert models.detect_family(tmp_path / "sdxl.safetensors") == "sdxl"
    assert models.detect_family(tmp_path / "vpred.safetensors") == "sdxl"
    keys = models.read_checkpoint_header(tmp_path / "vpred.safetensors")[0]
    assert models._marked_schedule(keys) == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in xl_shapes.items()}
    refiner = {k: v for k, v in refiner.items() if not k.startswith("conditioner.embedders.0.transformer.")}
    _write(tmp_path / "refiner.safetensors", refiner)
    with pytest.raises(models.ModelError, match="is a SDXL refiner model, which this version of sdtune does not"):
        models.load_base_model(tmp_path / "refiner.safetensors")
    for family_name, shapes in (("SDXL base", xl_shapes), ("Stable Diffusion 1.x", sd1_shapes)):
        inpainting = {**shapes, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
        _write(tmp_path / "inpainting.safetensors", inpainting)
        with pytest.raises(models.ModelError, match=f"is an inpainting {family_name} model"):
            models.detect_family(tmp_path / "inpainting.safetensors")
