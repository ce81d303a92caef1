"""`sdtune generate`: a job file of prompts x seeds with two LoRAs and an embedding, written as PNGs with A1111
`parameters`, a manifest and a grid; the same seeds give the same pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from adapters_factory import a1111_embedding, kohya_lora
from PIL import Image

from sdtune import cli, compat, models


@pytest.fixture
def library(tiny_base, tmp_path):
    base = models.load_base_model(tiny_base["folder"])
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    kohya_lora(base, loras / "shiny-v2.safetensors", seed=1, metadata={"ss_output_name": "shiny"})
    kohya_lora(base, tmp_path / "ours.safetensors", seed=2, metadata=compat.base_record(base))
    a1111_embedding(embeddings / "myemb.pt", torch.randn(2, 32))
    return {"loras": loras, "embeddings": embeddings, "ours": tmp_path / "ours.safetensors"}


def _generate(tiny_base, library, jobs_file, out, *extra) -> int:
    return cli.main(
        ["generate", "--base", str(tiny_base["folder"]), "--jobs", str(jobs_file), "--lora-dir", str(library["loras"])]
        + ["--embedding-dir", str(library["embeddings"]), "--out", str(out), "--steps", "4", "--width", "32"]
        + ["--height", "32", "--batch-size", "2", *extra]
    )


def test_a_job_file_writes_images_metadata_and_manifest_reproducibly(tiny_base, library, tmp_path, capsys):
    jobs_file = tmp_path / "jobs.yaml"
    jobs = [
        {"prompt": "a photo of myemb <lora:shiny:0.7>", "n": 2, "seed": 5, "negative": "blurry"},
        {"prompt": "a red house", "n": 2, "seed": 9, "sampler": "euler", "loras": [f"{library['ours']}:0.5:1.5"]},
    ]
    jobs_file.write_text(yaml.safe_dump(jobs), encoding="utf-8")
    assert _generate(tiny_base, library, jobs_file, tmp_path / "run1", "--grid") == 0
    assert "wrote 5 file(s)" in capsys.readouterr().out

    names = ["00000-5.png", "00001-6.png", "00002-9.png", "00003-10.png"]
    manifest = [json.loads(line) for line in (tmp_path / "run1" / "manifest.jsonl").read_text().splitlines()]
    assert [entry["file"] for entry in manifest] == names
    assert [entry["seed"] for entry in manifest] == [5, 6, 9, 10]
    first, last = manifest[0], manifest[-1]
    assert first["text"] == "a photo of myemb" and first["negative_prompt"] == "blurry"
    assert [(e["name"], e["text_encoder_weight"], e["unet_weight"]) for e in first["loras"]] == [("shiny", 0.7, 0.7)]
    assert first["embeddings"][0]["name"] == "myemb" and len(first["embeddings"][0]["hash"]) == 12
    assert [(e["name"], e["text_encoder_weight"], e["unet_weight"]) for e in last["loras"]] == [("ours", 0.5, 1.5)]
    assert last["sampler"] == "euler" and last["embeddings"] == [] and len(last["model_hash"]) == 10

    parameters = Image.open(tmp_path / "run1" / names[0]).text["parameters"]
    prompt, negative, settings = parameters.split("\n")
    assert prompt == "a photo of myemb <lora:shiny:0.7>" and negative == "Negative prompt: blurry"
    lora_hash, ti_hash = first["loras"][0]["hash"], first["embeddings"][0]["hash"]
    assert settings.startswith("Steps: 4, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 5, Size: 32x32, Model hash: ")
    assert f'Lora hashes: "shiny: {lora_hash}", TI hashes: "myemb: {ti_hash}", Version: sdtune' in settings
    other = Image.open(tmp_path / "run1" / names[3]).text["parameters"]
    assert other.startswith("a red house <lora:ours:0.5:1.5>\nSteps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 10")
    assert Image.open(tmp_path / "run1" / "grid.png").size == (64, 64)

    assert _generate(tiny_base, library, jobs_file, tmp_path / "run2") == 0
    for name in names:
        again = np.asarray(Image.open(tmp_path / "run2" / name))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "run1" / name)), again), name
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "run1" / names[0])), np.asarray(Image.open(tmp_path / "run1" / names[1]))
    )


def test_bad_jobs_and_unknown_names_fail_before_generating(tiny_base, library, tmp_path, capsys):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "a cat", "sede": 3}\n', encoding="utf-8")
    assert _generate(tiny_base, library, jobs_file, tmp_path / "out") == 2
    assert "jobs.jsonl:1: unknown key 'sede'. Did you mean 'seed'?" in capsys.readouterr().err
    jobs_file.write_text('{"prompt": "a cat <lora:shinny:1>"}\n', encoding="utf-8")
    assert _generate(tiny_base, library, jobs_file, tmp_path / "out") == 2
    assert "the prompt names LoRA 'shinny' (<lora:NAME:WEIGHT>), but no such file is known" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_file_from_another_checkpoint_needs_force(tiny_base, library, tmp_path, capsys):
    base = models.load_base_model(tiny_base["folder"])
    record = compat.base_record(base) | {"sdtune.base_model_sha256": "a" * 64, "sdtune.base_model_name": "finetune"}
    moved = tmp_path / "moved.safetensors"
    kohya_lora(base, moved, seed=3, metadata=record)
    command = ["generate", "--base", str(tiny_base["folder"]), "--prompt", "a cat", "--lora", f"{moved}:0.6"]
    command += ["--steps", "2", "--width", "32", "--height", "32", "--seed", "1", "--out", str(tmp_path / "out")]
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert (
        f"{moved} does not fit the base model tiny-sd1" in error and "trained on finetune (sha256 aaaaaaaaaa)" in error
    )
    assert "--force" in error and not (tmp_path / "out").exists()
    assert cli.main([*command, "--force"]) == 0
    assert "loaded with force although it trained on finetune" in capsys.readouterr().err
    assert (tmp_path / "out" / "00000-1.png").is_file()


def test_a_training_sample_grid_is_drawn_again_by_sdtune_generate(ti_lora_process_dict, tmp_path, capsys):
    """The sample grid at the end of a TI+LoRA run, and `sdtune generate` with the command training prints (the saved
    embedding and LoRA, the run's job file), give the same pixels: one generation path, CPU-seeded noise."""
    import shlex

    from sdtune import inference
    from sdtune.config import parse_config
    from sdtune.train import train

    prompts = ["a red <star> on a blue background", "a <star>", "a photo of a cat"]
    config = parse_config(
        {**ti_lora_process_dict, "max_steps": 2, "batch_size": 2, "sample_prompts": prompts, "sample_steps": 4,
         "sample_guidance_scale": 3.0, "output_dir": str(tmp_path / "run")}
    )  # fmt: skip
    result = train(config)
    words = shlex.split(result.samples_command)
    assert words[:2] == ["sdtune", "generate"] and str(tmp_path / "run" / "sample_prompts.yaml") in words
    assert cli.main([*words[1:], "--out", str(tmp_path / "again")]) == 0
    assert "wrote 3 file(s)" in capsys.readouterr().out
    drawn = [Image.open(path).convert("RGB") for path in sorted((tmp_path / "again").glob("*.png"))]
    assert [image.size for image in drawn] == [(32, 32)] * 3
    regridded = inference.image_grid(drawn, columns=3, scale=4)  # as training lays out its 32 px samples
    with Image.open(tmp_path / "run" / "samples" / "step00000002.png") as grid:
        assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(regridded))
    with Image.open(tmp_path / "run" / "samples" / "step00000000.png") as before:
        assert not np.array_equal(np.asarray(before.convert("RGB")), np.asarray(regridded))  # training changed them


def test_a_single_file_with_its_own_shapes_loads_with_base_config(tiny_base, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "tiny-no-config.safetensors"
    save_file(load_file(str(tiny_base["checkpoint"])), str(bare))  # SD1 keys, tiny shapes, no embedded config
    command = ["generate", "--base", str(bare), "--prompt", "a cat", "--seed", "1", "--steps", "2"]
    command += ["--width", "32", "--height", "32", "--out", str(tmp_path / "out")]
    assert cli.main(command) == cli.EXIT_BAD_INPUT
    assert "UNet width 32 (config: 320)" in capsys.readouterr().err
    assert cli.main([*command, "--base-config", str(tiny_base["folder"])]) == 0
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["00000-1.png"]
