"""Elastic resume: a preempted job often comes back on fewer or more nodes. A run of each distributed strategy,
checkpointed on 2 gloo processes, resumes on 1 (and a 1-process run on 2): weights, optimizer state and the data
position carry over, and the losses after the resume match an uninterrupted single-process run within 1e-4
(the same samples in the same global batches: nothing repeated, nothing skipped)."""
from __future__ import annotations

import pytest
import torch
import train_helpers as th

STEPS = 12
STOP = 6  # the first part stops (and checkpoints) here
TOKENS = th.SEQ_LEN * 16 * STEPS  # global batch 16 sequences of 64 tokens

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    uri, _ = th.train_once(tmp_path_factory.mktemp("reference"), corpus, TOKENS)
    return dict(th.metric_history(uri, "test", "train/loss"))


# Each strategy from 2 processes to 1; 1 to 2 once, with FSDP2 (the sharded checkpoint resharded onto more ranks;
# ZeRO-1 checkpoints hold the consolidated state, so its 1 -> 2 path is the 2 -> 1 load in reverse).
@pytest.mark.parametrize("strategy,before,after", [("muon_ddp", 2, 1), ("muon_fsdp", 2, 1), ("muon_fsdp", 1, 2)],
                         ids=["2to1-muon_ddp", "2to1-muon_fsdp", "1to2-muon_fsdp"])
def test_resume_on_another_world_size_continues_the_same_run(strategy, before, after, corpus, reference, tmp_path):
    from app.run import latest_checkpoint, read_checkpoint_meta

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    # Every 5 steps: the checkpoint at STOP = 6 is the one a run stopped by max_steps saves of its final state.
    config = th.write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", uri, TOKENS,
                             run__checkpoint_every_n_steps=5)
    common = ("--config", str(config), "--trainer.strategy", strategy)
    th.crescent("train", *common, "--trainer.devices", str(before), "--trainer.max_steps", str(STOP), cwd=tmp_path)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    meta = read_checkpoint_meta(checkpoint)
    assert meta["consumed_samples"] == STOP * 16  # the global data position, whatever the world size

    resumed = th.crescent("train", *common, "--trainer.devices", str(after), cwd=tmp_path, timeout=900)
    assert "resuming from" in resumed.stderr
    losses = th.metric_history(uri, "test", "train/loss")  # one MLflow run, continued
    assert sorted(s for s, _ in losses) == list(range(1, STEPS + 1))
    ours = dict(losses)
    assert max(abs(ours[s] - reference[s]) for s in range(1, STEPS + 1)) < 1e-4
    final = read_checkpoint_meta(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert final["consumed_samples"] == STEPS * 16


def test_reference_losses_are_finite_and_fall(reference):
    values = [reference[s] for s in sorted(reference)]
    assert all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0]
