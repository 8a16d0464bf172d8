"""Where tracking goes: the tracking URI, the experiment, and which run a process logs into.

A run is continued when a checkpoint names it (``run_id``), or found by the tag ``crescent.run_key`` when
the checkpoint was written before the run could be created (server down); otherwise it is created.
"""

from __future__ import annotations

import logging
import os

from app.tracking.params import MAX_TAG_VAL_LENGTH, truncate

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
RUN_KEY_TAG = "crescent.run_key"
_STATUSES = {
    "success": "FINISHED", "finished": "FINISHED", "failed": "FAILED",
    "killed": "KILLED", "interrupted": "KILLED", "aborted": "KILLED",
}


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The given URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``.

    A relative sqlite path is made absolute (against the working directory now) so that the store does not
    move if the process changes directory.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a sqlite store, ``mlartifacts`` next to the database file; servers choose their own."""
    if tracking_uri.startswith("sqlite:///"):
        db_path = tracking_uri[len("sqlite:///"):]
        return os.path.join(os.path.dirname(db_path), "mlartifacts")
    return None


def context_tags() -> dict[str, str]:
    """MLflow's run-context tags for this process (``mlflow.user``, ``mlflow.source.name``/``type``,
    ``mlflow.source.git.commit``/``branch``/``repoURL`` when the entry point is in a git checkout, plus any
    registered context plugin), resolved by MLflow's own context registry as ``mlflow.start_run`` does."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in resolve_tags().items()}


def http_timeout_s() -> float:
    """MLflow's per-request HTTP timeout as configured in the environment (its default: 120 s)."""
    try:
        return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 120))
    except ValueError:
        return 120.0


def run_status(status: str) -> str:
    """MLflow's run status for Lightning's ``finalize`` status (or an MLflow status itself)."""
    if isinstance(status, str):
        if status.lower() in _STATUSES:
            return _STATUSES[status.lower()]
        if status in _STATUSES.values():
            return status
    raise ValueError(
        f"finalize status must be one of {sorted(_STATUSES)} or FINISHED/FAILED/KILLED, got {status!r}"
    )


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) or restored if needed."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:  # created concurrently by another process
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def resolve_run(
    client, *, experiment_name: str, artifact_location: str | None, run_id: str | None, run_key: str,
    search_run_key: bool, run_name: str | None, tags: dict[str, str], context_tags: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """(run id, created): continue ``run_id`` or the run tagged ``run_key``, else create one; the run ends
    up RUNNING with ``tags`` set. A ``run_id`` unknown to this store starts a new run, tagged with it.
    ``context_tags`` (MLflow's source/git/user tags, see ``context_tags``) go on a created run only, as
    ``mlflow.start_run`` does: a resumed run keeps the context it was started from."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    tags = dict(tags)
    if run_id is not None:
        try:
            if client.get_run(run_id).info.lifecycle_stage == "deleted":
                raise MlflowException("run is deleted", error_code="RESOURCE_DOES_NOT_EXIST")
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s not found in %s; starting a new run", run_id, client.tracking_uri)
            tags["crescent.resumed_from_missing_run"] = run_id
            run_id = None
    if run_id is None:
        exp_id = experiment_id(client, experiment_name, artifact_location)
        found = []
        if search_run_key:
            found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       max_results=1)
        if not found:
            run = client.create_run(exp_id, run_name=run_name,
                                    tags={**(context_tags or {}), **tags, RUN_KEY_TAG: run_key})
            return run.info.run_id, True
        run_id = found[0].info.run_id
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)  # chunked by MLflow
    return run_id, False


def read_metric_history(tracking_uri: str, run_id: str, prefixes: tuple[str, ...] = ("",)) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of every metric of the run whose key starts with one of ``prefixes`` (the last value
    logged at a step wins). Raises what MLflow raises when the store cannot be read."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(prefixes)]
    out: dict[str, dict[int, float]] = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        out[key] = {m.step: m.value for m in points}
    return out
