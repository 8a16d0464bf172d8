"""Turn a resolved config into MLflow params: flat ``a.b.c`` keys, string values within MLflow's limits.

MLflow params are immutable: a run accepts a key once, and re-logging it with another value is an error
(ARCHITECTURE.md, "Pitfalls"). ``split_params`` decides, against the params a run already has, which keys
are new, which are unchanged (skipped) and which changed (recorded as tags instead of failing).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import re
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

CHANGED_PARAM_TAG_PREFIX = "param_changed."

_INVALID_KEY_CHARS = re.compile(r"[^\w./\- :]")


def sanitize_key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, no empty/``..`` path segments, at most MLflow's key length.

    Over-long keys keep a prefix plus a short hash of the full key so two long keys stay distinct.
    """
    key = _INVALID_KEY_CHARS.sub("_", str(key))
    parts = [p if p not in ("", ".", "..") else "_" for p in key.split("/")]
    key = "/".join(parts) or "_"
    if len(key) > MAX_ENTITY_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_ENTITY_KEY_LENGTH - 9]}~{digest}"
    return key


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending in ``...`` when it was cut."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _is_container(value: Any) -> bool:
    return (
        isinstance(value, Mapping | Namespace)
        or (dataclasses.is_dataclass(value) and not isinstance(value, type))
    )


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, Namespace):
        return [(str(k), v) for k, v in vars(value).items()]
    return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]


def param_value(value: Any) -> str:
    """A deterministic string for one leaf value (the same config gives the same string on resume)."""
    if isinstance(value, enum.Enum):
        value = value.value
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif callable(value) and hasattr(value, "__qualname__"):
        value = f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # torch / numpy scalars
        value = value.item()
    return str(value)


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts / dataclasses / Namespaces -> ``{"a.b.c": "value"}``.

    Lists and tuples of containers are expanded by index (``stages.0.name``); other lists are one value.
    Keys are sanitized for MLflow and values are cut to MLflow's param value limit.
    """
    flat: dict[str, str] = {}

    def visit(value: Any, key: str) -> None:
        if _is_container(value):
            for child_key, child in _children(value):
                visit(child, f"{key}.{child_key}" if key else child_key)
        elif isinstance(value, list | tuple) and any(_is_container(v) for v in value):
            for i, child in enumerate(value):
                visit(child, f"{key}.{i}" if key else str(i))
        else:
            flat[sanitize_key(key or "value")] = truncate(param_value(value), MAX_PARAM_VAL_LENGTH)

    visit(params, prefix)
    return flat


def split_params(
    new: Mapping[str, str], existing: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(params to log, tags to set) so that logging ``new`` into a run holding ``existing`` never fails.

    Unchanged keys are skipped; a changed key is not re-logged (params are immutable) but recorded as the
    tag ``param_changed.<key>`` holding the new value.
    """
    to_log: dict[str, str] = {}
    changed: dict[str, str] = {}
    for key, value in new.items():
        if key not in existing:
            to_log[key] = value
        elif existing[key] != value:
            tag_key = sanitize_key(CHANGED_PARAM_TAG_PREFIX + key)
            changed[tag_key] = truncate(value, MAX_TAG_VAL_LENGTH)
    return to_log, changed
