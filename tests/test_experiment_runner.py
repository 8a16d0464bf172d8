"""`crescent experiment run` end to end with real training runs (tiny budgets) and a real MLflow store: resume
after the runner is killed mid-grid reruns only the unfinished points; the lr sweep extends past its edge; a
failing point is reported while the rest complete; the report is rebuilt from MLflow alone."""
from __future__ import annotations

import csv
import math
import signal
import subprocess
import time
from pathlib import Path

import experiment_helpers as eh
import pytest
import train_helpers as th

pytestmark = [pytest.mark.slow, pytest.mark.chain]  # one training process after another: handed out first


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return th.build_corpus(tmp_path_factory.mktemp("corpus"))


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _finished(uri: str) -> dict[str, str]:
    return {p: r.info.run_id for p, runs in eh.children(uri).items() for r in runs if r.info.status == "FINISHED"}


def test_killed_runner_resumes_only_the_unfinished_points(corpus, tmp_path):
    spec = eh.write_spec(tmp_path, corpus, [{"name": "muon", "overrides": {"model.optimizer": "muon"},
                                             "sweep": {"values": [0.5, 1.0, 2.0], "max_extensions": 0}}], steps=6)
    work, uri = tmp_path / "work", f"sqlite:///{tmp_path}/mlflow.db"
    args = ("run", str(spec), "--work-dir", str(work), "--tracking-uri", uri)
    runner = subprocess.Popen(eh.experiment_cmd(*args), cwd=tmp_path, env={**th.env(), "PYTHONPATH": str(th.ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(_finished(uri)) < 2 and runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runner.poll() is None, "the runner ended before it could be killed mid-grid"
    before = _finished(uri)
    assert len(before) == 2
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    # The training process of the point in flight gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and exits.
    deadline = time.monotonic() + 120
    while _processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(work)) == [], "an orphaned training process is still running"

    second = eh.run_experiment(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _finished(uri)
    assert len(after) == 4  # three sweep values, then the second seed at the best
    for point, run_id in before.items():
        assert after[point] == run_id  # not run again
        assert eh.launches(work, point) == 1
        assert f"{point}:" not in second.stderr
    relaunched = [p for p in after if p not in before]
    assert all(f"{p}:" in second.stderr for p in relaunched)
    children = eh.children(uri)
    for point in after:
        finished_runs = [r for r in children[point] if r.info.status == "FINISHED"]
        assert len(finished_runs) == 1
        tokens = finished_runs[0].data.metrics["train/tokens"]
        assert tokens == float(finished_runs[0].data.tags["crescent.tokens"]) == 6 * eh.STEP_TOKENS

    # The report again, from MLflow alone, into another folder: the same tables.
    parent = next(iter(children.values()))[0].data.tags["mlflow.parentRunId"]
    rebuilt = eh.run_experiment("report", parent, "--tracking-uri", uri, "--out", str(tmp_path / "again"),
                                cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    for table in ("summary.csv", "points.csv"):
        assert (tmp_path / "again" / table).read_text() == (work / "report" / table).read_text()


def test_sweep_extends_past_its_edge_and_a_failing_point_does_not_stop_the_rest(corpus, tmp_path):
    arms = [{"name": "muon", "overrides": {"model.optimizer": "muon"},
             "sweep": {"values": [0.01, 0.02, 0.04], "factor": 2.0, "max_extensions": 1}},
            # the same lr as `muon`, but a config `crescent train` refuses: both seeds fail
            {"name": "broken", "overrides": {"model.optimizer": "muon", "model.weight_decay": -1.0},
             "lr_from": "muon"}]
    spec = eh.write_spec(tmp_path, corpus, arms)
    work, uri = tmp_path / "work", f"sqlite:///{tmp_path}/mlflow.db"
    result = eh.run_experiment("run", str(spec), "--work-dir", str(work), "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # some points failed

    rows = {r["point"]: r for r in csv.DictReader(open(work / "report" / "points.csv"))}
    # lr 0.01..0.04 of a 3e-3 peak for 4 steps: the largest is best, so the sweep went one step further.
    assert rows["all__muon__lr0.08__s0"]["status"] == "finished"
    losses = {v: float(rows[f"all__muon__lr{v}__s0"]["final val loss"]) for v in ("0.01", "0.02", "0.04", "0.08")}
    assert losses["0.04"] < losses["0.01"] and math.isfinite(losses["0.08"])
    report = (work / "report" / "report.md").read_text()
    assert "best lr_scale 0.04 was at the high edge of ['0.01', '0.02', '0.04']: extended to 0.08" in report
    selected = "0.08" if losses["0.08"] < losses["0.04"] else "0.04"
    assert rows[f"all__muon__lr{selected}__s1"]["status"] == "finished"  # the second seed at the selected lr
    if selected == "0.08":
        assert "still at the high edge of the sweep after 1 extension(s)" in report

    for seed in (0, 1):
        point = f"all__broken__lr{selected}__s{seed}"
        assert rows[point]["status"] == "failed"
        assert f"point {point} failed" in report
        assert f"failed: {point}: crescent train exited 2" in result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent_id = next(iter(eh.children(uri).values()))[0].data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert "model.weight_decay=-1.0 must be >= 0" in parent.data.tags[f"crescent.failed.all__broken__lr{selected}__s0"]
    assert parent.data.tags["crescent.failed_points"] == "2" and parent.info.status == "FAILED"
    artifacts = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert {"report/report.md", "report/summary.csv", "report/points.md"} <= artifacts
