"""`crescent experiment run|report|plan|list`: the paper's experiments (app/experiments/*.yaml) as grids of
`crescent train` runs under one MLflow parent run.

    crescent experiment list                                  # shipped specs and their sizes
    crescent experiment plan scaling --size cpu               # the points, and which have finished
    crescent experiment run update-rms --size cpu             # run (or resume) the grid, then the report
    crescent experiment report PARENT_RUN_ID                  # rebuild table, figures and fits from MLflow
    crescent experiment run scaling --size gpu --point-index 3   # one static point (the Indexed Job's pods)

Exit status: 0 when every point finished, 1 when some failed (the report says which), 2 for a bad spec,
143 when interrupted (run the same command again to continue).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crescent experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the shipped specs")
    for name, help_ in (("run", "run or resume an experiment's grid, then write its report"),
                        ("plan", "print the grid points and their state (runs nothing)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("spec", help="a shipped spec name (scaling, update-rms, ...) or a YAML path")
        p.add_argument("--size", default="cpu", choices=["cpu", "gpu"])
        p.add_argument("--work-dir", help="default runs/experiments/NAME-SIZE")
        p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
        p.add_argument("--mlflow-experiment", default=None, help="MLflow experiment (default crescent-experiments)")
        p.add_argument("--key", help="which parent run (default: the work directory's absolute path)")
        p.add_argument("--base-config", help="train from this config instead of the spec's `config` (e.g. with the "
                                             "cluster's data paths)")
        if name == "run":
            p.add_argument("--new", action="store_true", help="start a new parent run even if one exists")
            p.add_argument("--no-report", action="store_true", help="skip the report at the end")
            p.add_argument("--point-index", type=int,
                           help="run only static point N (the Indexed Job's completion index) and exit")
            p.add_argument("--wait-static", action="store_true",
                           help="first wait until every static point has finished or failed (the report step)")
            p.add_argument("--wait-timeout", type=float, help="seconds --wait-static waits at most")
    p = sub.add_parser("report", help="rebuild the report of a parent run from MLflow")
    p.add_argument("parent_run", help="the parent run id")
    p.add_argument("--tracking-uri")
    p.add_argument("--out", help="output directory (default runs/experiments/NAME-SIZE/report)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from app.experiments.spec import SPEC_DIR, SpecError, load_spec

    if args.action == "list":
        for path in sorted(SPEC_DIR.glob("*.yaml")):
            spec = load_spec(str(path), "cpu")
            print(f"{spec.name:14s} {spec.kind:13s} {spec.paper}")
        return 0
    if args.action == "report":
        from app.experiments.report import report_from_mlflow

        out = report_from_mlflow(args.tracking_uri, args.parent_run, Path(args.out) if args.out else None)
        print(f"crescent experiment: report in {out / 'report.md'}", file=sys.stderr)
        return 0
    try:
        spec = load_spec(args.spec, args.size)
        if args.base_config:
            spec = dataclasses.replace(spec, config=args.base_config)
    except SpecError as err:
        print(f"crescent experiment: error: {err}", file=sys.stderr)
        return 2
    from app.experiments.runner import (
        DEFAULT_MLFLOW_EXPERIMENT,
        ExperimentRunner,
        RunnerOptions,
        default_work_dir,
    )

    options = RunnerOptions(work_dir=Path(args.work_dir) if args.work_dir else default_work_dir(spec),
                            tracking_uri=args.tracking_uri,
                            mlflow_experiment=args.mlflow_experiment or DEFAULT_MLFLOW_EXPERIMENT, key=args.key,
                            new=getattr(args, "new", False), report=not getattr(args, "no_report", False))
    runner = ExperimentRunner(spec, options)
    if args.action == "plan":
        return _print_plan(runner)
    try:
        if args.point_index is not None:
            return runner.run_static_point(args.point_index)
        if args.wait_static:
            runner.wait_for_static(timeout_s=args.wait_timeout)
        summary = runner.run()
    except SpecError as err:
        print(f"crescent experiment: error: {err}", file=sys.stderr)
        return 2
    if summary.interrupted:
        return 143
    print(f"crescent experiment: {spec.name} ({spec.size}): {len(summary.launched)} point(s) run now, "
          f"{len(summary.failed)} failed, {len(summary.waiting)} arm(s) waiting; parent run {summary.parent_id}",
          file=sys.stderr)
    for group, arm, why in summary.waiting:
        print(f"  waiting: {group}/{arm}: {why}", file=sys.stderr)
    for point, why in summary.failed.items():
        print(f"  failed: {point}: {why.strip().splitlines()[0] if why.strip() else ''}", file=sys.stderr)
    if summary.report_dir:
        print(f"  report: {summary.report_dir / 'report.md'}", file=sys.stderr)
    return 1 if summary.failed else 0


def _print_plan(runner) -> int:
    current, kids = runner.current_plan()
    todo = {p.id for p in current.todo}
    for p in current.points:
        kid = kids.get(p.id)
        state = "done" if kid is not None and runner.is_done(kid) else ("next" if p.id in todo else "known")
        if kid is not None and not runner.is_done(kid):
            state += f" (run {kid.run_id[:8]} {kid.status.lower()})"
        print(f"{state:28s} {p.id}")
    for group, arm, why in current.waiting:
        print(f"{'waiting':28s} {group}/{arm}: {why}")
    print(f"{len(current.points)} point(s) known, {len(todo)} to run now (more follow from their results)")
    return 0
