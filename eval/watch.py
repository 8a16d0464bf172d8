"""`crescent eval watch`: evaluate every export checkpoint not yet evaluated, once, in step order, then exit.

What is done lives in MLflow (the `crescent.eval.step-N` tag, see `eval/tracking.py`), so a CronJob pod with no
local state knows where to continue. While a watcher evaluates a checkpoint it holds an exclusive, non-blocking
`fcntl` lock on `DIR/.eval-locks/step-N.lock`; a second watcher skips that checkpoint, and after taking a lock a
watcher checks MLflow again, so a checkpoint finished by another watcher in the meantime is not redone. While it
works the tag says `running:HOST:PID:UNIXTIME`; watchers on other machines (where a file lock on a shared volume
may not hold) skip such a checkpoint until the marker is older than `stale_after_s` (a crashed watcher). A
checkpoint that cannot be loaded (or whose evaluation raises) is recorded as failed and the others continue.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from components.checkpoint import export_step, list_exports, read_metadata
from eval.runner import EvalRequest, check_code_execution, evaluate_checkpoint, format_table
from eval.tracking import EvalTracker, resolve_tracking_uri

log = logging.getLogger(__name__)
LOCK_DIR = ".eval-locks"


@dataclass
class WatchReport:
    evaluated: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # already done, failed before, or locked by another watcher


@contextmanager
def checkpoint_lock(checkpoints_dir: Path, name: str) -> Iterator[bool]:
    """Yields True when this process holds the checkpoint's lock, False when another process does."""
    lock_dir = checkpoints_dir / LOCK_DIR
    lock_dir.mkdir(exist_ok=True)
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
          stale_after_s: float = 6 * 3600) -> WatchReport:
    check_code_execution(request)
    root = Path(checkpoints_dir)
    if not root.is_dir():
        raise ValueError(f"--checkpoints={str(root)!r} is not a directory")
    report = WatchReport()
    trackers: dict[str, EvalTracker] = {}
    for path in list_exports(root):
        step = export_step(path)
        try:
            metadata = read_metadata(path)
        except (OSError, ValueError) as err:
            metadata = {"step": step, "unreadable": str(err)}
        uri = resolve_tracking_uri(tracking_uri, metadata)
        tracker = trackers.setdefault(uri, EvalTracker(uri))
        with checkpoint_lock(root, path.name) as held:
            # Under the lock: the run lookup (it may create the checkpoint's `eval` run) and the status check.
            run_id = tracker.target_run(metadata, path) if held else None
            if not held or _finished(tracker.status(run_id, step), retry_failed, stale_after_s):
                report.skipped.append(step)
                continue
            tracker.mark(run_id, step, f"running:{os.uname().nodename}:{os.getpid()}:{int(time.time())}")
            try:
                if "unreadable" in metadata:
                    raise ValueError(metadata["unreadable"])
                doc = evaluate_checkpoint(path, request)
            except Exception as err:  # noqa: BLE001 - a bad checkpoint must not block the rest
                log.error("evaluation of %s failed: %s", path, err)
                tracker.mark(run_id, step, f"failed: {type(err).__name__}: {err}")
                report.failed.append(step)
                continue
            print(format_table(doc), flush=True)
            if results_dir is not None:
                out = Path(results_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{path.name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
            tracker.log_results(run_id, doc)
            tracker.mark(run_id, step, "done")
            report.evaluated.append(step)
    return report


def _finished(status: str | None, retry_failed: bool, stale_after_s: float) -> bool:
    """Whether a checkpoint needs no work now: done, failed (unless retrying), or running and not stale."""
    if status is None:
        return False
    if status.startswith("running:"):
        try:
            started = float(status.rsplit(":", 1)[1])
        except ValueError:
            return False
        return time.time() - started < stale_after_s
    return status == "done" or (status.startswith("failed") and not retry_failed)
