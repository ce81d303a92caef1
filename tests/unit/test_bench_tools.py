"""The benchmark scripts' own logic: argument checks, seed means, the step-time arithmetic."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import yaml

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_bench_refuses_bad_arguments_before_training(capsys, tmp_path):
    bench = _tool("quality_bench")
    argv = ["--methods", "lora,loha", "--seeds", "42,x", "--per-background", "0"]
    argv += ["--config", str(tmp_path / "no.yaml")]
    with pytest.raises(SystemExit) as exited:
        bench._arguments(argv)
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert "--methods: loha unknown; choose from ti, lora, ti+lora" in message
    assert "--seeds: '42,x' is not a comma-separated list of integers" in message
    assert "--per-background: 0 must be at least 1" in message
    assert "--config replaces one method's config" in message and "no.yaml is not a file" in message
    args = bench._arguments(["--methods", "ti+lora", "--seeds", "42,7", "--min-shape-iou", "0.4"])
    assert (args.methods, args.seeds, args.min_shape_iou) == ("ti+lora", "42,7", 0.4)
    # the table's steps are the steps trained: a --set override, else --max-steps, else the config's
    configured = yaml.safe_load((TOOLS.parent / "configs" / "world_ti_lora.yaml").read_text(encoding="utf-8"))
    assert bench._trained_steps("ti+lora", args) == configured["max_steps"]
    args = bench._arguments(["--methods", "ti+lora", "--set", "max_steps=2.5e3", "--max-steps", "900"])
    assert bench._trained_steps("ti+lora", args) == 2500
    assert bench._trained_steps("ti+lora", bench._arguments(["--max-steps", "900"])) == 900
    # runs with other overrides train into other folders: `sdtune train` refuses a folder that holds another run
    concept = bench.quality.concept_by_name("red_star")
    plain = bench._work_folder("ti+lora", concept, 42, bench._arguments(["--work", str(tmp_path)]))
    assert plain == tmp_path / "red_star-ti_lora-s42"
    varied = [["--set", "max_steps=2000"], ["--set", "max_steps=2000", "--set", "prior_loss_weight=2"]]
    varied += [["--max-steps", "40"]]
    folders = {
        bench._work_folder("ti+lora", concept, 42, bench._arguments(["--work", str(tmp_path), *v])) for v in varied
    }
    assert len(folders) == 3 and plain not in folders
    assert all(folder.name.startswith("red_star-ti_lora-s42-") for folder in folders)


def test_quality_bench_rescore_reuses_only_finished_runs(tmp_path):
    bench = _tool("quality_bench")
    folder = tmp_path / "red_star-ti_lora-s42"
    with pytest.raises(SystemExit, match=r"--rescore: .*red_star-ti_lora-s42 holds no finished run \(no outputs\)"):
        bench._finished_run(folder)
    folder.mkdir()
    (folder / "sdtune-run.json").write_text(json.dumps({"outputs": ["star.safetensors", "star_lora.safetensors"]}))
    (folder / "star.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"missing star_lora.safetensors\); train it first with the same --work"):
        bench._finished_run(folder)
    (folder / "star_lora.safetensors").write_bytes(b"x")
    assert bench._finished_run(folder) == {"cpu_seconds": None, "wall_seconds": None}
    assert bench._arguments(["--rescore"]).rescore and not bench._arguments([]).rescore


def test_quality_bench_table_adds_a_mean_row_per_seeded_method():
    bench = _tool("quality_bench")
    common = {"concept": "red_star", "steps": 1500, "trainable_parameters": 43040, "file_bytes": 113200}
    rows = [
        {**common, "method": "untrained", "seed": None, "fidelity": 0.0, "editability": 0.0, "prior": 1.0,
         "cpu_seconds": 0.0},
        {**common, "method": "ti+lora", "seed": 42, "fidelity": 1.0, "editability": 0.5, "prior": 0.9,
         "cpu_seconds": 600.0},
        {**common, "method": "ti+lora", "seed": 7, "fidelity": 0.8, "editability": 1.0, "prior": 1.0,
         "cpu_seconds": 700.0},
    ]  # fmt: skip
    table = bench.markdown_table(rows).splitlines()
    assert table[0].startswith("| concept | method | seed | steps |")
    assert table[2].startswith("| red_star | untrained | — | 1500 | 0.00 | 0.00 | 1.00 | 0 |")
    assert table[-1] == "| red_star | ti+lora | mean of 2 | 1500 | 0.90 | 0.75 | 0.95 | 650 | 43,040 | 111 KiB |"
    assert len(table) == 2 + 3 + 1
    # a rescored run's CPU time is unknown (it trained in an earlier command): a dash, and a dash for the mean
    rescored = bench.markdown_table([{**r, "cpu_seconds": None} for r in rows[1:]]).splitlines()
    assert rescored[2].startswith("| red_star | ti+lora | 42 | 1500 | 1.00 | 0.50 | 0.90 | — |")
    assert rescored[-1].startswith("| red_star | ti+lora | mean of 2 | 1500 | 0.90 | 0.75 | 0.95 | — |")
    unseeded = bench.markdown_table([{**rows[1], "seed": None}]).splitlines()
    assert unseeded[0].startswith("| concept | method | steps |") and len(unseeded) == 3


def test_bench_train_reads_the_steady_step_time_from_the_trainers_scalars(tmp_path):
    from reference_loop import trainer_timing
    from torch.utils.tensorboard import SummaryWriter

    # the trainer logs steps done / seconds since the loop started: 2 s for step 1, then 0.5 s per step
    writer = SummaryWriter(str(tmp_path))
    for step in range(1, 11):
        elapsed = 2.0 + 0.5 * (step - 1)
        writer.add_scalar("speed/steps_per_second", step / elapsed, step)
        writer.add_scalar("memory/peak_cuda_allocated_mib", 100.0 * step, step)
    writer.close()
    per_step, first_wall, peak = trainer_timing(tmp_path, warmup=3)
    assert per_step == pytest.approx(0.5, rel=1e-5)
    assert peak == 1000.0 and first_wall > 0


def test_the_reference_benchmark_sees_a_deliberately_slowed_step(tmp_path, monkeypatch):
    """sdtune and the reference loop on the tiny model; then sdtune with 400 ms slept in every step: the benchmark
    must report that step as about 400 ms slower (counted once, not missed nor twice) and the ratio to the reference
    as higher."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bench = _tool("bench_train")
    argv = ["--reference", "--preset", "tiny", "--resolution", "32", "--steps", "9", "--warmup", "3"]
    argv += ["--repeats", "1", "--methods", "lora", "--rank", "2", "--json", str(tmp_path / "r.json")]
    (plain,) = bench.main(argv)
    (slowed,) = bench.main([*argv, "--slow-ms", "400"])
    assert "error" not in plain and "error" not in slowed, (plain, slowed)
    added = slowed["sdtune_seconds_per_step"] - plain["sdtune_seconds_per_step"]
    # a benchmark that missed the sleep (~0) or counted it twice (~0.8 s) falls outside these bounds; the margin
    # above is wide because the suite's other worker can slow the compute part of the step (0.04 s -> 0.1 s seen)
    assert 0.400 - 0.05 < added < 0.600, (plain, slowed)
    for row in (plain, slowed):  # the ratio is sdtune over the reference measured in the same alternation
        ratio = row["sdtune_seconds_per_step"] / row["reference_seconds_per_step"]
        assert row["ratio_seconds_per_step"] == pytest.approx(ratio)
    assert slowed["ratio_seconds_per_step"] > plain["ratio_seconds_per_step"] + 0.5
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["method"] == "lora"
    for row in (plain, slowed):
        assert row["sdtune_peak_mib"] > 100 and row["reference_peak_mib"] > 100
        assert row["sdtune_first_step_seconds"] > row["sdtune_seconds_per_step"]


def test_compose_bench_refuses_bad_arguments_and_tabulates_rows(capsys, tmp_path):
    bench = _tool("compose_bench")
    argv = ["--identity", str(tmp_path / "no.safetensors"), "--style", str(tmp_path / "none.safetensors")]
    with pytest.raises(SystemExit) as exited:
        bench._arguments([*argv, "--weights", "0.5,x", "--identity-concept", "blue_moon", "--style-concept", "fuzzy"])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert "--identity: " in message and "no.safetensors is not a file" in message
    assert "none.safetensors is not a file" in message
    assert "--weights: '0.5,x' is not a comma-separated list of finite numbers" in message
    assert "--identity-concept: blue_moon unknown; choose from red_star, purple_triangle" in message
    assert "--style-concept: fuzzy unknown; choose from hollow, hollow_adjective, hollow_suffix" in message
    for name in ("no.safetensors", "none.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert bench._arguments(argv).sdtune_weight == 1.0  # the AdapterPipeline route's style weight, unless asked
    with pytest.raises(SystemExit):
        bench._arguments([*argv, "--sdtune-weight", "nan", "--weights", "0.5,inf"])
    message = capsys.readouterr().err
    assert "--sdtune-weight: nan is not a finite number; give e.g. 0.75" in message
    assert "--weights: '0.5,inf' is not a comma-separated list of finite numbers" in message
    parsed = bench._arguments([*argv, "--sdtune-weight", "0.75", "--style-concept", "hollow_adjective_no_cross"])
    assert parsed.sdtune_weight == 0.75 and parsed.style_concept.left_out == ("cross",)
    rows = [
        {"route": "sdtune AdapterPipeline", "identity_weight": 1.0, "style_weight": 1.0, "both": 0.75,
         "identity": 1.0, "style": 0.75},
    ]  # fmt: skip
    table = bench.markdown_table(rows).splitlines()
    assert table[0].startswith("| route | identity weight | style LoRA weight | identity and style |")
    assert table[2] == "| sdtune AdapterPipeline | 1.00 | 1.00 | 0.75 | 1.00 | 0.75 |"
