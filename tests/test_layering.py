"""The import graph points downwards: nothing below the engine imports it, objectives sit above the model, losses
and SSL methods, and registering every objective imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package or module (path relative to the repo) -> module prefixes it must never import
FORBIDDEN = {
    "vlp/losses": ("vlp.train", "vlp.objectives"),
    "vlp/model.py": ("vlp.train", "vlp.objectives"),
    "vlp/towers.py": ("vlp.train", "vlp.objectives"),
    "data_pipelines": ("vlp.train", "vlp.objectives", "vlp.eval", "vlp.export"),
    "vlp/eval": ("vlp.train",),
    "vlp/export": ("vlp.train",),
    "vlp/ssl": ("vlp.train", "vlp.objectives"),
    "vlp/objectives": ("vlp.train",),
    "adapters": ("vlp.train",),
    "vlp/checkpointing.py": ("vlp.train",),
    "vlp/distributed.py": ("vlp.train", "vlp.objectives", "vlp.model"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement of a file, at any depth (lazy imports count too)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return out


def violations(rules: dict[str, tuple[str, ...]]) -> list[str]:
    found = []
    for where, banned in rules.items():
        base = ROOT / where
        files = [base] if base.suffix == ".py" else sorted(base.rglob("*.py"))
        assert files, f"{where}: nothing to check"
        for f in files:
            for line, mod in imported_modules(f):
                if any(mod == b or mod.startswith(b + ".") for b in banned):
                    found.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    return found


def test_nothing_below_the_engine_imports_it():
    assert violations(FORBIDDEN) == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The walker sees lazy imports inside functions (the form an upward import usually takes)."""
    f = tmp_path / "pkg" / "mod.py"
    f.parent.mkdir()
    f.write_text("def g():\n    from vlp.train.trainer import Trainer\n    import vlp.train.engine as e\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations({"pkg": ("vlp.train",)}) == [
        "pkg/mod.py:2 imports vlp.train.trainer",
        "pkg/mod.py:2 imports vlp.train.trainer.Trainer",
        "pkg/mod.py:3 imports vlp.train.engine",
    ]


@pytest.mark.parametrize("module", ["vlp.objectives", "adapters.objective"])
def test_registering_objectives_imports_no_torch(module):
    """The command line, --help and the preflight checks know every objective before torch is loaded."""
    code = f"import sys, {module}, vlp.objectives as o; print(sorted(o.OBJECTIVES)); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    names, torch_loaded = out.splitlines()
    assert names == "['byol', 'clip', 'dino', 'llava-projector', 'moco', 'siglip', 'simclr']"
    assert torch_loaded == "False"
