"""`make lint` as part of `make test`: ruff (pinned in the dev extra, configured in pyproject.toml) finds nothing in
the project's Python, so a lint error fails CI instead of waiting for someone to run `make lint`; and the check is
live: the same configuration flags a loop variable captured late by a closure (B023, the error this test was added
after)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing_in_the_project():
    proc = subprocess.run([*RUFF, "check", "app", "components", "eval", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_with_the_projects_configuration_flags_a_late_bound_loop_variable(tmp_path):
    bad = tmp_path / "late.py"
    bad.write_text("fs = []\nfor i in range(3):\n    fs.append(lambda: i)\n")
    proc = subprocess.run([*RUFF, "check", "--config", str(ROOT / "pyproject.toml"), str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "B023" in proc.stdout, proc.stdout + proc.stderr
