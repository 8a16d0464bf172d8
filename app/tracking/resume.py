"""What a resumed run must not log twice.

A process killed after its checkpoint at step N may have logged steps after N; the process that resumes from N
trains and logs those steps again. Its predecessor's journaled but undelivered metrics of steps > N are dropped
(`drop_after`). What the predecessor left in the journal at or before N is delivered, except the (key, step) pairs
MLflow holds already: an even earlier process may have delivered them (killed at step 4 with its checkpoint at 2,
the next process journals 3..6 and dies before sending them; the third resumes at 6 with 3 and 4 in its backlog and
in MLflow), or the delivery's commit was lost. Those pairs and the ones after N are looked up once when the run is
continued (`already_delivered`); the delivery thread then skips them. Every (key, step) appears once in MLflow,
the first value kept (after a bitwise resume both values are the same).

System metrics samples are not training steps: they are numbered at delivery, continuing after the run's last
`system/` step (`system_metrics_position`), so they are neither dropped nor skipped here.
"""
from __future__ import annotations

import logging

from app.tracking.journal import Journal

log = logging.getLogger(__name__)
SYSTEM_PREFIX = "system/"  # MLflow's SystemMetricsMonitor prefix


def drop_after(journal: Journal, step: int | None) -> int:
    """Drop the journal's undelivered metrics of steps after `step` (a previous process'); how many."""
    if step is None or not journal.has_pending:
        return 0
    try:
        dropped = journal.drop_pending(lambda r: isinstance(r, list) and r[:1] == ["m"] and r[4] > step)
    except OSError as error:  # full disk: keep them (those steps may then appear twice)
        log.warning("could not rewrite the MLflow journal %s: %s", journal.path, error)
        return 0
    if dropped:
        log.info("MLflow journal: %d metrics of steps after the resume point %d dropped (logged again)", dropped, step)
    return dropped


def backlog_pairs(journal: Journal) -> set[tuple[str, int]]:
    """(key, step) of the metrics waiting in a previous process' journal (read before this process appends)."""
    return {(r[1], r[4]) for r in journal.pending() if isinstance(r, list) and r[:1] == ["m"]}


def already_delivered(client, run, after: int | None, backlog: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """(key, step) of the run's metrics after step `after` or in `backlog`: one history read per metric key, once
    per continued run. System metrics are left out: their steps are their own counter (`system_metrics_position`),
    not training steps."""
    if after is None and not backlog:
        return set()
    found = set()
    for key in run.data.metrics:
        if not key.startswith(SYSTEM_PREFIX):
            found.update((key, m.step) for m in client.get_metric_history(run.info.run_id, key)
                         if (after is not None and m.step > after) or (key, m.step) in backlog)
    return found


def system_metrics_position(run) -> tuple[int, int]:
    """(next step, timestamp of the last sample) of the run's `system/` metrics; (0, -1) when it has none.

    Read from the latest value per key the run carries (as MLflow's own monitor resumes), not from the histories.
    A sample journaled again after a crash lost its commit has a timestamp at or before the last one: skipped.
    """
    latest = [m for m in run.data.to_proto().metrics if m.key.startswith(SYSTEM_PREFIX)]
    if not latest:
        return 0, -1
    return max(m.step for m in latest) + 1, max(m.timestamp for m in latest)
