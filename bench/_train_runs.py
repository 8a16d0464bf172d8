"""Shared by the training benchmarks: run `crescent train` on the demo corpus and read back its MLflow history."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(overrides: list[str], tag: str, workdir: Path | None = None) -> dict:
    """Run tiny-cpu with `overrides`; returns {"uri", "experiment", "run_id", "dir"}."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"crescent-bench-{tag}-"))
    uri = f"sqlite:///{workdir}/mlruns.db"
    args = [sys.executable, "-m", "app.cli", "train", "--config", str(ROOT / "app/configs/tiny-cpu.yaml"),
            "--run.dir", str(workdir / "run"), "--run.tracking_uri", uri, "--run.experiment", tag,
            "--run.progress_bar", "false", "--data.demo_root", str(ROOT / "data/demo"), *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training failed ({tag}):\n{result.stderr[-4000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(tag).experiment_id])[0]
    return {"uri": uri, "experiment": tag, "run_id": run.info.run_id, "dir": workdir, "client": client}


def history(run: dict, key: str) -> list[tuple[int, float, int]]:
    """[(step, value, timestamp_ms)] of a metric."""
    return [(m.step, m.value, m.timestamp) for m in run["client"].get_metric_history(run["run_id"], key)]
