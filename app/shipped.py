"""YAML files that ship with Crescent and are named by their stem: training configs (app/configs/NAME.yaml) and
experiment specs (app/experiments/NAME.yaml). One rule for both: a YAML path that exists is taken as it is, else
NAME is looked up in the folder. Each caller raises its own error (with the names `shipped_names` lists)."""
from __future__ import annotations

from pathlib import Path


def shipped_yaml(name_or_path: str, directory: Path) -> Path | None:
    """An existing `.yaml`/`.yml` file as it is, else directory/NAME.yaml if it exists; None when neither does."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = directory / f"{name_or_path}.yaml"
    return candidate if candidate.is_file() else None


def shipped_names(directory: Path) -> list[str]:
    """The names `shipped_yaml` finds in `directory`, sorted (none when the folder does not exist)."""
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
