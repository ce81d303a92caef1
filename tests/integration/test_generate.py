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


def _refused(command: list[str], capsys) -> str:
    """Runs `sdtune generate` on a base that does not exist: a refusal here came before any model was read."""
    assert cli.main(["generate", "--base", "no-such-model", *command]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "Traceback" not in error and "no-such-model" not in error
    return error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seed", str(2**64)], "command line: `seed` 18446744073709551616 is outside 0..18446744073709551615"),
        (["--seed", "-5"], "`seed` -5 is outside 0..18446744073709551615 (2**64-1); -1 or no seed draws a random"),
        (["--width", "33"], "command line: `width` 33 is not a multiple of 8 (the VAE works on 8x8-pixel blocks)"),
        (["--height", "-64"], "`height` -64 is outside 8..8192 pixels"),
        (["--width", "8192", "--height", "8192"], "8192x8192 is 67,108,864 pixels, over the 16,777,216 (4096x4096)"),
        (["--guidance", "nan"], "command line: `guidance` nan is not a finite number"),
        (["--steps", "0"], "`steps` 0 is outside 1..1000"),
        (["--n", "0"], "`n` is 0; give 1 or more"),
        (["--batch-size", "0"], "--batch-size 0: give 1 or more"),
        (["--lora", "x.safetensors:nan"], "--lora x.safetensors:nan: a weight must be a finite number"),
    ],
)
def test_command_line_values_are_refused_before_the_model_loads(tmp_path, capsys, options, message):
    error = _refused(["--prompt", "a cat", "--out", str(tmp_path / "out"), *options], capsys)
    assert error.startswith("sdtune generate: ") and message in error
    assert not (tmp_path / "out").exists()


def test_values_of_every_job_source_are_checked_before_the_model_loads(tmp_path, capsys):
    huge = "star " * 600_000  # 3 MB
    error = _refused(["--prompt", huge, "--out", str(tmp_path / "out")], capsys)
    assert "`prompt` is 3,000,000 characters; sdtune takes at most 10,000" in error and len(error) < 600
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"a cat\n{huge}\n", encoding="utf-8")
    assert f"{prompts_file}:2: `prompt` is 2,999,999 characters" in _refused(
        ["--prompts-file", str(prompts_file)], capsys
    )
    for name, text, where in (
        ("jobs.yaml", "- prompt: a cat\n- {prompt: a dog, width: 100, seed: -2}\n", "jobs.yaml: job 2"),
        ("jobs.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog", "width": 100, "seed": -2}\n', "jobs.jsonl:2"),
    ):
        (tmp_path / name).write_text(text, encoding="utf-8")
        error = _refused(["--jobs", str(tmp_path / name)], capsys)
        assert (
            f"{where}: `width` 100 is not a multiple of 8 (the VAE works on 8x8-pixel blocks); use 96 or 104; "
            in error
        )
        assert "`seed` -2 is outside 0..18446744073709551615" in error


def test_an_output_folder_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    taken = tmp_path / "picture.png"
    taken.write_bytes(b"an image someone keeps")
    error = _refused(["--prompt", "a cat", "--out", str(taken)], capsys)
    assert f"--out {taken} is a file; images and manifest.jsonl go into a folder" in error
    assert taken.read_bytes() == b"an image someone keeps"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('- !!python/object/apply:os.system ["echo hi"]\n', "jobs.yaml:1:3: not valid YAML (could not determine a"),
        ("- prompt: a cat\n  n: [2\n", "jobs.yaml:3:1: not valid YAML (expected ',' or ']', but got '<stream end>')"),
        ("- prompt: a cat\n\tn: 2\n", "jobs.yaml:2:1: not valid YAML (found character '\\t' that cannot start"),
        (b"- prompt: a caf\xe9\n", "jobs.yaml:1: not UTF-8 text (byte 0xe9 at offset 15); save the file as UTF-8."),
    ],
)
def test_a_broken_job_file_is_an_error_naming_the_file_and_line(tmp_path, capsys, text, message):
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    error = _refused(["--jobs", str(jobs_file), "--out", str(tmp_path / "out")], capsys)
    assert error.startswith(f"sdtune generate: {tmp_path / message}")
    if "python" in str(text):
        assert "tags such as !!python/... are refused, nothing was run" in error


def test_a_non_finite_image_is_not_saved_and_the_others_are(tiny_base, tmp_path, capsys, monkeypatch):
    """An image whose decoded pixels hold NaN (a broken VAE, LoRA or embedding) would be an all-black PNG: the run
    stops with an error naming it; the good image of its batch is saved, it is not."""
    from sdtune import inference

    load = inference.AdapterPipeline.from_base

    def second_image_nan(module, inputs, output):
        output[1:] = float("nan")

    def broken(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.pipe.vae.decoder.register_forward_hook(second_image_nan)
        return pipe

    monkeypatch.setattr(inference.AdapterPipeline, "from_base", staticmethod(broken))
    out = tmp_path / "out"
    command = ["generate", "--base", str(tiny_base["folder"]), "--prompt", "a red house", "--n", "2", "--seed", "7"]
    assert cli.main([*command, "--batch-size", "2", "--steps", "2", "--out", str(out)]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "job 1 (prompt 'a red house', seed 8): the decoded pixels are NaN or infinite" in error
    assert "1 image(s) of it were saved (PNG and manifest line)" in error and "Traceback" not in error
    assert [p.name for p in out.glob("*.png")] == ["00000-7.png"]
    assert [json.loads(line)["seed"] for line in (out / "manifest.jsonl").read_text().splitlines()] == [7]


def test_seed_minus_one_is_random_long_prompts_warn_and_clip_skip_fits_the_encoder(tiny_base, tmp_path, capsys):
    out = tmp_path / "out"
    long_prompt = " ".join(["a red star"] * 30)  # 90 tokens
    command = ["generate", "--base", str(tiny_base["folder"]), "--prompt", long_prompt, "--seed", "-1"]
    command += ["--steps", "2", "--width", "32", "--height", "32", "--out", str(out)]
    assert cli.main(command) == 0
    assert "warning: job 1: the prompt is 90 tokens" in capsys.readouterr().err
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert 0 <= entry["seed"] < 2**32 and (out / f"00000-{entry['seed']}.png").is_file()
    assert cli.main([*command, "--clip-skip", "6"]) == cli.EXIT_BAD_INPUT
    assert "clip_skip 6, but this base's text encoder has 5 layers; give 1 to 5" in capsys.readouterr().err
