"""The report from MLflow alone: child runs with known losses in a real MLflow store (no training) give the fitted
numbers those losses imply (compute ratio at equal loss from L = a·C^b, tokens-equivalent from AdamW's L(D)), the
tables and the figures, logged onto the parent run; and the spread wording."""
from __future__ import annotations

import csv
import math

import pytest
from mlflow.entities import Metric

from app.experiments import tracking
from app.experiments.configs import base_config, model_config_of, point_tokens
from app.experiments.plan import Outcome, plan
from app.experiments.report import build_report
from app.experiments.results import Stats, compare_text
from app.experiments.spec import load_spec
from components.metrics.fits import PowerLaw, SaturatingPowerLaw
from components.model.counting import flops_per_token

ADAMW, MUON = PowerLaw(40.0, -0.08), PowerLaw(38.0, -0.08)  # L = a·C^b at each arm's best lr
SEED_OFFSET = {0: -0.004, 1: 0.004}


def test_spread_wording():
    assert "inside the spread" in compare_text("a", Stats([2.0, 2.02]), "b", Stats([2.01, 2.03]))
    text = compare_text("a", Stats([2.0, 2.002]), "b", Stats([2.1, 2.102]))
    assert "a lower by 0.1000" in text and "outside the spread" in text
    assert Stats([2.0, 2.02]).fmt() == "2.0100 ± 0.0100"


def _flops(spec, point) -> tuple[float, int]:
    config = base_config(spec, point)
    tokens = point_tokens(spec, point, config)
    return flops_per_token(model_config_of(config), spec.schedule.seq_len) * tokens, tokens


def test_scaling_report_fits_the_losses_it_was_given(tmp_path):
    spec = load_spec("scaling", "cpu")
    exp = tracking.find_or_create_parent(f"sqlite:///{tmp_path}/mlflow.db", "crescent-experiments", spec.name,
                                         spec.size, "test")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.source)
    tracking.log_artifact_files(exp, [str(spec_file)])
    # AdamW's L(D) at the tokens group: a saturating law through its power-law loss at the budget the lr is
    # selected at.
    fixed = next(p for p in plan(spec, {}).todo if p.group == spec.analysis["tokens_group"])
    c32, d32 = _flops(spec, fixed)
    l_d = SaturatingPowerLaw(alpha=1.0, beta=0.35, gamma=float(ADAMW(c32)) - 1.0 * d32 ** -0.35)

    def loss(point) -> float:
        c, d = _flops(spec, point)
        best = {"adamw": ADAMW, "muon": MUON}[point.arm]
        base = float(l_d(d)) if point.arm == "adamw" and point.budget != 1.0 else float(best(c))
        return base + 0.05 * abs(math.log2(point.lr_scale)) + SEED_OFFSET[point.seed]

    outcomes: dict[str, Outcome] = {}
    while True:
        todo = plan(spec, outcomes).todo
        if not todo:
            break
        for point in todo:
            _, tokens = _flops(spec, point)
            run = exp.client.create_run(exp.experiment_id, run_name=point.id, tags={
                tracking.PARENT_TAG: exp.parent_id, tracking.POINT: point.id, "crescent.arm": point.arm,
                "crescent.tokens": str(tokens)})
            value = loss(point)
            exp.client.log_batch(run.info.run_id, metrics=[
                Metric("train/tokens", float(tokens), 0, 1), Metric("val/loss", value + 0.5, 0, 0),
                Metric("val/loss", value, 1, 1), Metric("train/loss", value - 0.01, 1, 1)], synchronous=True)
            exp.client.set_terminated(run.info.run_id, "FINISHED")
            outcomes[point.id] = Outcome(True, value)
    out = build_report(exp, spec, tmp_path / "report")
    metrics = exp.client.get_run(exp.parent_id).data.metrics
    c_max = max(_flops(spec, p)[0] for p in plan(spec, outcomes).points if p.group == spec.groups[-1].name)
    expected_ratio = MUON.inverse(float(ADAMW(c_max))) / c_max
    assert metrics["muon_compute_ratio_at_equal_loss"] == pytest.approx(expected_ratio, rel=1e-6)
    assert metrics["muon_compute_ratio_at_equal_loss_reuse_lr"] == pytest.approx(expected_ratio, rel=1e-6)
    assert metrics["fit/adamw/b"] == pytest.approx(-0.08, rel=1e-6)
    assert metrics["fit/adamw_tokens/gamma"] == pytest.approx(l_d.gamma, abs=2e-3)
    expected_tokens = d32 / l_d.inverse(float(MUON(c32)))
    assert metrics["muon_tokens_to_match_adamw"] == pytest.approx(expected_tokens, rel=0.03)
    for name in ("scaling_law.png", "adamw_loss_vs_tokens.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert f"| {spec.groups[-1].name} | AdamW | sweep | 0.5 (" in summary
    artifacts = {a.path for a in exp.client.list_artifacts(exp.parent_id, "report")}
    assert {"report/scaling.csv", "report/scaling.md", "report/scaling_law.png", "report/report.md"} <= artifacts


def test_a_run_trained_with_another_config_is_not_taken_for_the_point(tmp_path):
    from app.experiments.runner import ExperimentRunner, RunnerOptions
    from app.experiments.spec import SpecError

    spec = load_spec("weight-decay", "cpu")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runner = ExperimentRunner(spec, RunnerOptions(work_dir=tmp_path / "work", tracking_uri=uri))
    exp = runner.open()
    point = plan(spec, {}).todo[0]
    run = exp.client.create_run(exp.experiment_id, run_name=point.id, tags={
        tracking.PARENT_TAG: exp.parent_id, tracking.POINT: point.id, "crescent.group": point.group,
        "crescent.arm": point.arm, "crescent.lr_scale": repr(point.lr_scale), "crescent.seed": str(point.seed),
        "crescent.budget": "1.0", "crescent.tokens": "655360", "crescent.config_fingerprint": "0123456789abcdef"})
    exp.client.log_metric(run.info.run_id, "train/tokens", 655360.0)
    exp.client.set_terminated(run.info.run_id, "FINISHED")
    with pytest.raises(SpecError, match="1 finished point\\(s\\) of this parent run were trained with another config"):
        runner.run()
    (tmp_path / "work" / "points" / point.id).mkdir(parents=True)
    fresh = ExperimentRunner(spec, RunnerOptions(work_dir=tmp_path / "work", tracking_uri=uri, new=True))
    with pytest.raises(SpecError, match="--new needs a fresh work directory"):
        fresh.run()


def test_each_store_s_parent_gets_the_spec_even_when_the_work_dir_already_holds_it(tmp_path):
    """`crescent experiment report` reads the spec from the parent's artifact: a `plan` against another store that
    wrote spec.yaml into the same work directory first must not keep the real store's parent from getting it."""
    from app.experiments.runner import ExperimentRunner, RunnerOptions

    spec = load_spec("scaling", "cpu")
    work = tmp_path / "work"
    ids = []
    for store in ("other", "real"):
        runner = ExperimentRunner(spec, RunnerOptions(work_dir=work, tracking_uri=f"sqlite:///{tmp_path}/{store}.db"))
        exp = runner.open()
        assert [a.path for a in exp.client.list_artifacts(exp.parent_id)] == ["spec.yaml"], store
        ids.append(exp.parent_id)
    local = exp.client.download_artifacts(ids[1], "spec.yaml", str(tmp_path))
    assert open(local).read() == spec.source


def test_update_rms_table8_at_one_lr_reads_every_rms_at_the_reference_lr(tmp_path):
    """The paper's Table 8 holds the lr fixed while r varies: the table reads each Muon r arm at the reference
    arm's selected lr_scale, whatever that arm selected for itself, and AdamW at its own selected lr."""
    spec = load_spec("update-rms", "cpu")
    exp = tracking.find_or_create_parent(f"sqlite:///{tmp_path}/mlflow.db", "crescent-experiments", spec.name,
                                         spec.size, "test")
    best_lr = {"adjusted-lr": 2.0, "t8-adamw": 1.0, "rms-0.05": 8.0}  # the rest: 1.0 (inside the first sweep)
    r_of = {"rms-0.05": 0.05, "rms-0.1": 0.1, "rms-0.2": 0.2, "rms-0.4": 0.4, "rms-0.8": 0.8}

    def loss(point) -> float:
        # At each arm's best lr, loss = 4 + |log2(r / 0.2)| / 10: the paper's shape, lowest at r = 0.2.
        shape = abs(math.log2(r_of.get(point.arm, 0.2) / 0.2)) / 10 + (0.3 if point.arm == "t8-adamw" else 0)
        return 4.0 + shape + 0.05 * abs(math.log2(point.lr_scale / best_lr.get(point.arm, 1.0))) \
            + SEED_OFFSET[point.seed]

    outcomes: dict[str, Outcome] = {}
    while todo := plan(spec, outcomes).todo:
        for point in todo:
            _, tokens = _flops(spec, point)
            run = exp.client.create_run(exp.experiment_id, run_name=point.id, tags={
                tracking.PARENT_TAG: exp.parent_id, tracking.POINT: point.id, "crescent.arm": point.arm,
                "crescent.tokens": str(tokens), tracking.MEASURED: "done"})
            value = loss(point)
            exp.client.log_batch(run.info.run_id, metrics=[
                Metric("train/tokens", float(tokens), 0, 1), Metric("val/loss", value, 1, 1),
                Metric("train/loss", value - 0.3, 1, 1), Metric("measure/attn_q_rms", point.lr_scale / 100, 1, 1),
                Metric("measure/mlp_up_rms", point.lr_scale / 50, 1, 1)], synchronous=True)
            exp.client.set_terminated(run.info.run_id, "FINISHED")
            outcomes[point.id] = Outcome(True, value)
    out = build_report(exp, spec, tmp_path / "report")
    metrics = exp.client.get_run(exp.parent_id).data.metrics
    with open(out / "table8_at_reference_lr.csv", newline="") as f:
        by_arm = {row[1]: row for row in list(csv.reader(f))[1:]}
    assert by_arm["rms-0.05"][2] == "2" and by_arm["rms-0.8"][2] == "2"  # the reference's lr, not their own
    assert by_arm["t8-adamw"][2] == "1 (its own)"
    for arm, r in r_of.items():  # seed 0 only: no r arm selected the reference's lr
        expected = 4.0 + abs(math.log2(r / 0.2)) / 10 + 0.05 * abs(math.log2(2.0 / best_lr.get(arm, 1.0)))
        assert metrics[f"val_loss_at_reference_lr/{arm.replace('-', '_')}"] == pytest.approx(
            expected + SEED_OFFSET[0], abs=1e-9), arm
    assert by_arm["rms-0.05"][6] == f"{0.04:.2e} (1 seed)"  # MLP RMS at lr_scale 2, seed 0
    assert (out / "table8_at_reference_lr_val_loss.png").stat().st_size > 0
