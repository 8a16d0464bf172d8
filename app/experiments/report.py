"""`crescent experiment report PARENT_RUN`: the experiment's tables (CSV + Markdown), figures (PNG) and fitted
numbers, rebuilt from MLflow alone (the parent run's spec artifact and its children's metrics; results.py) and
logged back onto the parent run (artifacts under report/, the numbers as metrics).
"""
from __future__ import annotations

import csv
import math
import shutil
import tempfile
from pathlib import Path

from app.experiments import tracking
from app.experiments.analyses import analyse
from app.experiments.configs import blocked_arms
from app.experiments.plan import format_number
from app.experiments.results import ReportData
from app.experiments.spec import ExperimentSpec, parse_spec


# ---------------------------------------------------------------------------------------------- tables
def points_table(data: ReportData) -> tuple[list[str], list[list]]:
    header = ["point", "group", "arm", "lr_scale", "seed", "budget", "status", "params (no emb)", "tokens",
              "FLOPs", "final val loss", "final train loss", "CPU-s", "wall-s", "run_id"]
    rows = []
    for r in data.rows.values():
        p = r.point
        rows.append([p.id, p.group, p.arm, format_number(p.lr_scale), p.seed, format_number(p.budget), r.status,
                     r.params, _num(r.tokens, "{:.0f}"), _num(r.flops, "{:.3e}"), _num(r.val_loss, "{:.4f}"),
                     _num(r.train_loss, "{:.4f}"), _num(r.cpu_seconds, "{:.0f}"), _num(r.wall_seconds, "{:.0f}"),
                     r.run_id or ""])
    return header, rows


def summary_table(data: ReportData) -> tuple[list[str], list[list]]:
    header = ["group", "arm", "lr source", "lr_scale tried (final val loss)", "selected lr_scale", "seeds",
              "final val loss", "final train loss"]
    rows = []
    for (group, arm), sel in data.plan.selections.items():
        tried = ", ".join(f"{format_number(v)} ({'failed' if math.isinf(loss) else f'{loss:.4f}'})"
                          for v, loss in sel.tried) or "–"
        val, train = data.stat(group, arm), data.stat(group, arm, "train_loss")
        rows.append([group, data.label(arm), sel.source, tried,
                     format_number(sel.lr_scale) if sel.lr_scale is not None else "pending", val.n, val.fmt(),
                     train.fmt()])
    for group, arm, why in data.plan.waiting:
        rows.append([group, data.label(arm), "waiting", why, "–", 0, "–", "–"])
    return header, rows


def selection_notes(data: ReportData) -> list[str]:
    notes = []
    for (group, arm), sel in data.plan.selections.items():
        for ext in sel.extensions:
            notes.append(f"{group}/{arm}: {ext}")
        if sel.at_edge:
            notes.append(f"{group}/{arm}: the best lr is still at the {sel.at_edge} edge of the sweep after "
                         f"{len(sel.extensions)} extension(s) (the limit): the optimum may lie beyond it")
    return notes


def _num(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) and math.isfinite(value) else "–"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- the report
def build_report(exp: tracking.Experiment, spec: ExperimentSpec, out_dir: Path,
                 blocked: dict[str, str] | None = None) -> Path:
    """Write report.md, the tables (CSV + Markdown) and figures (PNG) into out_dir and log them, with the
    analysis's numbers as metrics, onto the parent run."""
    from app.plots import save_png

    data = ReportData(spec, exp, blocked)
    analysis = analyse(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"points": points_table(data), "summary": summary_table(data), **analysis.tables}
    sections = [f"# {spec.name} ({spec.size})", "", spec.paper, "", spec.description.strip(), "",
                f"MLflow parent run `{exp.parent_id}` ({exp.tracking_uri}).", ""]
    for name, (header, rows) in tables.items():
        write_csv(out_dir / f"{name}.csv", header, rows)
        (out_dir / f"{name}.md").write_text(markdown_table(header, rows) + "\n")
    for name in [n for n in tables if n not in ("points", "summary")] + ["summary", "points"]:
        sections += [f"## {name}", "", markdown_table(*tables[name]), ""]
    notes = selection_notes(data) + analysis.notes
    cpu = sum(r.cpu_seconds for r in data.rows.values())
    wall = sum(r.wall_seconds for r in data.rows.values())
    if wall:
        notes.append(f"cost: {len(data.rows)} points, {cpu / 60:.1f} CPU-minutes and {wall / 60:.1f} minutes of "
                     "training processes' wall time (the runner's own time and other users of the machine not counted)")
    failed = [r for r in data.rows.values() if r.status == "failed"]
    notes += [f"point {r.point.id} failed: {data.failures.get(r.point.id, '').strip().splitlines()[-1:]}"
              for r in failed]
    if notes:
        sections += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
    if analysis.metrics:
        sections += ["## fitted numbers", ""] + [f"- {k}: {v:.6g}" for k, v in analysis.metrics.items()] + [""]
    figure_files = []
    for name, figure in analysis.figures.items():
        figure_files.append(save_png(figure, str(out_dir / name)))
        sections += [f"![{name}]({name})", ""]
    (out_dir / "report.md").write_text("\n".join(sections))
    files = [str(out_dir / "report.md")] + [str(out_dir / f"{n}.{ext}") for n in tables for ext in ("csv", "md")]
    tracking.log_artifact_files(exp, files + figure_files, "report")
    for key, value in analysis.metrics.items():
        if math.isfinite(value):
            exp.client.log_metric(exp.parent_id, key, float(value))
    exp.client.set_tag(exp.parent_id, "crescent.failed_points", str(len(failed)))
    return out_dir


def report_from_mlflow(tracking_uri: str | None, parent_id: str, out_dir: Path | None = None) -> Path:
    """`crescent experiment report PARENT_RUN`: the spec comes from the parent's spec.yaml artifact."""
    import yaml

    exp = tracking.open_parent(tracking_uri, parent_id)
    tmp = Path(tempfile.mkdtemp(prefix="crescent-report-"))
    try:
        local = exp.client.download_artifacts(parent_id, "spec.yaml", str(tmp))
        spec = parse_spec(yaml.safe_load(Path(local).read_text()), exp.tags.get(tracking.SIZE, "cpu"),
                          source=Path(local).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return build_report(exp, spec, out_dir or Path("runs") / "experiments" / f"{spec.name}-{spec.size}" / "report",
                        blocked_arms(spec))
