"""Job files and adapter specs for `sdtune generate`."""

from __future__ import annotations

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
        ({"prompt": "a", "n": 0}, "`n`, `steps` and `clip_skip` must be at least 1"),
        ({"prompt": "a", "loras": "x.safetensors"}, "`loras` must be a list"),
        ({"negative_prompt": "a"}, "`prompt` must be text"),
    ],
)
def test_bad_job_entries_name_the_place_and_the_fix(entry, message):
    with pytest.raises(JobError, match=message.replace("(", "\\(").replace("?", "\\?")) as error:
        jobs.make_job(entry, {}, "jobs.yaml: job 3")
    assert str(error.value).startswith("jobs.yaml: job 3: ")


def test_specs_split_weights_off_paths_with_colons(tmp_path):
    lora = tmp_path / "a:b.safetensors"
    lora.write_bytes(b"")
    assert jobs.split_spec(f"{lora}:0.5:1") == (str(lora), ["0.5", "1"])
    assert jobs.split_spec(str(lora)) == (str(lora), [])
    assert jobs.split_spec("name:0.8") == ("name", ["0.8"])
    assert jobs.split_spec("emb.pt:<tok>") == ("emb.pt", ["<tok>"])
