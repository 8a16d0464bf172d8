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
    assert lost and lost[0][1] > 0 and min(bad) >= 1  # logged on the steps they happened, from the first one
    assert [v for _, v in lost] == sorted(v for _, v in lost)  # running totals of the whole job
    assert lost[-1][1] < STEPS * 16  # samples of that one shard only
