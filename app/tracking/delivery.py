"""The background thread that owns all MLflow traffic for one run.

The training thread only appends records to an in-memory deque (``put``); this thread moves them into the
journal (disk), creates or resumes the run, and sends the journal in order (metrics, tags and params with
``MlflowClient.log_batch``, which splits a call into MLflow's batch limits itself). Any failure is retried with exponential backoff; only a record the server
rejects as invalid (HTTP 400 kind of errors) is dropped, and counted. A local disk that refuses the journal
(full) is reported as such; its records are delivered from memory meanwhile (journal.py). With ``resume_step``
(the checkpoint's step) steps a killed predecessor logged after it are not logged twice (resume.py).
The run's terminal status is set only once nothing is left to deliver: a run that ends with records still in
its journal (the finalize timeout ran out) stays RUNNING, and the process that continues it delivers them.

Records (JSON lists, compact on disk):
``["m", key, value, timestamp_ms, step]`` metric, ``["t", key, value]`` tag, ``["p", {key: value}]`` params
(checked against the run's params at delivery, see ``params.split_params``), ``["a", path, artifact_path,
staged]`` artifact (a staged copy is deleted after upload), ``["s", {key: value}, timestamp_ms]`` one system
metrics sample (system_metrics.py; its step is given here, after the run's last ``system/`` step), ``["i",
[dataset, ...]]`` dataset inputs and ``["lm", {...}]`` an export as a logged model (lineage.py).

This thread also runs MLflow's system-metrics monitor (``system_metrics_interval_s``), started once the client
exists (a new sqlite store is created by the first client) and stopped before the last records are sent.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from app.tracking.journal import Journal
from app.tracking.records import RunRecords
from app.tracking.resume import backlog_pairs, drop_after
from app.tracking.store import resolve_run

log = logging.getLogger(__name__)

# Errors that retrying cannot fix: the record itself is bad, or the run is gone.
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}


def _is_permanent(error: Exception) -> bool:
    return getattr(error, "error_code", None) in _PERMANENT_ERRORS


@dataclass(frozen=True)
class DeliverySettings:
    """What a delivery thread is given by its logger and never changes: where to deliver, what a new run is
    created with (tags also set again on a continued one), and the pace and bounds of delivery (logger.py's Args)."""

    tracking_uri: str
    experiment_name: str
    artifact_location: str | None
    run_name: str | None
    tags: dict[str, str]
    context_tags: dict[str, str]
    poll_interval_s: float
    max_backoff_s: float
    max_queue: int
    system_metrics_interval_s: float | None = None  # None: no system-metrics monitor


class RunDelivery(threading.Thread):
    """Delivers journaled records to one MLflow run; see the module docstring."""

    def __init__(
        self,
        settings: DeliverySettings,
        *,
        run_id: str | None,
        run_key: str,
        search_run_key: bool,
        journal_path: str,
        resume_step: int | None = None,
    ):
        super().__init__(name=f"crescent-mlflow-{run_key[:8]}", daemon=True)
        self.settings = settings
        # The run's identity: `retarget` may still change it until the run is resolved.
        self.run_id, self.run_key, self.resume_step = run_id, run_key, resume_step
        self._sender: RunRecords | None = None  # what each record becomes in MLflow, once the run is known
        self._monitor = None
        self._monitor_lock = threading.Lock()
        self.journal = Journal(journal_path)
        drop_after(self.journal, resume_step)
        self._backlog = backlog_pairs(self.journal)  # a previous process' undelivered metrics (resume.py)

        self.queue: collections.deque = collections.deque()
        self._put_lock = threading.Lock()
        self._journal_lock = threading.Lock()  # journal I/O only; never held across a network call
        self._closed = False
        self._progress = threading.Condition()
        self._wake = threading.Event()
        self._search_run_key = search_run_key
        self._client = None
        self._run_ready = False
        self._resolving = False
        # The run is created/continued only once the gate opens (first metric, artifact, flush, finalize):
        # until then ``retarget`` may still switch to the run of a checkpoint restored after setup.
        self.gate = threading.Event()
        self._isolate = 0  # after a rejected batch, send this many records one by one
        self._stop_deadline: float | None = None
        self._final_status: str | None = None

        self.enqueued = self.journal.pending_at_open  # records accepted (previous process' backlog included)
        self.delivered = 0  # records sent, or dropped as rejected, in journal order
        self.overflowed = 0  # records lost because the in-memory queue was full
        self.rejected = 0  # records the server refused as invalid (dropped)
        self.failures = 0  # failed attempts (each followed by a backoff)
        self._disk_warned = False
        self.last_error: str | None = None
        self.status_set: str | None = None

    @property
    def superseded(self) -> int:
        """Records of steps after the resume point that an earlier process already logged (resume.py)."""
        return self._sender.superseded if self._sender is not None else 0

    EMPTY_STATS = {"enqueued": 0, "delivered": 0, "pending": 0, "overflowed": 0, "rejected": 0,
                   "failures": 0, "last_error": None, "run_id": None, "status_set": None, "superseded": 0,
                   "in_memory": 0}

    def stats(self) -> dict[str, Any]:
        """enqueued/delivered/pending record counts, overflowed and rejected (lost) records, failed attempts,
        the last error, the run id and the status set at the end (None until then)."""
        return {
            "enqueued": self.enqueued, "delivered": self.delivered, "pending": self.enqueued - self.delivered,
            "overflowed": self.overflowed, "rejected": self.rejected, "failures": self.failures,
            "last_error": self.last_error, "run_id": self.run_id, "status_set": self.status_set,
            "superseded": self.superseded, "in_memory": self.journal.in_memory,
        }

    # ---- called from the training thread -------------------------------------------------------------
    def put(self, records: list[Any]) -> None:
        """Queue records; O(1), never blocks on I/O, never raises. Over ``max_queue`` they are counted lost."""
        with self._put_lock:
            if len(self.queue) + len(records) > self.settings.max_queue:
                self.overflowed += len(records)
                return
            self.queue.extend(records)
            self.enqueued += len(records)

    def pending_records(self) -> list[Any]:
        """Records accepted but not yet delivered, in order: the journal's backlog, then the in-memory queue."""
        with self._journal_lock:
            journaled = [] if self._closed else self.journal.pending()
            with self._put_lock:
                queued = list(self.queue)
        return journaled + queued

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until every record queued before this call has been delivered; False on timeout."""
        target = self.enqueued
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._progress:
            while self.delivered < target and self.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()  # skip a backoff sleep: the caller wants delivery now
                self._progress.wait(min(remaining, 0.2))
        return self.delivered >= target

    def retarget(self, run_id: str | None, run_key: str, resume_step: int | None = None) -> None:
        """Continue another run (a checkpoint's) instead: allowed until the run is being resolved.

        Records journaled so far move behind the backlog of ``run_key``'s journal (a previous process').
        """
        with self._journal_lock:
            if self._resolving or self._closed:
                raise RuntimeError(
                    f"MLflow run {self.run_id or self.run_key} is already in use; resume state must be loaded "
                    "before the first metric is logged"
                )
            peeked = self.journal.peek(2**62)
            records = [r for r in peeked if r is not None]  # torn lines are not carried over
            self.journal.discard()
            self.journal = Journal(os.path.join(os.path.dirname(self.journal.path), f"{run_key}.jsonl"))
            self.resume_step = resume_step
            drop_after(self.journal, resume_step)
            self._backlog = backlog_pairs(self.journal)
            self.journal.append(records)
            with self._put_lock:
                self.enqueued += self.journal.pending_at_open - (len(peeked) - len(records))
            self.run_id, self.run_key, self._search_run_key = run_id, run_key, True

    def stop(self, status: str | None, timeout: float) -> None:
        """Deliver for at most ``timeout`` seconds, set ``status`` on the run (best effort), end the thread."""
        self._stop_monitor()  # its last sample is queued before the final delivery
        self._final_status = status
        self._stop_deadline = time.monotonic() + max(timeout, 0.0)
        self._wake.set()

    # ---- the thread ----------------------------------------------------------------------------------
    def run(self) -> None:
        backoff = 0.5
        try:
            while True:
                stopping = self._stop_deadline is not None
                try:
                    self._drain_queue()
                    if stopping and (not self.journal.has_pending or time.monotonic() >= self._stop_deadline):
                        break
                    idle = not self.journal.has_pending if self._run_ready else not self.gate.is_set()
                    if idle:
                        self._sleep(self.settings.poll_interval_s)
                        continue
                    if not self._run_ready:
                        with self._journal_lock:
                            self._resolving = True  # from here on the run identity is fixed
                        self._resolve_run()
                    else:
                        self._deliver_next()
                    if backoff > 0.5:
                        log.info("MLflow reachable again at %s; delivering the backlog", self.settings.tracking_uri)
                    backoff = 0.5
                except Exception as error:  # any failure: keep the records, retry later
                    self.failures += 1
                    self.last_error = f"{type(error).__name__}: {error}"[:2000]
                    if backoff == 0.5:
                        log.warning("MLflow at %s unavailable (%s); buffering to %s",
                                    self.settings.tracking_uri, self.last_error[:300], self.journal.path)
                    wait = backoff
                    if stopping:
                        wait = self._stop_deadline - time.monotonic()
                        if wait <= 0:
                            break
                    self._sleep(min(wait, backoff))
                    backoff = min(backoff * 2, self.settings.max_backoff_s)
            self.journal_queued()
            if self.journal.has_pending:
                # A terminal status would tell readers (the experiment runner, a pipeline) that the run is
                # complete while metrics are still on their way: it stays RUNNING; the next process on this run
                # (a resume) delivers the journal and sets the status.
                if self._final_status is not None and self._run_ready:
                    log.warning("MLflow run %s: records still undelivered at the end (kept in %s); the run stays "
                                "RUNNING until a process continuing it delivers them", self.run_id,
                                self.journal.path)
            else:
                self._set_final_status()
        finally:
            self._stop_monitor()
            with self._journal_lock:
                self._closed = True
                self.journal.close()
            with self._progress:
                self._progress.notify_all()

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _drain_queue(self) -> None:
        """Move queued records into the journal, in order; on a write error they stay queued."""
        with self._journal_lock:
            if self._closed:
                return
            records = []
            while self.queue:
                records.append(self.queue.popleft())
            try:
                self.journal.append(records)
            except BaseException:
                self.queue.extendleft(reversed(records))
                raise
            if self.journal.write_error and not self._disk_warned:
                self._disk_warned = True  # a local disk problem, not the tracking server's
                log.warning("cannot write the MLflow journal %s (%s); records are kept in memory and delivered "
                            "from there (lost only if this process ends before %s takes them)", self.journal.path,
                            self.journal.write_error, self.settings.tracking_uri)
            elif not self.journal.write_error:
                self._disk_warned = False

    def journal_queued(self, sync: bool = False) -> bool:
        """Write what is queued to the journal now (safe from any thread), with ``sync`` also to the device;
        False if that failed."""
        try:
            self._drain_queue()
            if sync:
                with self._journal_lock:
                    if not self._closed:
                        self.journal.sync()
            return True
        except Exception as error:
            log.warning("could not journal %d queued MLflow records: %s", len(self.queue), error)
            return False

    def _commit(self, n: int) -> None:
        with self._journal_lock:
            self.journal.commit(n)
        with self._progress:
            self.delivered += n
            self._progress.notify_all()

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.settings.tracking_uri)
            self._start_monitor()
        return self._client

    def _start_monitor(self) -> None:
        if self.settings.system_metrics_interval_s is None or self._stop_deadline is not None:
            return
        from app.tracking.system_metrics import QueuedSystemMetricsMonitor

        with self._monitor_lock:
            try:
                self._monitor = QueuedSystemMetricsMonitor(
                    self.put, self.settings.tracking_uri, sampling_interval=self.settings.system_metrics_interval_s)
                self._monitor.start()
            except Exception as error:  # no system metrics, training goes on
                log.warning("system metrics monitor not started: %s: %s", type(error).__name__, error)
                self._monitor = None

    def _stop_monitor(self) -> None:
        with self._monitor_lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()


    def _resolve_run(self) -> None:
        try:
            settings = self.settings
            run_id, created = resolve_run(
                self._mlflow(), experiment_name=settings.experiment_name, artifact_location=settings.artifact_location,
                run_id=self.run_id, run_key=self.run_key, search_run_key=self._search_run_key,
                run_name=settings.run_name, tags=settings.tags, context_tags=settings.context_tags,
            )
        finally:
            # A create whose reply was lost may have made the run: later attempts look it up by key first.
            self._search_run_key = True
        self._sender = RunRecords(self._mlflow(), run_id)
        if not created:
            self._sender.continue_run(self.resume_step, self._backlog)
        self._backlog = set()
        self.run_id, self._run_ready = run_id, True
        log.info("MLflow run %s (%s)", run_id, "created" if created else "continued")

    # ---- delivery ------------------------------------------------------------------------------------
    def _deliver_next(self) -> None:
        from mlflow.exceptions import MlflowException

        limit = 1 if self._isolate > 0 else MAX_METRICS_PER_BATCH
        with self._journal_lock:
            records = self.journal.peek(limit)
        if not records:
            return
        if records[0] is None:  # torn line from a crashed process
            self._commit(1)
            return
        kind = records[0][0]
        try:
            n = self._sender.send(records)
        except MlflowException as error:
            if not _is_permanent(error):
                raise
            if len(records) > 1 and self._isolate == 0:
                self._isolate = len(records)  # find the bad record: resend one at a time
                return
            log.warning("MLflow rejected a %s record, dropping it: %s", kind, error)
            self.last_error = f"rejected: {error}"[:2000]
            self.rejected += 1
            n = 1
        self._isolate = max(self._isolate - n, 0)
        self._commit(n)

    def _set_final_status(self) -> None:
        if self._final_status is None or not self._run_ready:
            return
        try:
            self._mlflow().update_run(self.run_id, status=self._final_status)
            self.status_set = self._final_status
        except Exception as error:  # best effort: the run stays RUNNING in the UI
            self.last_error = f"status: {type(error).__name__}: {error}"[:2000]
            log.warning("could not set MLflow run %s to %s: %s", self.run_id, self._final_status, error)
