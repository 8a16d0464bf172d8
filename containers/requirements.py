"""Print pyproject.toml's requirements, one a line: the runtime dependencies, or with EXTRA names only those of
the extras. containers/Dockerfile installs each image's role from this, so an image holds what pyproject declares.

    python3 requirements.py pyproject.toml [EXTRA ...]
"""
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = sys.argv[2:]
unknown = [e for e in extras if e not in project.get("optional-dependencies", {})]
if unknown:
    sys.exit(f"requirements.py: unknown extra(s) {unknown}; pyproject has {sorted(project['optional-dependencies'])}")
print(*(project["dependencies"] if not extras else [r for e in extras for r in project["optional-dependencies"][e]]),
      sep="\n")
