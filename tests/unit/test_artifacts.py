"""`sdtune inspect`: reading LoRAs and embeddings of every documented layout, and checking them against a base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sdtune import cli, compat, formats, models


def _kohya_sd15_attention_file(path, width=768):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_file(
        {
            name + ".lora_down.weight": torch.zeros(4, width),
            name + ".lora_up.weight": torch.zeros(320, 4),
            name + ".alpha": torch.tensor(2.0),
            te + ".lora_down.weight": torch.zeros(4, width),
            te + ".lora_up.weight": torch.zeros(3072, 4),
            te + ".alpha": torch.tensor(2.0),
        },
        str(path),
    )
    return path


def test_third_party_kohya_lora_is_described_by_groups_and_family(tmp_path):
    artifact = formats.read_artifact(_kohya_sd15_attention_file(tmp_path / "k.safetensors"))
    assert (artifact.kind, artifact.layout, artifact.family) == ("lora", "kohya", "sd1")
    groups = formats.lora_groups(artifact.lora_modules)
    assert groups["unet attention"] == {"modules": 1, "ranks": {4}, "alphas": {2.0}}
    assert groups["text encoder mlp"]["modules"] == 1
    assert artifact.record == {}
    sd2 = formats.read_artifact(_kohya_sd15_attention_file(tmp_path / "k2.safetensors", width=1024))
    assert sd2.family == "sd2"


def test_embedding_layouts(tmp_path):
    save_file({"emb_params": torch.zeros(3, 768)}, str(tmp_path / "a.safetensors"))
    save_file({"<cat-toy>": torch.zeros(768)}, str(tmp_path / "b.safetensors"))
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "c.safetensors"))
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(torch.zeros(4, 1024))},
        "name": "mystyle",
        "step": 100,
        "sd_checkpoint": "abcdef12",
        "sd_checkpoint_name": "v2-1_768",
    }
    torch.save(a1111, tmp_path / "d.pt")
    found = {
        p: formats.read_artifact(tmp_path / p) for p in ("a.safetensors", "b.safetensors", "c.safetensors", "d.pt")
    }
    assert [(a.layout, a.family) for a in found.values()] == [
        ("emb_params", "sd1"),
        ("single-key", "sd1"),
        ("sdxl-pair", "sdxl"),
        ("a1111-pt", "sd2"),
    ]
    assert found["b.safetensors"].vectors["text"].shape == (1, 768)
    assert found["d.pt"].vectors["text"].shape == (4, 1024)


def test_unknown_files_are_refused_clearly(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(formats.FormatError, match="neither a LoRA nor an embedding layout"):
        formats.read_artifact(tmp_path / "x.safetensors")
    (tmp_path / "y.txt").write_text("hi")
    with pytest.raises(formats.FormatError, match="unknown file type '.txt'"):
        formats.read_artifact(tmp_path / "y.txt")


def test_inspect_command_checks_fit_against_a_base(tiny_base, tmp_path, capsys):
    wrong = _kohya_sd15_attention_file(tmp_path / "sd15_lora.safetensors")
    assert cli.main(["inspect", str(wrong), "--base", str(tiny_base["folder"])]) == cli.EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "kind: lora (kohya layout), family: Stable Diffusion 1.x" in captured.out
    assert "does not fit the base model" in captured.err and "do not fit the module's weight" in captured.err

    base = models.load_base_model(tiny_base["folder"])
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    fitting = tmp_path / "tiny_lora.safetensors"
    save_file(
        {name + ".lora_down.weight": torch.zeros(2, 32), name + ".lora_up.weight": torch.zeros(64, 2)}, str(fitting)
    )
    assert compat.check_fit(formats.read_artifact(fitting), base).fits
    assert cli.main(["inspect", str(fitting), "--base", str(tiny_base["checkpoint"]), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[: captured.out.rindex("}") + 1])
    assert summary["lora_groups"]["unet attention"] == {"modules": 1, "ranks": [2], "alphas": [2.0]}
    assert "fits" in captured.out and "every key maps to a module" in captured.out

    embedding = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(embedding))
    problems = compat.check_fit(formats.read_artifact(embedding), base).blocking
    assert problems == ["embedding width 768, the base's text encoder takes 32"]


def test_diffusers_layout_loras_are_checked_by_keys_and_shapes(tiny_base, tmp_path):
    base = models.load_base_model(tiny_base["folder"])
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(2, 32), f"{prefix}.lora_B.weight": torch.zeros(64, 2)}, str(path)
    )
    artifact = formats.read_artifact(tmp_path)  # a diffusers LoRA folder
    assert artifact.layout == "diffusers-peft"
    assert list(artifact.lora_modules) == ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert compat.check_fit(artifact, base).fits
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(2, 768), f"{prefix}.lora_B.weight": torch.zeros(64, 2)}, str(path)
    )
    assert "do not fit the module's weight (64, 32)" in compat.check_fit(formats.read_artifact(path), base).blocking[0]
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 32)}, str(path))
    with pytest.raises(formats.FormatError, match="attn2_to_k lacks its lora_B weight"):
        formats.read_artifact(path)
