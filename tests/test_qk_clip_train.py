"""QK-clip in the training loop: off and τ = ∞ train bitwise alike, a clip follows every step that updated and no
skipped one, the report and MLflow carry the per-layer max logits and the heads clipped, and a run resumed after a
clipped step ends bitwise where the uninterrupted run ends."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import train_helpers as th
from safetensors.torch import load_file

from app.module import CrescentModule
from app.step import step_report

TAU = 0.1  # below the tiny model's initial max logits (0.15-0.2): every head clips at first


class Reports(pl.Callback):
    """The step reports and the weights after each step; micro-batches in `poisoned` get a NaN loss."""

    def __init__(self, poisoned=()):
        self.poisoned, self.reports, self.weights = set(poisoned), [], []

    def on_train_start(self, trainer, module):
        th.poison_forward(module, self.poisoned.__contains__)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        report = step_report(outputs)
        if report is not None:
            self.reports.append(report)
            self.weights.append({n: p.detach().clone() for n, p in module.model.named_parameters()})


def _fit(corpus, steps: int, poisoned=(), **module_args) -> Reports:
    reports = Reports(poisoned)
    th.fit_in_process(corpus, reports, steps, **module_args)
    return reports


def test_off_and_infinite_threshold_train_bitwise_alike_and_off_tracks_nothing(corpus):
    off, inf = _fit(corpus, 3), _fit(corpus, 3, qk_clip_threshold=float("inf"))
    for a, b in zip(off.weights, inf.weights):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(r.max_logit is None and r.qk_clipped_heads is None for r in off.reports)  # no callback asked
    assert all(r.max_logit.shape == (2, 4) and r.qk_clipped_heads.tolist() == [0, 0] for r in inf.reports)
    assert all(bool(torch.isfinite(r.max_logit).all()) for r in inf.reports)


def test_every_updating_step_clips_and_a_skipped_step_does_not(corpus):
    # Micro-batch 3 is the second half of step 2's window: that step is skipped.
    clipped = _fit(corpus, 4, poisoned={3}, qk_clip_threshold=TAU)
    reports = clipped.reports
    assert [r.skip_reason for r in reports] == [None, "loss", None, None]
    assert reports[0].qk_clipped_heads.tolist() == [4, 4]  # every head's max logit started above τ
    assert bool((reports[0].max_logit > TAU).all())
    assert reports[1].qk_clipped_heads is None  # skipped: no update, no clip
    assert all(torch.equal(clipped.weights[0][n], clipped.weights[1][n]) for n in clipped.weights[0])
    assert all(r.qk_clipped_heads is not None for r in reports[2:])
    off = _fit(corpus, 1)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(off.weights[0][q], clipped.weights[0][q])  # the clip changed the query weights


def test_head_granularity_trains_through_the_module(corpus):
    heads = _fit(corpus, 2, muon_granularity="head", qk_clip_threshold=TAU)
    assert "muon_heads/update_rms" in heads.reports[-1].optimizer_stats
    assert all(bool(torch.isfinite(torch.tensor(r.loss))) for r in heads.reports)
    with pytest.raises(ValueError, match=r"model.muon_granularity='block' is unknown; choose one of \('matrix', "
                                         r"'head'\)"):
        CrescentModule(muon_granularity="block")
    with pytest.raises(ValueError, match="model.qk_clip_threshold=-1.0 must be a number > 0"):
        CrescentModule(qk_clip_threshold=-1.0)


STEPS, STOP = 6, 3
TOKENS = th.SEQ_LEN * 16 * STEPS
SCHEDULE = {"seq_len": th.SEQ_LEN, "stages": [
    {"name": "main", "end_tokens": TOKENS, "lr_shape": "linear", "lr_start": 3e-3, "lr_end": 3e-4, "batch_size": 16,
     "mixture": {"prose": 0.7, "code": 0.3}, "bias_update_rate": 1e-3}]}
CLIPPED = dict(model__qk_clip_threshold=TAU, model__schedule=SCHEDULE, run__checkpoint_every_n_steps=STOP)


def _export(run_dir) -> dict[str, torch.Tensor]:
    return load_file(sorted((run_dir / "exports").glob("step-*"))[-1] / "model.safetensors")


@pytest.fixture(scope="module")
def clipped_run(corpus, tmp_path_factory):
    """One uninterrupted single-process clipped run (`crescent train`)."""
    root = tmp_path_factory.mktemp("clipped")
    uri, _ = th.train_once(root, corpus, TOKENS, **CLIPPED)
    return {"uri": uri, "run": root / "run"}


@pytest.mark.slow
def test_mlflow_gets_every_layers_max_logit_and_the_heads_clipped_each_step(clipped_run):
    clipped = th.metric_history(clipped_run["uri"], "test", "attn/qk_clipped_heads")
    assert [s for s, _ in sorted(clipped)] == list(range(1, STEPS + 1)) and dict(clipped)[1] == 8.0
    for key in ("attn/layer_00/max_logit", "attn/layer_01/max_logit", "attn/max_logit"):
        history = dict(th.metric_history(clipped_run["uri"], "test", key))
        assert sorted(history) == list(range(1, STEPS + 1)), key
        assert history[1] > TAU, key  # measured before the first clip


@pytest.mark.slow
def test_a_run_resumed_after_a_clipped_step_ends_bitwise_where_the_uninterrupted_run_ends(corpus, clipped_run,
                                                                                         tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", uri, TOKENS, **CLIPPED)
    th.crescent("train", "--config", str(config), "--trainer.max_steps", str(STOP), cwd=tmp_path)
    resumed = th.crescent("train", "--config", str(config), cwd=tmp_path)
    assert "resuming from" in resumed.stderr
    ours, reference = _export(tmp_path / "run"), _export(clipped_run["run"])
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert sorted(th.metric_history(uri, "test", "attn/qk_clipped_heads")) == sorted(
        th.metric_history(clipped_run["uri"], "test", "attn/qk_clipped_heads"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["muon_ddp", "muon_fsdp"])
def test_a_clipped_run_on_two_gloo_processes_matches_one_process(strategy, corpus, clipped_run, tmp_path):
    """Through the strategies: max logits all-reduced (MAX) over ranks, ZeRO-1 rescaling full weights, FSDP2 the
    local rows of its DTensors; the losses follow the one-process run within 1e-4 (the elastic-resume bound)."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", uri, TOKENS, **CLIPPED)
    th.crescent("train", "--config", str(config), "--trainer.strategy", strategy, "--trainer.devices", "2",
                cwd=tmp_path, timeout=900)
    ours, reference = (dict(th.metric_history(u, "test", "train/loss")) for u in (uri, clipped_run["uri"]))
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert max(abs(ours[s] - reference[s]) for s in ours) < 1e-4
    clipped = dict(th.metric_history(uri, "test", "attn/qk_clipped_heads"))
    assert clipped[1] == 8.0 and sorted(clipped) == list(range(1, STEPS + 1))
