"""The commands the manifests run exist with the flags they pass: each rendered `crescent ...` command line is
checked against the real command-line interface (training's is run for real in test_k8s_multinode.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from app.k8s.render import RenderParams, find, render
from app.k8s.workloads import pod_templates


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    config = tmp_path_factory.mktemp("cfg") / "run.yaml"
    config.write_text("trainer: {}\n")
    return {overlay: render(RenderParams(overlay=overlay, config=str(config))) for overlay in ("dev", "prod")}


def _container(objs, kind, name):
    return pod_templates(find(objs, kind, name))[0]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_eval_cronjob_command_parses_with_the_eval_cli(objects, overlay):
    from eval.cli import _parser

    c = _container(objects[overlay], "CronJob", "crescent-eval")
    assert c["command"] == ["crescent"] and c["args"][0] == "eval"
    args = _parser().parse_args(c["args"][1:])  # argparse exits (SystemExit) on an unknown flag
    assert args.command == "watch" and args.checkpoints == "/checkpoints/crescent/exports"
    assert args.allow_code_execution and args.data_dir == "/opt/crescent-eval-data"
    # The CronJob evaluates what the training Job exports: <run.dir>/exports.
    train_args = _container(objects[overlay], "Job", "crescent-train")["args"]
    assert train_args[train_args.index("--run.dir") + 1] + "/exports" == args.checkpoints


def _help(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *argv, "--help"], capture_output=True, text=True,
                          timeout=120)


def test_data_jobs_use_flags_the_data_cli_has(objects):
    build = _container(objects["prod"], "Job", "crescent-data-build")["args"]
    merge = _container(objects["prod"], "Job", "crescent-data-merge")["args"]
    build_help = _help(*build[:2])
    assert build_help.returncode == 0
    for flag in (a for a in build if a.startswith("--")):
        assert flag in build_help.stdout, flag
    merge_help = _help(*merge[:2])
    assert merge_help.returncode == 0
    for flag in (a for a in merge if a.startswith("--")):
        assert flag in merge_help.stdout, flag
