"""What a resumed run must not log twice.

A process killed after its checkpoint at step N may have logged steps after N; the process that resumes from N
trains and logs those steps again. Its predecessor's journaled but undelivered metrics of steps > N are dropped
(`drop_after`), and the (key, step) pairs of steps > N it already delivered are looked up once when the run is
continued (`delivered_after`); the delivery thread then skips the new values of those pairs. Every (key, step)
appears once in MLflow, the first value kept (after a bitwise resume both values are the same).
"""
from __future__ import annotations

import logging

from app.tracking.journal import Journal

log = logging.getLogger(__name__)


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


def delivered_after(client, run_id: str, step: int) -> set[tuple[str, int]]:
    """(key, step) of the run's metrics after `step`: one history read per metric key, once per resume."""
    found = set()
    for key in client.get_run(run_id).data.metrics:
        found.update((key, m.step) for m in client.get_metric_history(run_id, key) if m.step > step)
    return found
