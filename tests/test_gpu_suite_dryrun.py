"""bench/gpu_suite.sh --dry-run on the CPU, so that the GPU suite never rots before a GPU is lent: the gpu tests
import and are collected (and skipped), every measurement runs at a toy size, the report has its format and the
printed `name: value` lines agree with it; bad usage is refused with a message naming the problem; the format check
finds a broken report; and the budgets add up to less than the issue's 8 minutes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _gpu_suite as gpu_suite

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_suite.sh"
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT


def _suite(*args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    proc = _suite("--dry-run", env={"OUT": str(out)})  # $OUT is the default output directory
    return proc, out


@pytest.mark.slow
def test_dry_run_collects_the_gpu_tests_and_runs_every_measurement(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    tests = report["tests"]
    assert report["dry_run"] is True and tests["source"] == "junit"
    assert tests["collected"] >= 40 and tests["skipped"] == tests["collected"]  # no CUDA: every one skipped
    assert tests["failed"] == tests["errors"] == 0 and tests["exit_code"] == 0
    assert all(r.endswith(": needs a CUDA device") for r in tests["skip_reasons"])
    assert set(report["measurements"]) == set(gpu_suite.BUDGET_S)
    assert all(m["ok"] and m["error"] is None for m in report["measurements"].values()), report["measurements"]
    for figure in report["figures"]:
        assert isinstance(figure["value"], float) and figure["value"] > 0, figure
        assert figure["status"] == ("not judged" if figure["goal"] else None), figure
    assert report["environment"]["cuda_available"] is False


@pytest.mark.slow
def test_dry_run_output_files_and_lines(dry_run):
    proc, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu-tests.log", "gpu-tests.xml", "measure.log", "report.json", "report.md", "suite.log"]
    assert len(files) <= 8 and all(DEVICE_NAME.match(f) for f in files) and all(p.is_file() for p in out.iterdir())
    lines = proc.stdout.splitlines()
    assert "gpu_suite_format_ok: 1" in lines
    assert re.fullmatch(r"gpu_suite_wall_s: \d+", lines[-1])
    assert "gpu_goals_met: dry-run" in lines
    assert "small_mfu: " in proc.stdout and re.search(r"^small_mfu: \S+  goal >= 0.35 not judged$", proc.stdout, re.M)
    assert gpu_suite.check(out, out / "measure.log") == []
    assert (out / "suite.log").read_text().count("gpu_goals_met: dry-run") == 1


@pytest.mark.slow
def test_the_format_check_finds_a_broken_report(dry_run, tmp_path):
    _, out = dry_run
    for name in ("report.json", "report.md", "measure.log"):
        (tmp_path / name).write_text((out / name).read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    report["figures"][1]["value"] = "fast"
    (tmp_path / "report.json").write_text(json.dumps(report))
    md = (tmp_path / "report.md").read_text()
    (tmp_path / "report.md").write_text(re.sub(r"^\| ns_speedup_vs_torch \|.*\n", "", md, flags=re.M))
    log = (tmp_path / "measure.log").read_text()
    (tmp_path / "measure.log").write_text(re.sub(r"^moe_speedup_vs_transformers: \S+", "moe_speedup_vs_transformers: 9",
                                                 log, flags=re.M))
    problems = gpu_suite.check(tmp_path, tmp_path / "measure.log")
    assert "report.json: figure small_mfu value='fast' is not a finite number" in problems
    assert "report.md: no table row for ns_speedup_vs_torch" in problems
    assert any(p.startswith("log: moe_speedup_vs_transformers printed 9, report.json has ") for p in problems)
    assert len(problems) == 3, problems


@pytest.mark.parametrize("args,env,message", [
    (["--dry-run"], {}, "gpu_suite.sh: no output directory: set OUT or pass --out DIR"),
    (["--bogus"], {"OUT": "/tmp"}, "gpu_suite.sh: unknown argument '--bogus'"),
    (["--out"], {}, "gpu_suite.sh: --out needs a directory"),
    (["--only", "speed", "--out", "/tmp"], {}, "gpu_suite.sh: --only 'speed' is not a measurement; choose peak, "
                                                "train, optimizer, newton_schulz or moe"),
])
def test_bad_usage_is_refused_with_exit_2_and_the_reason(args, env, message):
    proc = _suite(*args, env=env, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == message
    assert "Usage: bench/gpu_suite.sh" in proc.stderr


def test_without_cuda_the_real_run_refuses_and_points_to_dry_run(tmp_path):
    proc = _suite(env={"OUT": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2
    assert "gpu_suite.sh: no CUDA device visible to" in proc.stdout
    assert "run with --dry-run to check the suite on a CPU" in proc.stdout
    assert (tmp_path / "suite.log").is_file()  # the log went to $OUT


def test_budgets_fit_the_issues_eight_minutes():
    text = SCRIPT.read_text()
    tests_budget, grace = (int(re.search(rf"^{name}=(\d+)", text, re.M).group(1))
                           for name in ("TESTS_BUDGET_S", "KILL_GRACE_S"))
    assert tests_budget + grace + sum(gpu_suite.BUDGET_S.values()) <= 450  # 30 s for start-up and the report


def test_the_tests_count_is_read_from_pytests_log_when_it_left_no_xml(tmp_path):
    log = tmp_path / "gpu-tests.log"
    log.write_text("tests/test_gpu_kernels.py::test_a PASSED [ 10%]\ntests/test_gpu_kernels.py::test_b FAILED "
                   "[ 20%]\ntests/test_gpu_attention.py::test_c[bf16] SKIPPED (x) [ 30%]\nnoise PASSED\n")
    tests = gpu_suite.read_tests(str(tmp_path / "missing.xml"), str(log), 124, 200.0)
    assert (tests["collected"], tests["passed"], tests["failed"], tests["skipped"]) == (3, 1, 1, 1)
    assert tests["failures"] == ["tests/test_gpu_kernels.py::test_b"] and tests["exit_code"] == 124


def test_a_killed_or_failing_test_run_fails_the_suite_and_skipped_tests_do_not(tmp_path):
    log = tmp_path / "gpu-tests.log"
    log.write_text("tests/test_gpu_kernels.py::test_a PASSED [ 10%]\n")
    killed = gpu_suite.read_tests(None, str(log), 124, 190.0)  # every finished test passed, the rest never ran
    assert killed["failed"] == 0 and not gpu_suite.tests_ok(killed)
    assert gpu_suite.tests_ok(gpu_suite.read_tests(None, str(log), 0, 10.0))
    assert not gpu_suite.tests_ok(gpu_suite.read_tests(None, str(tmp_path / "none.log"), 5, 1.0))  # none collected
    assert gpu_suite.tests_ok(gpu_suite.read_tests(None, None, None, None))  # --skip-tests
