"""`crescent train` end to end on a small real corpus: MLflow contents, SIGTERM + resume, distributed parity,
bad configuration. Each run is a real subprocess (the DDP/FSDP ones launch real gloo processes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import train_helpers as th
from safetensors.torch import load_file

STEPS = 12
TOKENS = th.SEQ_LEN * 16 * STEPS  # global batch 16 sequences of 64 tokens


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """One uninterrupted single-process run that several tests compare against."""
    root = tmp_path_factory.mktemp("reference")
    uri, result = th.train_once(root, corpus, TOKENS)
    return {"root": root, "uri": uri, "run": root / "run", "stderr": result.stderr}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    export = sorted((run_dir / "exports").glob("step-*"))[-1]
    return load_file(export / "model.safetensors")


def test_run_logs_params_metrics_and_plots_to_mlflow(reference_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(reference_run["uri"])
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.preset"] == "tiny" and params["model.optimizer"] == "muon"
    assert params["data.micro_batch_size"] == "4"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, STEPS + 1))
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lr[1] == 0.0 and max(lr.values()) > 1e-3  # the warmup starts at 0
    for key in ("optim/muon/update_rms", "optim/adamw/update_rms", "experts/cv", "experts/max_over_mean",
                "svd_entropy/Experts", "svd_entropy/Router", "attn/max_logit", "val/loss",
                "train/device/items_per_sec"):
        assert client.get_metric_history(run.info.run_id, key), key
    rms = client.get_metric_history(run.info.run_id, "optim/muon/update_rms")
    assert all(0.1 < m.value < 0.3 for m in rms if m.step > 1)  # Lemma 1 with the 0.2·sqrt(max(A,B)) scale
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss_lr.png", "plots/expert_load.png", "plots/svd_entropy.png", "plots/update_rms.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "plots", "export"}
    export = {a.path for a in client.list_artifacts(run.info.run_id, f"export/step-{STEPS:08d}")}
    assert {f"export/step-{STEPS:08d}/{f}" for f in ("config.json", "model.safetensors", "crescent.json")} <= export
    assert run.data.tags["crescent.export"].endswith(f"exports/step-{STEPS:08d}")
    meta = json.loads((Path(run.data.tags["crescent.export"]) / "crescent.json").read_text())
    assert meta["run_id"] == run.info.run_id  # and the key that finds the run before it has an id (eval/tracking)
    assert meta["run_tags"] == {"crescent.run_key": run.data.tags["crescent.run_key"]}


def test_stages_drive_lr_mixture_and_bias_rate(reference_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(reference_run["uri"])
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    stage = [m.value for m in client.get_metric_history(run.info.run_id, "train/stage")]
    assert stage[0] == 0 and stage[-1] == 2 and stage == sorted(stage)  # all three stages, in order
    rate = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "experts/bias_rate")}
    assert rate[1] == 1e-3 and rate[STEPS] == 0.0  # the cooldown freezes the routing bias


@pytest.mark.slow
def test_sigterm_checkpoint_then_resume_matches_uninterrupted_run_bitwise(corpus, reference_run, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", uri, TOKENS)
    checkpoints = tmp_path / "run" / "checkpoints"
    returncode, out = th.preempt_after(config, checkpoints / "step-00000004.ckpt", cwd=tmp_path)
    assert returncode == 143, out  # preempted: retriable exit for the Job's podFailurePolicy
    assert "Traceback" not in out
    preempt = sorted(checkpoints.glob("preempt-step=*.ckpt"))
    assert len(preempt) == 1 and 4 <= int(preempt[0].stem.split("=")[1]) < STEPS

    resumed = th.crescent("train", "--config", str(config), cwd=tmp_path)
    assert "resuming from" in resumed.stderr
    ours, reference = _weights(tmp_path / "run"), _weights(reference_run["run"])
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    # The same MLflow run continued: one run, every step's loss exactly once.
    steps = [s for s, _ in th.metric_history(uri, "test", "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))
    _assert_plots_cover_the_whole_run(uri, tmp_path)

    # The same command once more, on the finished run: it resumes at the schedule's end and trains nothing.
    val = th.metric_history(uri, "test", "val/loss")
    again = th.crescent("train", "--config", str(config), cwd=tmp_path)
    assert f"resuming from {checkpoints}/step-{STEPS:08d}.ckpt" in again.stderr
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "run").values(), ours.values()))
    assert [s for s, _ in th.metric_history(uri, "test", "train/loss")] == steps
    assert th.metric_history(uri, "test", "val/loss") == val


def _assert_plots_cover_the_whole_run(uri: str, tmp_path: Path) -> None:
    """The logged loss/lr plot is the one the run's complete metric history gives (both segments, validation
    included), byte for byte."""
    from mlflow import MlflowClient

    from app import plots
    from app.callbacks.plots import PLOTTED
    from app.tracking.store import read_metric_history
    from components.schedule import StageSchedule

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    history = read_metric_history(uri, run.info.run_id, PLOTTED)
    assert len(history["val/loss"]) >= 3 and sorted(history["train/loss"]) == list(range(1, STEPS + 1))
    expected = tmp_path / "expected.png"
    figures = plots.training_figures(history, StageSchedule.from_dict(th.schedule(TOKENS)).boundaries())
    plots.save_png(figures["loss_lr.png"], str(expected))
    logged = client.download_artifacts(run.info.run_id, "plots/loss_lr.png", str(tmp_path))
    assert Path(logged).read_bytes() == expected.read_bytes()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["muon_ddp", "muon_fsdp"])
def test_two_gloo_processes_match_single_process_losses(strategy, corpus, reference_run, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", uri, TOKENS)
    th.crescent("train", "--config", str(config), "--trainer.devices", "2", "--trainer.strategy", strategy,
                "--trainer.max_steps", "10", cwd=tmp_path)
    ours = [v for _, v in th.metric_history(uri, "test", "train/loss")]
    reference = [v for _, v in th.metric_history(reference_run["uri"], "test", "train/loss")][:10]
    assert len(ours) == 10
    assert max(abs(a - b) for a, b in zip(ours, reference)) < 1e-4
    # The held-out loss over all 17 sequences (rank 0 reads 9, rank 1 8 and one empty micro-batch: under FSDP2 a
    # rank that ran one forward less left the other waiting in its all-gather): the same mean as on one process.
    val, reference_val = dict(th.metric_history(uri, "test", "val/loss")), \
        dict(th.metric_history(reference_run["uri"], "test", "val/loss"))
    assert abs(val[0] - reference_val[0]) < 1e-4
    assert {0, 8, 10} <= val.keys() and all(v == v for v in val.values())  # start, interval, end: not NaN


@pytest.mark.parametrize("override,key", [
    (("--model.preset", "huge"), "model preset 'huge'"),
    (("--model.lr_scale", "-1"), "model.lr_scale=-1.0"),
    (("--data.micro_batch_size", "3"), "batch_size=16 is not divisible by data.micro_batch_size"),
    (("--trainer.limit_train_batches", "3"), "trainer.limit_train_batches=3 is not supported: the training stream "
                                             "is one pass in global sample order with no epochs"),
])
def test_bad_config_stops_before_training_naming_the_key(override, key, corpus, tmp_path):
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", f"sqlite:///{tmp_path}/m.db", TOKENS)
    result = th.crescent("train", "--config", str(config), *override, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_stage_boundaries_out_of_order_are_rejected(corpus, tmp_path):
    schedule = th.schedule(TOKENS)
    schedule["stages"][1]["end_tokens"] = 10  # before the warmup's end
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", f"sqlite:///{tmp_path}/m.db",
                             TOKENS, model__schedule=schedule)
    result = th.crescent("train", "--config", str(config), cwd=tmp_path, check=False)
    assert result.returncode != 0 and "end_tokens" in result.stderr and "Traceback" not in result.stderr


def test_batch_not_divisible_by_ranks_is_rejected(corpus, tmp_path):
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", f"sqlite:///{tmp_path}/m.db",
                             TOKENS, data__micro_batch_size=3, data__num_streams=96)
    result = th.crescent("train", "--config", str(config), "--trainer.devices", "2", "--trainer.strategy",
                         "muon_ddp", cwd=tmp_path, check=False, timeout=300)
    assert result.returncode != 0 and "batch_size=16" in result.stderr and "Traceback" not in result.stderr


def test_print_config_shows_resolved_sections(tmp_path):
    result = th.crescent("train", "--config", str(th.ROOT / "app/configs/tiny-cpu.yaml"), "--print_config",
                         cwd=tmp_path)
    assert "preset: tiny" in result.stdout and "strategy:" in result.stdout and "dir: runs/tiny-cpu" in result.stdout

