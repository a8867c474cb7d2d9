"""The package's layers (ARCHITECTURE.md) hold: import-linter's contracts in pyproject.toml pass on the package,
and fail on a copy of it given one upward import. The README's test command runs `lint-imports` too."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package found at `root` (a copy goes first on the path), with the project's contracts."""
    return subprocess.run([*LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": ""}, capture_output=True, text=True, timeout=300)


def copy_package(to: Path) -> Path:
    shutil.copytree(ROOT / "mmdit_probe", to / "mmdit_probe", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", to / "pyproject.toml")
    return to


def test_the_layer_contracts_hold():
    pytest.importorskip("importlinter")
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("validation.py", "from .probe import Probe"),  # a low layer reaching for the facade
    ("sampling/solve.py", "from ..editing.base import EditResult"),  # plumbing reaching into an editor
    ("maps.py", "from .toy.world import render"),  # the core reaching into the toy world
])
def test_an_upward_import_breaks_a_contract(tmp_path, module, upward):
    pytest.importorskip("importlinter")
    root = copy_package(tmp_path)
    path = root / "mmdit_probe" / module
    path.write_text(path.read_text() + f"\n\ndef _upward():\n    {upward}\n")
    result = lint(root)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
