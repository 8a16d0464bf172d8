"""MLflow tracking for Crescent training: a non-blocking, outage-proof Lightning logger.

``CrescentMLflowLogger`` (logger.py) is what the application uses; ``flatten_params`` (params.py) turns a
resolved config into MLflow params; delivery.py and journal.py are its background thread and on-disk queue.
"""

from app.tracking.logger import CrescentMLflowLogger, resolve_tracking_uri
from app.tracking.params import flatten_params

__all__ = ["CrescentMLflowLogger", "flatten_params", "resolve_tracking_uri"]
