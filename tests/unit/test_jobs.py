"""Job files and adapter specs for `sdtune generate`."""

from __future__ import annotations

import re

import pytest

from sdtune import jobs
from sdtune.jobs import JobError


def test_prompts_file_yaml_and_jsonl_jobs(tmp_path):
    defaults = {"n": 2, "seed": 7, "steps": 10}
    text = tmp_path / "prompts.txt"
    text.write_text("# comment\na cat\n\na dog <lora:x:0.5>\n", encoding="utf-8")
    assert [(j.prompt, j.n, j.seed, j.steps) for j in jobs.read_jobs(text, defaults)] == [
        ("a cat", 2, 7, 10),
        ("a dog <lora:x:0.5>", 2, 7, 10),
    ]
    yaml_file = tmp_path / "jobs.yaml"
    yaml_file.write_text("jobs:\n  - {prompt: a cat, cfg_scale: 5, num_images: 3}\n", encoding="utf-8")
    (job,) = jobs.read_jobs(yaml_file, defaults)
    assert (job.guidance, job.n, job.seed) == (5, 3, 7)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"prompt": "a", "steps": 2.5}, "`steps` must be a whole number"),
        ({"prompt": "a", "sampler": "euler_b"}, "sampler 'euler_b' is not one of"),
        ({"promt": "a"}, "unknown key 'promt'. Did you mean 'prompt'?"),
        ({"prompt": "a", "n": 0}, "`n` is 0; give 1 or more"),
        ({"prompt": "a", "loras": "x.safetensors"}, "`loras` must be a list"),
        ({"negative_prompt": "a"}, "`prompt` must be text"),
        ({"prompt": "a", "negative": 5}, "`negative_prompt` must be text (got 5)"),
        ({"prompt": "a", "negative": "x", "negative_prompt": "y"}, "'negative' and 'negative_prompt' both set"),
        ({"prompt": "a", "seed": 2**64}, "`seed` 18446744073709551616 is outside 0..18446744073709551615"),
        ({"prompt": "a", "seed": -2}, "`seed` -2 is outside 0..18446744073709551615 (2**64-1); -1 or no seed"),
        ({"prompt": "a", "seed": 2**64 - 1, "n": 2}, "with `n` 2 runs past 18446744073709551615"),
        (
            {"prompt": "a", "width": 33},
            "`width` 33 is not a multiple of 8 (the VAE works on 8x8-pixel blocks); use 32 or 40",
        ),
        ({"prompt": "a", "height": 0}, "`height` 0 is outside 8..8192 pixels"),
        ({"prompt": "a", "width": -64}, "`width` -64 is outside 8..8192 pixels"),
        ({"prompt": "a", "width": 200_000}, "`width` 200000 is outside 8..8192 pixels"),
        ({"prompt": "a", "width": 8192, "height": 4096}, "8192x4096 is 33,554,432 pixels, over the 16,777,216"),
        ({"prompt": "a", "guidance": float("nan")}, "`guidance` nan is not a finite number"),
        ({"prompt": "a", "cfg_scale": float("inf")}, "`guidance` inf is not a finite number"),
        ({"prompt": "a", "guidance": "7"}, "`guidance` must be a number (got '7')"),
        ({"prompt": "a", "steps": 0}, "`steps` 0 is outside 1..1000"),
        ({"prompt": "a", "steps": 10**9}, "`steps` 1000000000 is outside 1..1000"),
        ({"prompt": "a", "clip_skip": 0}, "`clip_skip` is 0; give 1 or more"),
        ({"prompt": "a", "loras": [{"name": "x", "weight": float("nan")}]}, "`weight` must be a finite number"),
        ({"prompt": "a", "loras": [{"name": "x", "wieght": 1}]}, "unknown key 'wieght'"),
        ({"prompt": "a", "embeddings": [{"token": "t"}]}, "needs `path` or `name`"),
        ({"prompt": "a", "embeddings": [{"name": "e", "token": 3}]}, "`token` must be text (got 3)"),
        ({"prompt": "a", "loras": ["x.safetensors:abc"]}, "lora 'x.safetensors:abc': 'abc' is not a number"),
        ({"prompt": "a", "loras": ["x.safetensors:1:nan"]}, "a weight must be a finite number"),
        ({"prompt": "a <lora:x:heavy>"}, "<lora:x:heavy>: 'heavy' is not a number"),
    ],
)
def test_bad_job_entries_name_the_place_and_the_fix(entry, message):
    with pytest.raises(JobError, match=re.escape(message)) as error:
        jobs.make_job(entry, {}, "jobs.yaml: job 3")
    assert str(error.value).startswith("jobs.yaml: job 3: ")


def test_specs_split_weights_off_paths_with_colons(tmp_path):
    lora = tmp_path / "a:b.safetensors"
    lora.write_bytes(b"")
    assert jobs.split_spec(f"{lora}:0.5:1") == (str(lora), ["0.5", "1"])
    assert jobs.split_spec(str(lora)) == (str(lora), [])
    assert jobs.split_spec("name:0.8") == ("name", ["0.8"])
    assert jobs.split_spec("emb.pt:<tok>") == ("emb.pt", ["<tok>"])


def test_every_problem_of_a_job_is_reported_at_once():
    with pytest.raises(JobError) as error:
        jobs.make_job({"prompt": "a", "width": 33, "steps": 0, "guidance": float("nan")}, {}, "job 1")
    assert all(f"`{name}`" in str(error.value) for name in ("width", "steps", "guidance"))


def test_seed_minus_one_is_random_as_in_a1111_and_the_top_seed_fits():
    assert jobs.make_job({"prompt": "a", "seed": -1}, {}, "job").seed == -1  # kept as written; drawn in `prepare`
    assert jobs.make_job({"prompt": "a", "seed": 2**64 - 1}, {}, "job").seed == 2**64 - 1
    assert jobs.make_job({"prompt": "a", "width": 4096, "height": 4096}, {}, "job").width == 4096


def test_a_prompt_of_megabytes_is_refused_without_echoing_it(tmp_path):
    huge = "word " * 400_000  # 2 MB
    with pytest.raises(JobError, match="`prompt` is 2,000,000 characters; sdtune takes at most 10,000") as error:
        jobs.make_job({"prompt": huge}, {}, "job 1")
    assert len(str(error.value)) < 500
    with pytest.raises(JobError, match="`negative_prompt` is 2,000,000 characters"):
        jobs.make_job({"prompt": "a"}, {"negative_prompt": huge}, "command line")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"a cat\n{huge}\n", encoding="utf-8")
    with pytest.raises(JobError, match=f"^{prompts_file}:2: `prompt` is 1,999,999 characters"):
        jobs.read_jobs(prompts_file, {})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("jobs.jsonl", '{"prompt": "a", "guidance": NaN}\n', "jobs.jsonl:1: `guidance` nan is not a finite number"),
        ("jobs.jsonl", '{"prompt": "a", "steps": 5}\n{"prompt": "b" "x"}\n', "jobs.jsonl:2: not JSON"),
        ("jobs.yaml", "- prompt: a\n  width: 30\n", "jobs.yaml: job 1: `width` 30 is not a multiple of 8"),
        ("jobs.yaml", '- !!python/object/apply:os.system ["echo hi"]\n', "jobs.yaml:1:3: not valid YAML"),
        ("jobs.yaml", "- prompt: a\n  seed: [1\n", "jobs.yaml:3:1: not valid YAML"),
        ("jobs.yaml", "jobs:\n  - prompt: a\nsteps: 4\n", "expected a list of jobs (or `jobs:` with a list and"),
    ],
)
def test_job_file_errors_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(JobError, match=re.escape(message)) as error:
        jobs.read_jobs(path, {})
    assert str(error.value).startswith(str(path))


def test_a_python_tag_is_refused_as_plain_data_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "jobs.yaml"
    path.write_text(f'- !!python/object/apply:os.system ["touch {marker}"]\n', encoding="utf-8")
    with pytest.raises(JobError, match="tags such as !!python/... are refused, nothing was run"):
        jobs.read_jobs(path, {})
    assert not marker.exists()


def test_job_files_must_be_utf8_and_may_start_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_bytes("- prompt: a caf\u00e9\n".encode("utf-8-sig"))
    assert jobs.read_jobs(path, {})[0].prompt == "a caf\u00e9"
    path.write_bytes("- prompt: a\n- prompt: a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(
        JobError, match=f"^{path}:2: not UTF-8 text \\(byte 0xe9 at offset 27\\); save the file as UTF-8"
    ):
        jobs.read_jobs(path, {})


def test_run_options_are_checked_before_a_model_loads(tmp_path):
    jobs.check_run_options(tmp_path / "new" / "folder", 1)  # made when the first image is saved
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"")
    with pytest.raises(JobError, match=f"--out {taken} is a file; images and manifest.jsonl go into a folder"):
        jobs.check_run_options(taken, 1)
    with pytest.raises(JobError, match=f"{taken} is a file, so no folder can be made inside it"):
        jobs.check_run_options(taken / "images", 1)
    for size in (0, -1):
        with pytest.raises(JobError, match=f"--batch-size {size}: give 1 or more"):
            jobs.check_run_options(tmp_path, size)
