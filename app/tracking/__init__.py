"""MLflow tracking for Crescent training: a non-blocking, outage-proof Lightning logger.

``CrescentMLflowLogger`` (logger.py, artifacts.py) is what the application uses; ``flatten_params`` (params.py)
turns a resolved config into MLflow params; store.py picks the store and the run; delivery.py and journal.py are
its background thread and on-disk queue, records.py what each queued record becomes in MLflow; lineage.py the
dataset inputs and logged models; system_metrics.py MLflow's system-metrics monitor on that queue.
"""

from app.tracking.lineage import DatasetLineage, logged_model_record
from app.tracking.logger import CrescentMLflowLogger, mlflow_logger
from app.tracking.params import flatten_params
from app.tracking.store import resolve_tracking_uri

__all__ = ["CrescentMLflowLogger", "DatasetLineage", "flatten_params", "logged_model_record", "mlflow_logger",
           "resolve_tracking_uri"]
