"""What another user (the image's uid 10001) needs of an export, and the training commands
without their extra."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from export.checkpoint import model_from_checkpoint
from export.manifest import load_verified
from export.onnx_export import export_version


def test_a_version_folder_is_readable_by_any_user_under_the_usual_umask(
    tmp_path: Path, trained: tuple[Path, dict[str, Any]]
) -> None:
    old = os.umask(0o022)
    try:
        version = export_version(model_from_checkpoint(trained[1]), tmp_path, "tiny")
    finally:
        os.umask(old)
    for path in [version, *version.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o004, f"{path} is {oct(mode)}: other users cannot read it"
        if path.is_dir():
            assert mode & 0o001, f"{path} is {oct(mode)}: other users cannot enter it"
    assert not [p for p in version.parent.iterdir() if p.name.startswith(".")]  # no staging left
    load_verified(version)


# The console scripts as pip writes them: `from export.entry import train; sys.exit(train())`.
GUARDED = {"vae-train": "train", "vae-evaluate": "evaluate", "vae-export": "export"}


@pytest.mark.parametrize("command", sorted(GUARDED))
def test_training_commands_without_torch_say_which_extra_in_one_line(command: str) -> None:
    # A `torch` that cannot be found: a module finder at the front of sys.meta_path.
    script = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        f"from export.entry import {GUARDED[command]} as main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{command}: needs the training extra") and "torch" in lines[0]
