"""The one way sdtune writes files: the old file or the new one, never half of either; nothing left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from sdtune import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "lora.safetensors"
    atomic.write_text(target, "old", durable=True)
    with pytest.raises(RuntimeError), atomic.atomic_file(target, durable=True) as temporary:
        assert temporary.parent == tmp_path and str(os.getpid()) in temporary.name
        temporary.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "state" / "step-00000002"
    with atomic.atomic_dir(target, durable=True) as staging:
        (staging / "state.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-save")
    assert [p.name for p in target.iterdir()] == ["state.json"]
    with atomic.atomic_dir(target) as staging:
        (staging / "trainable.safetensors").write_bytes(b"y")
    assert [p.name for p in target.iterdir()] == ["trainable.safetensors"]  # the old folder is gone, not merged
    assert [p.name for p in target.parent.iterdir()] == ["step-00000002"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_files_get_the_permissions_the_users_umask_gives(tmp_path):
    script = (
        "import os, sys\n"
        "os.umask(0o027)\n"
        "from safetensors.torch import save_file\n"
        "import torch\n"
        "from sdtune import atomic\n"
        "with atomic.atomic_file(sys.argv[1]) as temporary:\n"
        "    save_file({'x': torch.zeros(1)}, str(temporary))\n"
    )
    target = tmp_path / "out.safetensors"
    subprocess.run([sys.executable, "-c", script, str(target)], check=True, timeout=120)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
