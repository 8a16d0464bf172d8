"""The artifact half of ``CrescentMLflowLogger``: files, dicts, text and figures staged in the spool and queued.

A staged copy lives in ``SPOOL/<run key>.files/`` until the delivery thread has uploaded it (then it is deleted),
so an artifact logged during an outage is uploaded when the server is back, also by the next process.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import uuid
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)


def never_raises(method):
    """Logging must not stop training: a failure here is reported as a warning and the call returns."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            log.warning("CrescentMLflowLogger.%s failed, nothing logged: %s: %s", method.__name__,
                        type(error).__name__, error)
            return None

    return guarded


class StagedArtifacts:
    """Mixed into the logger, which provides ``spool_dir``, ``_run_key`` and ``_ensure_started()``."""

    def _staging_dir(self) -> str:
        path = os.path.join(self.spool_dir, f"{self._run_key}.files", uuid.uuid4().hex)
        os.makedirs(path, exist_ok=True)
        return path

    @rank_zero_only
    @never_raises
    def log_artifact(self, local_path: str, artifact_path: str | None = None, snapshot: bool = True) -> None:
        """Queue a file or directory for upload under ``artifact_path``.

        ``snapshot=True`` copies it now (later edits by the caller do not matter); ``snapshot=False``
        uploads the path as it is at delivery time (for large exports the caller keeps in place).
        """
        if not os.path.exists(local_path):
            raise FileNotFoundError(f"artifact {local_path} does not exist")
        path = os.path.abspath(local_path)
        if snapshot:
            target = os.path.join(self._staging_dir(), os.path.basename(path.rstrip("/")))
            (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, target)
            path = target
        self._put_artifact(path, artifact_path, snapshot)

    def _put_artifact(self, path: str, artifact_path: str | None, staged: bool) -> None:
        delivery = self._ensure_started()
        delivery.put([["a", path, artifact_path, staged]])
        delivery.gate.set()

    def _log_staged(self, artifact_file: str, write) -> None:
        target = os.path.join(self._staging_dir(), os.path.basename(artifact_file))
        write(target)
        self._put_artifact(target, os.path.dirname(artifact_file) or None, True)

    @rank_zero_only
    @never_raises
    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        """Queue ``dictionary`` as ``artifact_file`` (YAML for .yaml/.yml, else JSON)."""

        def write(target: str) -> None:
            with open(target, "w") as f:
                if artifact_file.endswith((".yaml", ".yml")):
                    import yaml

                    yaml.safe_dump(dictionary, f, sort_keys=False, default_flow_style=False)
                else:
                    json.dump(dictionary, f, indent=2, default=str)

        self._log_staged(artifact_file, write)

    @rank_zero_only
    @never_raises
    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue ``text`` as the artifact file ``artifact_file``."""

        def write(target: str) -> None:
            with open(target, "w") as f:
                f.write(text)

        self._log_staged(artifact_file, write)

    @rank_zero_only
    @never_raises
    def log_figure(self, figure: Any, artifact_file: str, dpi: int = 100) -> None:
        """Render a matplotlib figure now (PNG unless the extension says otherwise) and queue it."""
        self._log_staged(artifact_file, lambda target: figure.savefig(target, dpi=dpi))
