"""`crescent train` under faults, end to end on the small real corpus: SIGKILL while a checkpoint is written and
right after one, a full disk followed by a truncated newest checkpoint, a second run on the same directory, an
unreadable `run.resume`. After each, the same command run again finishes with the weights of an uninterrupted run (bitwise)
and MLflow holds every step's loss exactly once. The run directory sits on its own small tmpfs (a different
filesystem from $TMPDIR, as a PVC is in a pod); tests skip, saying why, where mounting is not allowed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_helpers as th
from mlflow.tracking import MlflowClient
from robust_helpers import alive, children, resize_tmpfs, tmpfs
from safetensors.torch import load_file

from app.checkpoint_io import verify_checkpoint
from app.runlock import LOCK_NAME

pytestmark = pytest.mark.slow  # several real training processes each

STEPS = 12
TOKENS = th.SEQ_LEN * 16 * STEPS
CKPT_BYTES = 7_814_466  # one resumable checkpoint of this config (weights + Muon/AdamW state)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted run: its final weights and its losses."""
    root = tmp_path_factory.mktemp("reference")
    uri, _ = th.train_once(root, corpus, TOKENS, data__num_workers=2)
    return {"weights": _weights(root / "run"), "loss": th.metric_history(uri, "test", "train/loss")}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((run_dir / "exports").glob("step-*"))[-1] / "model.safetensors")


def _assert_finished_like_reference(run_dir: Path, uri: str, reference: dict) -> None:
    ours = _weights(run_dir)
    assert ours.keys() == reference["weights"].keys()
    assert all(torch.equal(ours[k], reference["weights"][k]) for k in ours)
    assert th.metric_history(uri, "test", "train/loss") == reference["loss"]  # each step once, same values
    assert [s for s, _ in reference["loss"]] == list(range(1, STEPS + 1))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert not [n for n in names if "-v" in n or n.startswith(".")], names  # one naming scheme, no leftovers
    assert os.readlink(run_dir / "checkpoints" / "last.ckpt") == f"step-{STEPS:08d}.ckpt"
    assert not (run_dir / LOCK_NAME).exists()


def _start(config: Path, cwd: Path, tmpdir: Path) -> subprocess.Popen:
    env = {**th.env(), "PYTHONPATH": str(th.ROOT), "TMPDIR": str(tmpdir)}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "train", "--config", str(config)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(config: Path, cwd: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "app.cli", "train", "--config", str(config)]
    env = {**th.env(), "PYTHONPATH": str(th.ROOT), "TMPDIR": str(tmpdir)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `proc` the moment `ready()` is true (polled without sleeping: a checkpoint write takes ms)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_sigkill_while_and_right_after_a_checkpoint_is_written_loses_nothing(corpus, reference, tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    with tmpfs(tmp_path / "volume", "128m") as volume:
        uri = f"sqlite:///{tmp_path}/mlruns.db"
        # The store exists before the run, as a shared one does: MLflow creates a new sqlite store with a chain of
        # alembic migrations that a SIGKILL can cut in half (seen on a loaded machine), which is MLflow's limit,
        # not what this test is about.
        MlflowClient(uri).search_experiments()
        config = th.write_config(tmp_path / "config.yaml", corpus, volume / "run", uri, TOKENS, data__num_workers=2)
        checkpoints = volume / "run" / "checkpoints"

        # 1. Killed while it writes step 4: the temporary file is in the checkpoint folder, never under the name.
        proc = _start(config, tmp_path, tmpdir)
        workers: set[int] = set()
        seen = [0.0]

        def writing_step_4() -> bool:
            if time.monotonic() - seen[0] > 0.1:
                workers.update(children(proc.pid))
                seen[0] = time.monotonic()
            names = os.listdir(checkpoints) if checkpoints.is_dir() else []
            return any(n.startswith(".tmp-step-00000004") for n in names) or "step-00000004.ckpt" in names

        _kill_when(proc, writing_step_4)
        partial = sorted(n for n in os.listdir(checkpoints) if n.startswith(".tmp-"))  # caught mid-write, usually
        assert workers, "the data loader's worker processes were never seen"
        deadline = time.time() + 30
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if alive(pid)], "data-loader workers outlived the killed trainer"
        for path in checkpoints.glob("*step*.ckpt"):
            assert verify_checkpoint(path) is None, path  # whatever has a checkpoint's name is complete

        # 2. The same command resumes from the newest intact checkpoint; killed right after step 6 appears.
        proc = _start(config, tmp_path, tmpdir)
        _kill_when(proc, lambda: (checkpoints / "step-00000006.ckpt").exists())
        out = proc.stdout.read()
        assert "resuming from" in out and "Traceback" not in out
        for name in partial:  # what the killed write left is removed once the run directory is held again
            assert f"removed {checkpoints / name} (left by an interrupted save)" in out

        # 3. And once more: it resumes at step 6 (its metrics were journaled before the checkpoint) and finishes.
        done = _run(config, tmp_path, tmpdir)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resuming from {checkpoints}/step-00000006.ckpt" in done.stderr
        _assert_finished_like_reference(volume / "run", uri, reference)
    assert sorted(os.listdir(tmpdir)) == []  # no temporary files or plot folders left in $TMPDIR


def test_a_full_disk_stops_with_one_line_and_a_rerun_skips_a_damaged_checkpoint_and_resumes(corpus, reference,
                                                                                            tmp_path):
    with tmpfs(tmp_path / "volume", "20m") as volume:  # room for two checkpoints, not for the third
        uri = f"sqlite:///{tmp_path}/mlruns.db"
        config = th.write_config(tmp_path / "config.yaml", corpus, volume / "run", uri, TOKENS, data__num_workers=2)
        failed = _run(config, tmp_path, tmp_path)
        checkpoints = volume / "run" / "checkpoints"
        assert failed.returncode == 1
        last_line = failed.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"crescent train: error: not enough space in {checkpoints} to write "
                                    "step-00000006.ckpt: needs 8.4 MB, ")
        assert last_line.endswith(" MB free; the earlier checkpoints are intact: free space and run the same "
                                  "command again to resume")
        assert "Traceback" not in failed.stderr and "unavailable" not in failed.stderr  # MLflow is not blamed
        assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-00000002.ckpt",
                                                                 "step-00000004.ckpt"]
        assert all(verify_checkpoint(p) is None for p in checkpoints.iterdir())
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        assert run.info.status == "FAILED"
        assert [s for s, _ in th.metric_history(uri, "test", "train/loss")] == list(range(1, 7))  # none lost

        resize_tmpfs(volume, "128m")  # space freed
        newest = checkpoints / "step-00000004.ckpt"
        with open(newest, "r+b") as f:  # and the newest damaged, as a copy into the final name cut short leaves it
            f.truncate(CKPT_BYTES // 2)
        done = _run(config, tmp_path, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"skipping checkpoint {newest}: unreadable ({CKPT_BYTES // 2:,} bytes; " in done.stderr
        assert f"resuming from {checkpoints}/step-00000002.ckpt" in done.stderr
        _assert_finished_like_reference(volume / "run", uri, reference)  # step 4 saved again under its name


def test_a_second_run_on_the_same_directory_stops_naming_the_first_which_releases_it_at_exit(corpus, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    long = 20 * TOKENS  # the first run must still be training when the second one has started
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", uri, long)
    first = _start(config, tmp_path, tmp_path)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "step-00000002.ckpt").exists():
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        time.sleep(0.2)
    second = _run(config, tmp_path, tmp_path)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"crescent train: error: run directory {tmp_path / 'run'} is in use by pid {first.pid} on host ")
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 143, out
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released at exit, also after a preemption
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("test").experiment_id])) == 1


def test_an_unreadable_explicit_resume_checkpoint_is_one_line_naming_the_file(corpus, tmp_path):
    bad = tmp_path / "step-00000004.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", f"sqlite:///{tmp_path}/m.db",
                             TOKENS)
    result = th.crescent("train", "--config", str(config), "--run.resume", str(bad), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"crescent train: error: run.resume={str(bad)!r} cannot be resumed from: unreadable (27 bytes; RuntimeError: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory): truncated or not a "
        "checkpoint")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_resumed_from_another_runs_checkpoint_gets_its_own_mlflow_run_naming_where_it_began(corpus, tmp_path):
    # run.resume naming run A's checkpoint from a new run.dir is a branch: it used to continue A's MLflow run, whose
    # history then lost the branch's steps A already had and gained the rest.
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "a.yaml", corpus, tmp_path / "a", uri, TOKENS)
    th.crescent("train", "--config", str(config), "--trainer.max_steps", "4", cwd=tmp_path)
    client = MlflowClient(uri)
    (run_a,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    history_a = [(m.step, m.value) for m in client.get_metric_history(run_a.info.run_id, "train/loss")]
    start = tmp_path / "a" / "checkpoints" / "step-00000002.ckpt"
    th.crescent("train", "--config", str(config), "--run.dir", str(tmp_path / "b"), "--run.resume", str(start),
                "--model.lr_scale", "0.5", "--trainer.max_steps", "5", cwd=tmp_path)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])}
    assert len(runs) == 2
    (run_b,) = [r for run_id, r in runs.items() if run_id != run_a.info.run_id]
    assert [(m.step, m.value) for m in client.get_metric_history(run_a.info.run_id, "train/loss")] == history_a
    assert [m.step for m in client.get_metric_history(run_b.info.run_id, "train/loss")] == [3, 4, 5]
    assert run_b.data.tags["crescent.resumed_from_run_key"] == run_a.data.tags["crescent.run_key"]
    assert run_b.data.tags["crescent.resumed_from_step"] == "2"
    assert run_b.data.tags["crescent.resumed_from_checkpoint"] == str(start.resolve())
    assert run_b.data.params["model.lr_scale"] == "0.5" and run_b.info.status == "FINISHED"
