"""The held-out loss runs in the validation loop's precision wherever it is called from (in process, on the CPU)."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from train_helpers import fit_in_process


class RecordPrecision(pl.Callback):
    """Records, for each forward of the model in eval mode (the held-out passes), whether bf16 autocast was on."""

    def __init__(self):
        self.eval_forwards: list[tuple[str, bool]] = []
        self.stage = "start"

    def on_train_start(self, trainer, pl_module):  # callbacks run before the module's own on_train_start
        forward = pl_module.model.forward

        def recording(*args, **kwargs):
            if not pl_module.model.training:
                self.eval_forwards.append((self.stage, torch.is_autocast_enabled("cpu")
                                           and torch.get_autocast_dtype("cpu") == torch.bfloat16))
            return forward(*args, **kwargs)

        pl_module.model.forward = recording

    def on_train_batch_end(self, *args):
        self.stage = "end"


def test_held_out_loss_at_start_and_end_runs_under_bf16_mixed_autocast(corpus):
    """Lightning applies autocast only inside its step calls; the start and end held-out passes run from hooks
    (on_train_start, on_train_end), and ran in fp32 while the regular validation loop ran in bf16 (one val/loss
    curve, two precisions)."""
    callback = RecordPrecision()
    module = fit_in_process(corpus, callback, max_steps=2, trainer_args={"precision": "bf16-mixed"},
                            data_args={"val_shards": corpus["val"], "val_samples": 8})
    stages = {stage for stage, _ in callback.eval_forwards}
    assert stages == {"start", "end"}, callback.eval_forwards  # both hooks' held-out passes were seen
    assert all(on for _, on in callback.eval_forwards), callback.eval_forwards
    assert torch.isfinite(torch.tensor([module.val_loss_start, module.val_loss])).all()
