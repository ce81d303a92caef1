"""The code's shape, as docs/ and ARCHITECTURE promise it: light commands stay light, one module renames files into
place, family facts live in the family records, functions stay small, and a family is data."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune import families, formats, models

PACKAGE = Path(__file__).resolve().parents[2] / "sdtune"
REPO_ROOT = PACKAGE.parent


def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


def test_validate_imports_neither_the_training_loop_nor_heavy_libraries(tiny_base):
    script = (
        "import json, sys\n"
        "from sdtune.cli import main\n"
        f"code = main(['validate', 'configs/quickstart_ti.yaml', 'base_model={tiny_base['folder']}'])\n"
        "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    loaded = set(report["modules"])
    assert "sdtune.preflight" in loaded
    assert not loaded & {"sdtune.train", "sdtune.samples", "diffusers", "peft", "accelerate"}


def _renames(tree: ast.Module) -> list[int]:
    """Lines calling os.replace / os.rename / shutil.move / Path.rename, or `x.replace(target)` (Path.replace; str
    and datetime replace take two arguments or keywords)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        os_call = owner == "os" and node.func.attr == "replace"
        path_replace = node.func.attr == "replace" and len(node.args) == 1 and not node.keywords
        if node.func.attr in ("rename", "move") or os_call or path_replace:
            lines.append(node.lineno)
    return lines


def test_one_module_renames_files_into_place():
    renaming = {path.name: _renames(tree) for path, tree in _modules().items() if _renames(tree)}
    assert set(renaming) == {"atomic.py"}, renaming


def test_family_facts_live_in_the_family_records():
    pattern = re.compile(r'"sd1"|sd_v1|stable-diffusion-v1|lora_te_')
    hits = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in sorted(PACKAGE.rglob("*"))
        if path.is_file() and path.suffix in (".py", ".json")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits and all(hit.startswith("families.py:") for hit in hits), hits


def test_functions_stay_small_and_the_loop_file_short():
    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []
    assert len((PACKAGE / "train.py").read_text(encoding="utf-8").splitlines()) < 550


def test_every_user_facing_error_shares_one_base():
    from sdtune import compat, config, jobs, labeling, prompts, state, train
    from sdtune.errors import SdtuneError

    errors = (
        config.ConfigError, models.ModelError, formats.FormatError, compat.IncompatibleArtifactError, jobs.JobError,
        prompts.PromptError, labeling.LabelError, state.StateError, train.TrainingStopped, train.TrainingInterrupted,
    )  # fmt: skip
    assert all(issubclass(error, SdtuneError) for error in errors)
    assert (train.TrainingStopped.exit_code, train.TrainingInterrupted.exit_code, config.ConfigError.exit_code) == (
        1, 130, 2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_base):
    return models.load_base_model(tiny_base["folder"])


def test_a_family_record_decides_kohya_names(tiny):
    """What SDXL's record will say (LDM UNet names, its own text-encoder prefix) is read from the record alone."""
    ldm = dataclasses.replace(
        families.SD1,
        unet_key_style="ldm",
        text_encoders=(dataclasses.replace(families.SD1.text_encoders[0], kohya_prefix="lora_te1_"),),
    )
    diffusers_names = formats.module_key_map(families.SD1, tiny.adaptable())
    ldm_names = formats.module_key_map(ldm, tiny.adaptable())
    assert len(ldm_names) == len(diffusers_names)  # one name per module either way
    expected = {  # FORMATS.md's SDXL examples have the same block numbering as this 2-layer UNet
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks"
        ".0.attn1.to_q",
        "lora_unet_output_blocks_0_0_in_layers_2": "up_blocks.0.resnets.0.conv1",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_te1_text_model_encoder_layers_0_mlp_fc2": "encoder.layers.0.mlp.fc2",
    }
    for key, module_path in expected.items():
        assert ldm_names[key][1] == module_path, key
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in diffusers_names
    assert not any(key.startswith(families.SD1.text_encoders[0].kohya_prefix) for key in ldm_names)
