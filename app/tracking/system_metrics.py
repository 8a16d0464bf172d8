"""System metrics (CPU, memory, disk, network, GPU where present) by MLflow's own system-metrics monitor,
published through the outage-safe logger instead of MLflow's blocking client.

``mlflow.system_metrics.SystemMetricsMonitor`` samples its monitors (``CPUMonitor``, ``DiskMonitor``,
``NetworkMonitor``, ``GPUMonitor`` when pynvml sees an NVIDIA GPU, ``ROCMMonitor`` for AMD), averages
``samples_before_logging`` samples and names them ``system/<metric>`` (``system/<node_id>/<metric>``). Two parts
of it do not fit training that must never wait for the tracking server, and are replaced here:

- its loop reads the run from the server after every sample (a blocking request) and stops monitoring for good
  at the first failure, i.e. at the first outage: ``monitor`` below is that loop without the poll;
- it logs through ``BatchMetricsLogger`` (a synchronous ``log_batch`` on the monitor's thread): ``publish``
  hands each averaged sample to the logger's queue instead, as one ``["s", {key: value}, timestamp_ms]``
  record. Its step is given at delivery (delivery.py), in journal order, continuing from the run's last
  ``system/`` step, so a resumed run's system metrics continue at the next step as with MLflow's own
  ``resume_logging``, also when the process restarted during an outage.

The sampling interval defaults to MLflow's 10 s (one sample costs about a millisecond of one core); MLflow's
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` / ``..._SAMPLES_BEFORE_LOGGING`` / ``..._NODE_ID`` override it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)


class _QueuePublisher:
    """Stands in for MLflow's ``BatchMetricsLogger``: ``record_metrics`` queues, ``flush`` has nothing to send."""

    def __init__(self, publish: Callable[[list[Any]], None]):
        self.publish = publish
        self.data: list = []  # read by MLflow's debug logging
        self.total_training_time = self.total_log_batch_time = 0.0

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.publish([["s", {k: float(v) for k, v in metrics.items()}, int(time.time() * 1000)]])

    def flush(self) -> None:
        pass


class QueuedSystemMetricsMonitor(SystemMetricsMonitor):
    """MLflow's monitor publishing into ``publish`` (the delivery thread's ``put``); see the module docstring.

    Construct it where the tracking store already exists (MLflow's constructor opens a client for
    ``tracking_uri``, which creates a new sqlite database): the delivery thread does.
    """

    def __init__(self, publish: Callable[[list[Any]], None], tracking_uri: str, sampling_interval: float = 10.0,
                 samples_before_logging: int = 1, node_id: str | None = None):
        super().__init__(None, sampling_interval=sampling_interval, samples_before_logging=samples_before_logging,
                         node_id=node_id, tracking_uri=tracking_uri)
        self.mlflow_logger = _QueuePublisher(publish)

    def monitor(self) -> None:
        """Sample, average, publish until ``finish``; a failing sample is reported once and monitoring goes on."""
        warned = False
        while not self._shutdown_event.is_set():
            try:
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    if self._shutdown_event.wait(self.sampling_interval):
                        return
                self.publish_metrics(self.aggregate_metrics())
            except Exception as error:  # a monitor that cannot read the system must not end training
                if not warned:
                    log.warning("system metrics sample failed: %s: %s", type(error).__name__, error)
                    warned = True
                if self._shutdown_event.wait(self.sampling_interval):
                    return
