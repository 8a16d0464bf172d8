"""MLflow tracking for Crescent training: a non-blocking, outage-proof Lightning logger.

``CrescentMLflowLogger`` (logger.py) is what the application uses; ``flatten_params`` (params.py) turns a
resolved config into MLflow params; store.py picks the store and the run;
delivery.py and journal.py are its background thread and on-disk queue.
"""

from app.tracking.logger import CrescentMLflowLogger, mlflow_logger
from app.tracking.params import flatten_params
from app.tracking.store import resolve_tracking_uri

__all__ = ["CrescentMLflowLogger", "flatten_params", "mlflow_logger", "resolve_tracking_uri"]
