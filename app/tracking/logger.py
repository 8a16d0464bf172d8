"""``CrescentMLflowLogger``: a Lightning logger whose calls never block or fail training.

Every ``log_*`` call turns its arguments into records and appends them to an in-memory queue; a background
thread (``delivery.RunDelivery``) journals them to disk and delivers them in order. An unreachable tracking
server costs nothing but disk: records wait in the journal and are sent when it returns (ARCHITECTURE.md,
"MLflow hygiene").

Run identity. MLflow assigns run ids on the server, so while the server is down there is no run id yet.
The logger therefore has two identities:

- ``run_key``: generated here (or given back from a checkpoint), known immediately, stored on the run as
  the tag ``crescent.run_key``; it also names the local journal.
- ``run_id``: MLflow's id, ``None`` until the run exists (``wait_for_run_id`` blocks for it).

Store ``state_dict()`` (both) in every checkpoint. On resume pass them back (constructor args, or
``load_state_dict``): with a ``run_id`` that run continues; with only a ``run_key`` (the checkpoint was written
during an outage) the run carrying that tag continues if it was created meanwhile, else it is created; in
both cases the journal left by the previous process is delivered first, so nothing logged before the
restart is lost. The run is only created/continued at the first metric, artifact, ``flush``, ``start`` or
``finalize``, so ``load_state_dict`` also works after ``log_hyperparams`` (Lightning logs params before it
restores a checkpoint under FSDP / ModelParallelStrategy).

Besides metrics, tags and params: artifacts (artifacts.py), dataset inputs and logged models (lineage.py), and
MLflow's system metrics (system_metrics.py, with ``system_metrics=True``) take the same queue.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import uuid
from argparse import Namespace
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

from app.tracking.artifacts import StagedArtifacts, never_raises
from app.tracking.delivery import DeliverySettings, RunDelivery
from app.tracking.params import MAX_TAG_VAL_LENGTH, flatten_params, sanitize_key, truncate
from app.tracking.store import (
    context_tags,
    default_artifact_location,
    http_timeout_s,
    read_metric_history,
    resolve_tracking_uri,
    run_status,
)

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8192)
def _metric_key(key: str) -> str:
    return sanitize_key(key)


class CrescentMLflowLogger(StagedArtifacts, Logger):
    """MLflow logger for Crescent training (rank 0 logs; other ranks no-op). See the module docstring.

    Args:
        experiment_name: MLflow experiment (created if missing).
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``.
        run_name: display name of a new run.
        tags: tags set on the run (again on resume). A new run also gets MLflow's context tags (source name and
            type, git commit/branch/repo URL, user) from MLflow's context registry, as ``mlflow.start_run`` does;
            ``tags`` override them.
        run_id: continue this run (from a checkpoint).
        run_key: the logger identity from a checkpoint (see module docstring); new one if not given.
        artifact_location: artifact root of a newly created experiment (default: ``mlartifacts`` next to a
            sqlite database; the server's default otherwise).
        spool_dir: where the journal and staged artifacts live (put it on the checkpoint volume).
        save_dir: the local directory Lightning treats as this logger's (``trainer.log_dir``, where
            LightningCLI's SaveConfigCallback writes ``config.yaml``); default: the working directory.
        http_timeout_s, http_max_retries: defaults for ``MLFLOW_HTTP_REQUEST_TIMEOUT`` /
            ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` when unset, so a dead server costs seconds per attempt;
            retries are done by this logger with backoff instead.
        finalize_timeout_s: how long ``finalize`` waits for delivery before leaving the rest journaled.
        poll_interval_s: how often the delivery thread sends what has accumulated.
        max_backoff_s: longest wait between attempts while the server is unreachable.
        max_queue: records held in memory before the delivery thread journals them; beyond it records are
            counted in ``stats()['overflowed']`` and lost (only if that thread is stuck for a long time).
        system_metrics: run MLflow's system-metrics monitor into this run (system_metrics.py) while the logger
            is started; ``system_metrics_interval_s``: its sampling interval (MLflow's env variables override).
    """

    def __init__(
        self,
        experiment_name: str = "crescent",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        run_key: str | None = None,
        artifact_location: str | None = None,
        spool_dir: str = "mlflow-spool",
        save_dir: str | None = None,
        http_timeout_s: int = 10,
        http_max_retries: int = 0,
        finalize_timeout_s: float = 30.0,
        poll_interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_queue: int = 1_000_000,
        system_metrics: bool = False,
        system_metrics_interval_s: float = 10.0,
    ):
        super().__init__()
        if (not isinstance(experiment_name, str) or not experiment_name.strip()
                or len(experiment_name) > MAX_EXPERIMENT_NAME_LENGTH):
            raise ValueError(f"experiment_name must be a non-empty string of at most {MAX_EXPERIMENT_NAME_LENGTH} "
                             f"characters (MLflow's limit), got {experiment_name!r}")
        for field, value, minimum in (
            ("http_timeout_s", http_timeout_s, 1), ("http_max_retries", http_max_retries, 0),
            ("finalize_timeout_s", finalize_timeout_s, 0), ("poll_interval_s", poll_interval_s, 0.01),
            ("max_backoff_s", max_backoff_s, 0.01), ("max_queue", max_queue, 1),
            ("system_metrics_interval_s", system_metrics_interval_s, 0.01),
        ):
            if value < minimum:
                raise ValueError(f"{field} must be >= {minimum}, got {value!r}")
        tracking_uri = resolve_tracking_uri(tracking_uri)
        self._settings = DeliverySettings(
            tracking_uri=tracking_uri, experiment_name=experiment_name,
            artifact_location=artifact_location or default_artifact_location(tracking_uri), run_name=run_name,
            tags={sanitize_key(k): truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()},
            context_tags=context_tags(), poll_interval_s=poll_interval_s, max_backoff_s=max_backoff_s,
            max_queue=max_queue,
            system_metrics_interval_s=float(system_metrics_interval_s) if system_metrics else None,
        )
        self._given_run_id = run_id
        self._run_key_given = run_key is not None
        self._run_key = run_key or uuid.uuid4().hex
        self.spool_dir = os.path.abspath(spool_dir)
        self._save_dir = os.path.abspath(save_dir or os.getcwd())
        self._http = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(http_timeout_s)),
                      "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(http_max_retries))}
        self.finalize_timeout_s = finalize_timeout_s
        self._delivery: RunDelivery | None = None
        self._resume_step: int | None = None
        self._finished: list[RunDelivery] = []
        self._start_lock = threading.Lock()

    # ---- identity ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._settings.experiment_name

    @property
    def tracking_uri(self) -> str:
        return self._settings.tracking_uri

    @property
    def artifact_location(self) -> str | None:
        """The artifact root a newly created experiment gets (None: the tracking server's default)."""
        return self._settings.artifact_location

    @property
    def version(self) -> str:
        """The run key: stable from the first moment (the run id may not exist yet)."""
        return self._run_key

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def run_key(self) -> str:
        return self._run_key

    @property
    def run_id(self) -> str | None:
        """MLflow's run id once the run exists (or the id being resumed); ``None`` before that."""
        if self._delivery is not None and self._delivery.run_id is not None:
            return self._delivery.run_id
        return self._given_run_id

    @property
    def experiment(self) -> CrescentMLflowLogger:
        """The logger itself: its ``log_*`` methods are the non-blocking way to reach MLflow."""
        return self

    def state_dict(self) -> dict[str, str | None]:
        """What a checkpoint must hold to continue this run: ``{"run_id": ..., "run_key": ...}``."""
        return {"run_id": self.run_id, "run_key": self._run_key}

    def load_state_dict(self, state: dict[str, str | None], resume_step: int | None = None) -> None:
        """Continue the run of ``state_dict()`` (from a checkpoint).

        Allowed until the run is created, i.e. before the first metric, artifact, ``flush`` or ``start``:
        params logged before (Lightning logs them before restoring a checkpoint under FSDP) go to the
        continued run and are checked against its params then. Later it raises RuntimeError.
        ``resume_step``: the checkpoint's step; metrics a killed process logged after it are not doubled by
        the new process logging those steps again (see delivery.py).
        """
        run_id, run_key = state.get("run_id"), state.get("run_key") or self._run_key
        if self._delivery is not None:
            self._delivery.retarget(run_id, run_key, resume_step)
        self._given_run_id, self._run_key, self._run_key_given = run_id, run_key, True
        self._resume_step = resume_step

    # ---- lifecycle -----------------------------------------------------------------------------------
    @rank_zero_only
    def start(self) -> None:
        """Start the delivery thread and create or continue the run now (in the background)."""
        self._ensure_started().gate.set()

    def _ensure_started(self) -> RunDelivery:
        delivery = self._delivery
        if delivery is not None:
            return delivery
        with self._start_lock:
            if self._delivery is None:
                self._delivery = self._new_delivery()
                atexit.register(self._at_exit)
            return self._delivery

    def _new_delivery(self) -> RunDelivery:
        if self.tracking_uri.startswith(("http://", "https://")):
            for key, value in self._http.items():
                os.environ.setdefault(key, value)
        delivery = RunDelivery(self._settings, run_id=self.run_id, run_key=self._run_key,
                               search_run_key=self._run_key_given, resume_step=self._resume_step,
                               journal_path=os.path.join(self.spool_dir, f"{self._run_key}.jsonl"))
        delivery.start()
        return delivery

    def _at_exit(self) -> None:
        """Interpreter exit without ``finalize``: journal what is queued (delivered by the next run)."""
        delivery = self._delivery
        if delivery is not None and delivery.is_alive():
            delivery.stop(None, timeout=0.0)
            delivery.join(timeout=2.0)
            if delivery.is_alive():  # stuck in a network call: journal the queue from here
                delivery.journal_queued()

    def wait_for_run_id(self, timeout: float = 30.0) -> str | None:
        """Block up to ``timeout`` s until the run exists; its id, or ``None`` (server still unreachable)."""
        if self._delivery is None:
            return self._given_run_id
        self._delivery.gate.set()
        deadline = time.monotonic() + timeout
        while self._delivery.run_id is None and time.monotonic() < deadline and self._delivery.is_alive():
            time.sleep(0.05)
        return self._delivery.run_id

    @rank_zero_only
    def save(self) -> None:
        """Write every record logged so far to the on-disk journal and fsync it (Lightning's "save log data"):
        called before a checkpoint is published, so a process killed after it has lost none of its metrics."""
        if self._delivery is not None:
            self._delivery.journal_queued(sync=True)

    @rank_zero_only
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to ``timeout`` s until everything logged so far is in MLflow; True if it is."""
        if self._delivery is None:
            return True
        self._delivery.gate.set()
        return self._delivery.wait_delivered(timeout)

    @rank_zero_only
    def finalize(self, status: str = "success", timeout: float | None = None) -> None:
        """Flush for at most ``timeout`` s (default ``finalize_timeout_s``), set the run status, stop the
        thread (best effort). Under a preemption grace period pass a short ``timeout``.

        ``status``: Lightning's ``success``/``failed``/``finished`` or ``killed``/``interrupted``/
        ``aborted``, or MLflow's ``FINISHED``/``FAILED``/``KILLED``. What could not be delivered stays in
        the journal for the next process with the same run key. Logging after ``finalize`` starts again.
        """
        mlflow_status = run_status(status)
        delivery = self._delivery
        if delivery is None:
            return
        timeout = self.finalize_timeout_s if timeout is None else max(float(timeout), 0.0)
        delivery.gate.set()
        delivery.stop(mlflow_status, timeout=timeout)
        delivery.join(timeout=timeout + http_timeout_s() + 2)
        if delivery.is_alive():  # stuck in a network call: make sure the queue is on disk
            delivery.journal_queued()
        self._given_run_id = delivery.run_id or self._given_run_id
        self._run_key_given = True  # a later start continues this run
        self._finished.append(delivery)
        self._delivery = None
        atexit.unregister(self._at_exit)
        try:  # staged artifacts are deleted once uploaded; drop their folder when it is empty
            os.rmdir(os.path.join(self.spool_dir, f"{self._run_key}.files"))
        except OSError:
            pass

    def metric_history(self, prefixes: tuple[str, ...] = ("",), timeout: float = 0.0
                       ) -> dict[str, dict[int, float]] | None:
        """{key: {step: value}} of this run's metrics under ``prefixes``: what reached the tracking store plus
        what still waits in the spool and the queue (logged before this call), so it covers the whole run across
        resumes and outages. None when the store cannot be read now (the server is down): no partial history.

        A run that continues an earlier one (a run key or id from a checkpoint) has history in the store only
        once the delivery thread has found it: this waits up to ``timeout`` s for that, then gives None."""
        delivery = self._delivery
        pending = delivery.pending_records() if delivery is not None else []  # first: it may move to the store
        run_id = self.wait_for_run_id(timeout=0.0) if delivery is not None else self._given_run_id
        if run_id is None and delivery is not None and (self._run_key_given or self._given_run_id):
            run_id = self.wait_for_run_id(timeout=timeout)
            if run_id is None:  # the earlier segments are in the store, out of reach yet: not a partial picture
                return None
        history: dict[str, dict[int, float]] = {}
        if run_id is not None:
            try:
                history = read_metric_history(self.tracking_uri, run_id, prefixes)
            except Exception as error:  # unreachable or failing store: this history would be incomplete
                log.warning("metric history of run %s unavailable: %s: %s", run_id, type(error).__name__, error)
                return None
        elif delivery is None or delivery.delivered:
            return None
        for record in pending:
            if record and record[0] == "m" and record[1].startswith(prefixes):
                history.setdefault(record[1], {})[int(record[4])] = float(record[2])
        return history

    def stats(self) -> dict[str, Any]:
        """Counters of the current (or last) delivery thread; see ``RunDelivery.stats``."""
        delivery = self._delivery or (self._finished[-1] if self._finished else None)
        return delivery.stats() if delivery is not None else {**RunDelivery.EMPTY_STATS, "run_id": self.run_id}

    # ---- logging (rank 0 only; never blocks on the network, never raises) ----------------------------
    @rank_zero_only
    @never_raises
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Log the (nested) config as flat params, once; see ``params.split_params`` for resume."""
        flat = flatten_params(params)
        if flat:
            self._ensure_started().put([["p", flat]])

    @rank_zero_only
    @never_raises
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Queue one value per key at ``step`` (0 if None), timestamped now. Non-numeric values are skipped."""
        timestamp = int(time.time() * 1000)
        step = int(step) if step is not None else 0
        records = []
        for key, value in metrics.items():
            try:
                value = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError, RuntimeError):
                log.debug("metric %s=%r is not a number; skipped", key, value)
                continue
            records.append(["m", _metric_key(str(key)), value, timestamp, step])
        if records:
            delivery = self._ensure_started()
            delivery.put(records)
            delivery.gate.set()

    @rank_zero_only
    @never_raises
    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue run tags (values stringified)."""
        records = [["t", sanitize_key(k), truncate(str(v), MAX_TAG_VAL_LENGTH)] for k, v in tags.items()]
        if records:
            self._ensure_started().put(records)

    @rank_zero_only
    @never_raises
    def log_dataset_inputs(self, inputs: list[dict]) -> None:
        """Queue dataset inputs of the run (``lineage.dataset_input_records``)."""
        if inputs:
            self._ensure_started().put([["i", inputs]])

    @rank_zero_only
    @never_raises
    def log_logged_model(self, model: dict) -> None:
        """Queue an export checkpoint as a logged model of the run (``lineage.logged_model_record``)."""
        delivery = self._ensure_started()
        delivery.put([["lm", model]])
        delivery.gate.set()

    # ---- pickling (spawn launchers copy the logger into new processes) -------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_delivery=None, _finished=[], _start_lock=None, _given_run_id=self.run_id)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_lock = threading.Lock()


def mlflow_logger(loggers) -> CrescentMLflowLogger | None:
    """The run's `CrescentMLflowLogger` among a trainer's loggers (others the user configured sit beside it)."""
    return next((lg for lg in loggers if isinstance(lg, CrescentMLflowLogger)), None)
