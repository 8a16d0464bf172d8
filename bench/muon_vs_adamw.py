"""Muon vs AdamW from the `scaling` experiment's cpu size (app/experiments/scaling.yaml): four dense sizes, tokens
≈ 20 × parameters, every run read at the end of its own complete schedule, lr swept for both optimizers, 2 seeds.

Runs (or resumes: finished points are read back from MLflow, not trained again) `crescent experiment run scaling
--size cpu`, prints the per-size table, then the numbers the fits give: the compute Muon needs to reach AdamW's
loss at the largest size (the paper: 0.519×) and the tokens-equivalent ratio from AdamW's L(D) at one size (Muon's
tokens over the tokens AdamW needs for Muon's final loss). Both for Muon at its own best lr; the `_reuse_lr` lines
are the paper's protocol (Muon at AdamW's lr). Last line: `muon_tokens_to_match_adamw: X`.

Tracking store: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db (as `crescent experiment`); work directory
runs/experiments/scaling-cpu. Measured: 56 points, 35 minutes on 2 idle cores.
"""
from __future__ import annotations

import math
import sys

from app.experiments.runner import ExperimentRunner, RunnerOptions, default_work_dir
from app.experiments.spec import load_spec


def main() -> None:
    spec = load_spec("scaling", "cpu")
    summary = ExperimentRunner(spec, RunnerOptions(work_dir=default_work_dir(spec))).run()
    if summary.interrupted or summary.report_dir is None:
        sys.exit("scaling experiment interrupted; run again to continue")
    print((summary.report_dir / "scaling.md").read_text())
    from app.experiments.tracking import open_parent

    exp = open_parent(None, summary.parent_id)
    metrics = exp.client.get_run(summary.parent_id).data.metrics
    if summary.failed:
        print(f"failed points: {sorted(summary.failed)}")
    for name in ("muon_compute_ratio_at_equal_loss_reuse_lr", "muon_tokens_to_match_adamw_reuse_lr",
                 "muon_compute_ratio_at_equal_loss", "muon_tokens_to_match_adamw"):
        print(f"{name}: {metrics.get(name, math.nan):.3f}")


if __name__ == "__main__":
    main()
