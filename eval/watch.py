"""`crescent eval watch`: evaluate what is left to do on every export checkpoint, in step order, then exit.

What is done lives in MLflow, per task (the `crescent.eval.step-N.TASK` tags, see `eval/tracking.py`), so a CronJob
pod with no local state knows where to continue. A task is left to do when it was never attempted, failed fewer
than `max_attempts` times (`--retry-failed` ignores that limit), or was skipped for want of data that is there now.
Each task's results are logged as soon as it finishes; a task that fails is recorded and the others still run, and
a task with no data is skipped with its reason (a warning on the run). A checkpoint that cannot be loaded counts as
a failed attempt of each task it was to run.

While a watcher evaluates a checkpoint it holds an exclusive, non-blocking `fcntl` lock on
`DIR/.eval-locks/step-N.lock`; a second watcher skips that checkpoint, and after taking a lock a watcher reads
MLflow again, so work finished by another watcher in the meantime is not redone. While it works the checkpoint's tag
says `running:HOST:PID:UNIXTIME`; watchers on other machines (where a file lock on a shared volume may not hold)
skip such a checkpoint until the marker is older than `stale_after_s` (a crashed watcher), and say so. A watcher
that is interrupted (Ctrl-C, or SIGTERM, which raises `SystemExit(143)` while `watch` runs) replaces its marker with
`interrupted (...)` on the way out; and a marker that names this host with a process that is gone (or this very
process) is taken over at once by the watcher holding the checkpoint's lock.

A checkpoints folder that does not exist yet (training creates it at its first export) is nothing to do (rc 0).

An MLflow store that fails (down, 503, timeout) stops the watch with `TrackingFailed` naming the store and what was
done so far: results are never moved elsewhere because the training run could not be read.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlflow.exceptions import MlflowException

from components.checkpoint import export_step, list_exports, read_metadata
from eval.runner import EvalRequest, check_code_execution, check_task_names, evaluate_checkpoint, format_table
from eval.tracking import EvalTracker, TrackingFailed, describe_error, failed_attempts, resolve_tracking_uri

log = logging.getLogger(__name__)
LOCK_DIR = ".eval-locks"


@dataclass
class WatchReport:
    evaluated: list[int] = field(default_factory=list)  # at least one task evaluated and logged
    failed: list[int] = field(default_factory=list)  # at least one task failed (recorded, retried later)
    skipped: list[int] = field(default_factory=list)  # nothing left to do, or locked by another watcher
    note: str | None = None  # why there was nothing to look at (the exports folder is not there yet)


@contextmanager
def checkpoint_lock(lock_dir: Path, name: str) -> Iterator[bool]:
    """Yields True when this process holds the checkpoint's lock (in `lock_dir`), False when another process does."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename}:{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def watch(checkpoints_dir: str | Path, request: EvalRequest, *, tracking_uri: str | None = None,
          results_dir: str | Path | None = None, retry_failed: bool = False,
          stale_after_s: float = 6 * 3600, max_attempts: int = 3, lock_dir: str | Path | None = None) -> WatchReport:
    """`lock_dir`: where the checkpoints' locks live (default `checkpoints_dir/.eval-locks`); another folder lets
    the checkpoints be mounted read-only (the Kubernetes CronJob: one watcher at a time there, by Forbid)."""
    check_code_execution(request)
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"--max-attempts={max_attempts!r} must be an integer >= 1")
    root = Path(checkpoints_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--checkpoints={str(root)!r} is not a directory")
    check_task_names(request)
    report = WatchReport()
    if not root.exists():  # training creates its exports folder at its first export
        report.note = f"watch: {str(root)!r} does not exist yet: no exports to evaluate"
        return report
    locks = Path(lock_dir) if lock_dir is not None else root / LOCK_DIR
    with _sigterm_exits():
        _watch_all(root, locks, request, report, tracking_uri, results_dir, retry_failed, stale_after_s,
                   max_attempts)
    return report


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (a pod being stopped) raises SystemExit(143), so the running marker is reset on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch_all(root: Path, locks: Path, request: EvalRequest, report: WatchReport, tracking_uri: str | None,
               results_dir: str | Path | None, retry_failed: bool, stale_after_s: float, max_attempts: int) -> None:
    trackers: dict[str, EvalTracker] = {}
    for path in list_exports(root):
        step = export_step(path)
        try:
            metadata = read_metadata(path)
        except (OSError, ValueError) as err:
            metadata = {"step": step, "unreadable": str(err)}
        uri = resolve_tracking_uri(tracking_uri, metadata)
        try:
            _watch_checkpoint(locks, path, step, metadata, trackers.setdefault(uri, EvalTracker(uri)), request,
                              report, results_dir, retry_failed, stale_after_s, max_attempts)
        except MlflowException as err:
            done = (f"checkpoints evaluated and published so far: {report.evaluated}" if report.evaluated
                    else "nothing was evaluated or published")
            raise TrackingFailed(f"MLflow tracking store {uri} failed at {path.name}: {describe_error(err)}; "
                                 f"stopped ({done}): the next watch continues from there") from err


def _watch_checkpoint(locks: Path, path: Path, step: int, metadata: dict, tracker: EvalTracker,
                      request: EvalRequest, report: WatchReport, results_dir: str | Path | None, retry_failed: bool,
                      stale_after_s: float, max_attempts: int) -> None:
    with checkpoint_lock(locks, path.name) as held:
        # Under the lock: the run lookup (it may create the checkpoint's `eval` run) and the status check.
        if not held:
            log.info("%s: skipped: another watcher on this machine holds its lock", path.name)
            report.skipped.append(step)
            return
        run_id = tracker.target_run(metadata, path)
        busy = _running_elsewhere(tracker.status(run_id, step), stale_after_s)
        if busy:
            log.warning("%s: skipped: %s", path.name, busy)
            report.skipped.append(step)
            return
        statuses = tracker.task_statuses(run_id, step)
        todo = [t for t in request.tasks if _left_to_do(statuses.get(t), retry_failed, max_attempts)]
        specs = replace(request, tasks=todo).specs() if todo else []
        for spec in specs:
            if spec.skip and statuses.get(spec.name) != f"skipped: {spec.skip}":
                log.warning("%s: %s skipped: %s", path.name, spec.name, spec.skip)
                tracker.mark_task(run_id, step, spec.name, f"skipped: {spec.skip}")
        runnable = [s.name for s in specs if not s.skip]
        if not runnable:
            report.skipped.append(step)
            return
        _evaluate(tracker, run_id, path, step, metadata, replace(request, tasks=runnable), statuses, report,
                  results_dir)


def _evaluate(tracker: EvalTracker, run_id: str, path: Path, step: int, metadata: dict, request: EvalRequest,
              statuses: dict[str, str], report: WatchReport, results_dir: str | Path | None) -> None:
    """Run the checkpoint's remaining tasks, logging each one's results as soon as it is done; interrupted, the
    running marker is replaced by `interrupted (...)` so that a restart evaluates what is left at once."""
    tracker.mark(run_id, step, f"running:{os.uname().nodename}:{os.getpid()}:{int(time.time())}")
    published: list[str] = []
    try:
        _evaluate_marked(tracker, run_id, path, step, metadata, request, statuses, report, results_dir, published)
    except BaseException as err:
        reason = "Ctrl-C" if isinstance(err, KeyboardInterrupt) else (
            f"exit {err.code}" if isinstance(err, SystemExit) else type(err).__name__)
        status = f"interrupted ({reason})" + (f"; done {','.join(published)}" if published else "")
        try:
            tracker.mark(run_id, step, status)
        except Exception as mark_err:  # noqa: BLE001 - the original error is what the user must see
            log.warning("%s: could not reset its running marker: %s", path.name, mark_err)
        raise


def _evaluate_marked(tracker: EvalTracker, run_id: str, path: Path, step: int, metadata: dict, request: EvalRequest,
                     statuses: dict[str, str], report: WatchReport, results_dir: str | Path | None,
                     published: list[str]) -> None:

    def publish(task: str, doc: dict) -> None:
        tracker.log_results(run_id, doc, [task])
        tracker.mark_task(run_id, step, task, "done")
        published.append(task)

    try:
        if "unreadable" in metadata:
            raise ValueError(metadata["unreadable"])
        doc = evaluate_checkpoint(path, request, on_result=publish)
        failed = doc["failed"]
    except Exception as err:  # noqa: BLE001 - a bad checkpoint must not block the rest
        log.error("evaluation of %s failed: %s", path, err)
        doc, failed = None, {task: f"{type(err).__name__}: {err}" for task in request.tasks if task not in published}
    done = [task for task in published if task not in failed]
    if doc is not None:
        print(format_table(doc), flush=True)
        if results_dir is not None:
            out = Path(results_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{path.name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if done:
        report.evaluated.append(step)
    if failed:
        report.failed.append(step)
    tracker.record_failures(run_id, step, failed, statuses)
    tracker.mark(run_id, step, "; ".join([f"done {','.join(done)}"] * bool(done)
                                         + [f"failed {','.join(failed)}"] * bool(failed)))


def _left_to_do(status: str | None, retry_failed: bool, max_attempts: int) -> bool:
    if status is None or status.startswith("skipped"):
        return True  # never attempted, or skipped for want of data (resolved again: the data may be there now)
    if status.startswith("failed"):
        return retry_failed or failed_attempts(status) < max_attempts
    return status != "done"


def _running_elsewhere(status: str | None, stale_after_s: float) -> str | None:
    """Why the checkpoint is left alone: another watcher marked it running, recently enough to trust it is still
    alive; None to evaluate it. Called with the checkpoint's lock held, so a marker of this host whose process is
    gone (or is this one) is a watcher that was killed: taken over."""
    if status is None or not status.startswith("running:"):
        return None
    try:
        _, host, pid, started = status.split(":")
        pid, started = int(pid), float(started)
    except ValueError:
        return None
    age = time.time() - started
    if age >= stale_after_s:
        log.warning("taking over a checkpoint marked %r %.1f h ago (older than --stale-after-hours)", status,
                    age / 3600)
        return None
    if host == os.uname().nodename and (pid == os.getpid() or not _alive(pid)):
        log.warning("taking over a checkpoint marked %r: that process on this host is gone", status)
        return None
    return (f"marked running by {host} pid {pid} {age / 60:.0f} min ago; taken over when that marker is "
            f"{stale_after_s / 3600:g} h old (--stale-after-hours)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
