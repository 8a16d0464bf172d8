"""Resumable checkpoint files: written whole or not at all, verified before a resume, one naming scheme, a full
disk said in one line; a resumed run saves each periodic checkpoint once, at the end of its step. Real files, a
real DCP save, a real (small) tmpfs and real in-process fits; training end to end is in test_robust_train.py."""
from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
import train_helpers as th
from robust_helpers import tmpfs

from app.callbacks.checkpointing import resumable_checkpoint
from app.checkpoint_io import LAST, list_checkpoints, save_sharded, verify_checkpoint, write_checkpoint
from app.run import latest_checkpoint, read_checkpoint_meta
from components.durable import InsufficientSpaceError, write_file


def _state(step: int, numel: int = 1000) -> dict:
    return {"state_dict": {"w": torch.arange(numel, dtype=torch.float32) + step}, "global_step": step,
            "crescent": {"tokens_seen": step * 64}}


def _truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def test_a_truncated_newest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path):
    for step in (2, 4, 6):
        write_checkpoint(_state(step), tmp_path / f"step-{step:08d}.ckpt")
    _truncate(tmp_path / "step-00000006.ckpt")
    (tmp_path / "preempt-step=00000007.ckpt").write_bytes(b"")  # a 0-byte file, as a full disk leaves one
    skipped = []
    assert latest_checkpoint(tmp_path, skipped) == tmp_path / "step-00000004.ckpt"
    assert [(p.name, reason.split(" (")[0]) for p, reason in skipped] == [
        ("preempt-step=00000007.ckpt", "empty file"), ("step-00000006.ckpt", "unreadable")]
    assert "truncated or not a checkpoint" in skipped[1][1]
    assert read_checkpoint_meta(tmp_path / "step-00000004.ckpt") == {"tokens_seen": 256, "global_step": 4}


def test_checkpoints_are_listed_newest_first_and_temporary_or_last_names_are_not_candidates(tmp_path):
    for name in ("step-00000002.ckpt", "preempt-step=00000004.ckpt", "step-00000004.ckpt", "step-00000010.ckpt"):
        torch.save(_state(1), tmp_path / name)
    (tmp_path / LAST).symlink_to("step-00000010.ckpt")
    (tmp_path / ".tmp-step-00000012.ckpt-1a2b3c4d").write_bytes(b"partial")
    (tmp_path / "step-00000011-v1.ckpt").write_bytes(b"")  # Lightning's version suffix: not ours
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000010.ckpt", "preempt-step=00000004.ckpt", "step-00000004.ckpt", "step-00000002.ckpt"]


def test_last_links_the_newest_and_a_newer_checkpoint_supersedes_preemption_ones(tmp_path):
    write_checkpoint(_state(2), tmp_path / "step-00000002.ckpt")
    write_checkpoint(_state(3), tmp_path / "preempt-step=00000003.ckpt")
    assert os.readlink(tmp_path / LAST) == "preempt-step=00000003.ckpt"
    write_checkpoint(_state(4), tmp_path / "step-00000004.ckpt")
    assert os.readlink(tmp_path / LAST) == "step-00000004.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, "step-00000002.ckpt", "step-00000004.ckpt"]
    # Saving again under an existing name replaces it (no -v1 file); `last` stays complete throughout.
    write_checkpoint(_state(44), tmp_path / "step-00000004.ckpt")
    assert torch.load(tmp_path / LAST, weights_only=False)["global_step"] == 44
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, "step-00000002.ckpt", "step-00000004.ckpt"]


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing_and_earlier_ones_stay(tmp_path):
    with tmpfs(tmp_path / "disk", "3m") as disk:
        write_checkpoint(_state(2, numel=250_000), disk / "step-00000002.ckpt")  # 1 MB
        before = (disk / "step-00000002.ckpt").read_bytes()
        with pytest.raises(InsufficientSpaceError) as err:
            write_checkpoint(_state(4, numel=750_000), disk / "step-00000004.ckpt")  # 3 MB
        message = str(err.value)
        assert message.startswith(f"not enough space in {disk} to write step-00000004.ckpt: needs 3.9 MB, ")
        assert message.endswith(" MB free") and "\n" not in message
        assert sorted(p.name for p in disk.iterdir()) == [LAST, "step-00000002.ckpt"]
        assert (disk / "step-00000002.ckpt").read_bytes() == before and verify_checkpoint(disk / LAST) is None


def test_a_disk_that_fills_up_during_the_write_leaves_no_partial_file(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with pytest.raises(InsufficientSpaceError, match=f"not enough space in {disk} to write big.bin"):
            write_file(disk / "big.bin", lambda f: f.write(b"x" * (2 << 20)))  # no estimate: fails mid-write
        assert list(disk.iterdir()) == []


def test_a_sharded_checkpoint_folder_is_published_whole_and_a_truncated_shard_is_named(tmp_path):
    final = tmp_path / "step-00000008.ckpt"

    def save(folder: Path) -> None:  # what Lightning's ModelParallelStrategy writes: DCP shards + meta.pt
        dcp.save({"state_dict": {"w": torch.arange(4096.0)}}, checkpoint_id=folder)
        torch.save({"global_step": 8, "crescent": {"tokens_seen": 512}}, folder / "meta.pt")

    save_sharded(save, final, is_writer=True, barrier=lambda: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, final.name]
    assert verify_checkpoint(final) is None and read_checkpoint_meta(final)["global_step"] == 8
    shard = next(final.glob("*.distcp"))
    _truncate(shard, 0.25)
    assert verify_checkpoint(final).startswith(f"shard {shard.name} is truncated (")
    (final / "meta.pt").unlink()
    assert verify_checkpoint(final) == "meta.pt is missing"


class _Saves(pl.Callback):
    """The checkpoints written (global step, Lightning's count of completed micro-batches in it) and the global
    steps validation ran at."""

    def __init__(self):
        self.saves, self.validations = [], []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        loop = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
        self.saves.append((trainer.global_step, loop["completed"]))

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validations.append(trainer.global_step)


def test_a_resumed_run_saves_each_periodic_checkpoint_once_at_the_end_of_its_step(tmp_path_factory, tmp_path):
    # Two micro-batches a step, a checkpoint every 2 steps, validation every 4 micro-batches. The old callback,
    # resumed from step-2, wrote step-2 again on the first micro-batch (mid-step, one micro-batch later in
    # Lightning's loop count), and a run resumed from that copy validated one micro-batch early, at step 3.
    corpus = th.build_corpus(tmp_path_factory.mktemp("corpus"))

    def fit(directory: Path, max_steps: int, resume: Path | None = None) -> _Saves:
        saves = _Saves()
        th.fit_in_process(corpus, [saves, resumable_checkpoint(directory, every_n_steps=2, keep_last=5)], max_steps,
                          trainer_args={"val_check_interval": 4, "limit_val_batches": 1},
                          data_args={"val_shards": corpus["val"], "val_samples": 8}, ckpt_path=resume)
        return saves

    whole = fit(tmp_path / "whole", 6)
    assert [step for step, _ in whole.saves] == [2, 4, 6] and whole.validations == [2, 4, 6]
    parts = tmp_path / "parts"
    runs = [fit(parts, 2)]
    step2 = parts / "step-00000002.ckpt"
    written = step2.stat()
    runs.append(fit(parts, 4, step2))
    runs.append(fit(parts, 6, parts / "step-00000004.ckpt"))
    assert [s for run in runs for s in run.saves] == whole.saves
    assert [v for run in runs for v in run.validations] == whole.validations
    assert (step2.stat().st_mtime_ns, step2.stat().st_ino) == (written.st_mtime_ns, written.st_ino)
    assert fit(parts, 6, parts / "step-00000006.ckpt").saves == []  # a finished run run again writes nothing


class _Groups(pl.Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        self.groups = {g["name"]: g for g in pl_module.optimizers().optimizer.param_groups}


def test_a_run_resumed_with_changed_optimizer_settings_trains_with_them_and_says_so(tmp_path_factory, tmp_path,
                                                                                    capfd):
    # torch's load_state_dict puts the checkpoint's weight decay and momentum back; the run's MLflow record says
    # the config changed them (param_changed.*), so the config's must be what the resumed steps use.
    corpus = th.build_corpus(tmp_path_factory.mktemp("corpus"))
    th.fit_in_process(corpus, [resumable_checkpoint(tmp_path, every_n_steps=2)], 2, weight_decay=0.1)
    capfd.readouterr()
    groups = _Groups()
    th.fit_in_process(corpus, [groups, resumable_checkpoint(tmp_path, every_n_steps=2)], 3,
                      ckpt_path=tmp_path / "step-00000002.ckpt", weight_decay=0.0, momentum=0.9)
    assert groups.groups["muon"]["weight_decay"] == groups.groups["adamw"]["weight_decay"] == 0.0
    assert groups.groups["muon"]["momentum"] == 0.9
    err = capfd.readouterr().err
    assert "crescent train: resumed with the config's optimizer settings, not the checkpoint's: " in err
    assert "group muon weight_decay: 0.1 -> 0.0" in err and "group muon momentum: 0.95 -> 0.9" in err


@pytest.mark.parametrize("change,named", [({"num_streams": 192}, "data.num_streams: 96 -> 192"),
                                          ({"seed": 5}, "data.seed: 0 -> 5")])
def test_a_resume_that_would_reorder_the_consumed_samples_is_refused_naming_the_change(change, named,
                                                                                      tmp_path_factory, tmp_path):
    from app.module import ConfigError

    corpus = th.build_corpus(tmp_path_factory.mktemp("corpus"))
    th.fit_in_process(corpus, [resumable_checkpoint(tmp_path, every_n_steps=2)], 2)
    with pytest.raises(ConfigError) as err:
        th.fit_in_process(corpus, [resumable_checkpoint(tmp_path, every_n_steps=2)], 3,
                          ckpt_path=tmp_path / "step-00000002.ckpt", data_args=change)
    assert str(err.value).startswith("the configuration orders the checkpoint's 16 consumed samples differently, "
                                     f"so a resume would repeat some and skip others: {named}. Resume with the ")
