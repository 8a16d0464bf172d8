"""What observes a `crescent train` run: monitors and extra loggers configured in YAML see the metrics, data
errors reach MLflow on the step they happen, and plots are rebuilt from the whole run's history."""
from __future__ import annotations

import csv
import shutil

import pytest
import train_helpers as th
import yaml

STEPS = 12
TOKENS = th.SEQ_LEN * 16 * STEPS  # global batch 16 sequences of 64 tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return th.build_corpus(tmp_path_factory.mktemp("corpus"))


def _run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_yaml_monitor_checkpoint_and_csv_logger_see_the_metrics_beside_mlflow(corpus, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", uri, TOKENS)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/loss", "mode": "min", "save_top_k": 1, "dirpath": str(tmp_path / "best"),
                      "filename": "best-{step}"}}]
    data["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                  "init_args": {"save_dir": str(tmp_path / "csv"), "name": "run"}}]
    config.write_text(yaml.safe_dump(data))
    th.crescent("train", "--config", str(config), cwd=tmp_path)

    client = MlflowClient(uri)
    run = _run(client, "test")
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(loss) == list(range(1, STEPS + 1))
    val = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss") if m.step > 0]
    assert len({s for s, _ in val}) >= 3  # validation every 8 micro-batches = 2 optimizer steps
    best_step = min(val, key=lambda sv: sv[1])[0]
    assert [p.name for p in (tmp_path / "best").iterdir()] == [f"best-step={best_step}.ckpt"]

    rows = list(csv.DictReader(open(tmp_path / "csv" / "run" / "version_0" / "metrics.csv")))
    csv_loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert csv_loss == pytest.approx(loss, rel=1e-6)  # every step once, the same numbers as MLflow
    assert {int(r["step"]) for r in rows if r.get("val/loss")} == {s for s, _ in val} | {0}
    hparams = yaml.safe_load(open(tmp_path / "csv" / "run" / "version_0" / "hparams.yaml"))
    assert hparams["model.preset"] == "tiny" == run.data.params["model.preset"]
    assert not any(k.startswith(("preset", "optimizer")) for k in run.data.params)  # params once, one scheme
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/loss_lr.png"}


@pytest.mark.slow
def test_a_truncated_shard_streams_through_training_and_mlflow_counts_the_lost_samples(corpus, tmp_path):
    from mlflow import MlflowClient

    shards = {}
    for name, path in corpus["shards"].items():
        shutil.copytree(path, tmp_path / name)
        shards[name] = str(tmp_path / name)
    victim = sorted((tmp_path / "prose").glob("shard-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:6000])  # a few samples survive the cut
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "config.yaml", {**corpus, "shards": shards}, tmp_path / "run", uri, TOKENS)
    th.crescent("train", "--config", str(config), cwd=tmp_path)

    client = MlflowClient(uri)
    run = _run(client, "test")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(
        range(1, STEPS + 1))  # training went on
    lost = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "data/lost_samples"))
    bad = [m.value for m in client.get_metric_history(run.info.run_id, "data/bad_shards")]
    # Logged at the steps they happened: the failed read (read-ahead: a step or more before its samples are due),
    # then each step whose micro-batches miss samples (tests/test_data_stream.py checks each micro-batch's count).
    assert lost and lost[-1][1] > 0 and min(bad) >= 1
    assert [v for _, v in lost] == sorted(v for _, v in lost)  # running totals of the whole job
    assert lost[-1][1] < STEPS * 16  # samples of that one shard only


def test_a_completed_schedule_logs_one_final_val_loss_the_whole_held_out_sets(corpus, tmp_path):
    # 16 steps of 8 sequences, 8 held-out sequences, Lightning's validation limited to one micro-batch of 4. At
    # the step the schedule completes the module logs the loss over the whole set; the pass Lightning adds after a
    # stop used to log its 4-sequence subset at the same step, after it (what a reader taking the last value got).
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv", version=0)
    final = {}

    class Final(pl.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            final["whole set"] = pl_module.held_out_loss()

    module = th.fit_in_process(corpus, Final(), 20, total_tokens=16 * 8 * th.SEQ_LEN,
                               trainer_args={"logger": logger, "limit_val_batches": 1, "val_check_interval": 100},
                               data_args={"val_shards": corpus["val"], "val_samples": 8})
    logger.finalize("success")
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")) if r.get("val/loss")]
    assert [int(r["step"]) for r in rows] == [0, 16] and module.stop_reason == "schedule_complete"
    assert float(rows[-1]["val/loss"]) == pytest.approx(final["whole set"], abs=1e-6) == module.val_loss
