"""Shared pieces of the MLflow tracking tests: a real sqlite store with its schema created, a URL nobody serves."""
from __future__ import annotations

import socket
from pathlib import Path

from mlflow import MlflowClient


def sqlite_store(root: Path) -> str:
    """A sqlite MLflow store in `root` with its schema created (that takes seconds: once per test module)."""
    uri = f"sqlite:///{root}/mlruns.db"
    MlflowClient(uri).search_experiments()
    return uri


def dead_uri() -> str:
    """An http URL on loopback where no server listens: every request fails at once (an outage)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
