"""The module's policy for non-finite losses, end to end in a real Lightning fit (in process, CPU).

A callback makes chosen micro-batches' losses NaN, as a diverged forward pass would. A window with a NaN loss
must be skipped (weights and optimizer state untouched, the skip counted, the data still consumed) and training
must go on; `model.max_nonfinite_in_a_row` skipped steps in a row must stop the fit with NonFiniteLossError.
"""
import lightning.pytorch as pl
import pytest
import torch
from train_helpers import VOCAB, build_corpus, schedule

from app.datamodule import CrescentDataModule
from app.module import CrescentModule, NonFiniteLossError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


class PoisonLoss(pl.Callback):
    """Multiplies by NaN the loss of each micro-batch n for which `poisoned(n)` holds; records the weights and the
    optimizer state after each optimizer step."""

    def __init__(self, poisoned):
        self.poisoned, self.micro, self.after_step = poisoned, 0, []

    def on_train_start(self, trainer, module):
        forward = module.model.forward

        def poisoned_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            if self.poisoned(self.micro):
                out.loss = out.loss * float("nan")
            self.micro += 1
            return out

        module.model.forward = poisoned_forward

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.stepped:
            state = module.optimizers().optimizer.state_dict()["state"]
            self.after_step.append((module.skipped_steps, module.consumed_samples,
                                    [p.detach().clone() for p in module.model.parameters()],
                                    {k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
                                     for k, s in state.items()}))


def _fit(corpus, callback, max_steps, **module_args):
    module = CrescentModule(preset="tiny", model_overrides={"vocab_size": VOCAB, "num_hidden_layers": 2,
                                                            "max_position_embeddings": 128},
                            schedule=schedule(200_000, batch_size=8), ns_dtype="float32", **module_args)
    data = CrescentDataModule(shards=corpus["shards"], tokenizer=corpus["tokenizer"], micro_batch_size=4,
                              num_workers=0, num_streams=96, schedule=schedule(200_000, batch_size=8))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return module


def test_a_nan_window_is_skipped_and_training_goes_on(corpus):
    # Batch 8 of micro-batch 4: two micro-batches a step. Micro-batch 3 is the second half of step 2's window.
    callback = PoisonLoss(lambda micro: micro == 3)
    module = _fit(corpus, callback, max_steps=4)
    skipped = [s for s, _, _, _ in callback.after_step]
    assert skipped == [0, 1, 1, 1, 1] and module.skipped_steps == 1  # 4 real steps, 1 skipped in between
    assert [c for _, c, _, _ in callback.after_step] == [8, 16, 24, 32, 40]  # the poisoned data is consumed
    (_, _, before, state_before), (_, _, after, state_after) = callback.after_step[0], callback.after_step[1]
    for a, b in zip(before, after):  # the skipped step left every weight exactly as it was
        assert torch.equal(a, b)
    for key in state_before:  # and the optimizer's momentum buffers too
        for name in state_before[key]:
            assert torch.equal(state_before[key][name], state_after[key][name])
    final = callback.after_step[-1][2]
    assert all(torch.isfinite(p).all() for p in final)
    assert any(not torch.equal(a, b) for a, b in zip(after, final))  # training went on after the skip
    assert module.nonfinite_in_a_row == 0


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error(corpus):
    callback = PoisonLoss(lambda micro: micro >= 2)  # every window after the first optimizer step
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row had a non-finite loss "
                                                 r"\(model.max_nonfinite_in_a_row=3\)"):
        _fit(corpus, callback, max_steps=10, max_nonfinite_in_a_row=3)
    assert [s for s, _, _, _ in callback.after_step] == [0, 1, 2]  # the third skip raised before recording
    assert all(torch.isfinite(p).all() for p in callback.after_step[-1][2])
