"""The tree passes `ruff check` and `ruff format --check` (ruff's version is pinned in the dev extra, so that every
machine formats alike)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]' installs the pinned version)")
    return [exe]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    proc = subprocess.run(
        [*_ruff(), *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    report = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 0, f"ruff {' '.join(command)}: " + "\n".join(report[-40:])
