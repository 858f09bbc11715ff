"""The code passes ruff with the project's configuration (pyproject.toml: pycodestyle, pyflakes, isort)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = pytest.importorskip("ruff")
    proc = subprocess.run([ruff.find_ruff_bin(), "check", "--no-cache", "--output-format", "concise",
                           "lrpc", "tests", "models", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
