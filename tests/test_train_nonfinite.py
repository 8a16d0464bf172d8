"""The module's policy for non-finite steps, end to end in a real Lightning fit (in process, CPU).

A callback makes chosen micro-batches' losses NaN, as a diverged forward pass would, or (loss finite) one
parameter's gradient NaN, as an overflow in backward would. Such a window must be skipped (weights, optimizer state
and routing biases untouched, the skip counted, the data still consumed) and training must go on;
`model.max_nonfinite_in_a_row` skipped steps in a row of either kind must stop the fit with NonFiniteLossError.
"""
import lightning.pytorch as pl
import pytest
import torch
from train_helpers import fit_in_process, poison_forward

from app.module import NonFiniteLossError
from app.step import step_report


class PoisonLoss(pl.Callback):
    """Multiplies by NaN the loss (or, with `gradient=True`, the gradient of one attention matrix, the loss
    staying finite) of each micro-batch n for which `poisoned(n)` holds; records the weights, the optimizer state and
    the routing biases after each optimizer step, from the step's report."""

    def __init__(self, poisoned, gradient: bool = False):
        self.poisoned, self.gradient, self.after_step, self.reports = poisoned, gradient, [], []

    def on_train_start(self, trainer, module):
        if self.gradient:
            target = module.model.model.layers[0].self_attn.o_proj.weight
            poison_forward(module, self.poisoned, lambda loss: loss + 0.0 * _nan_gradient(target).sum())
        else:
            poison_forward(module, self.poisoned)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        report = step_report(outputs)
        if report is not None:
            state = module.optimizers().optimizer.state_dict()["state"]
            self.reports.append(report)
            self.after_step.append((report.skipped_steps, report.consumed_samples,
                                    [p.detach().clone() for p in module.model.parameters()],
                                    {k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
                                     for k, s in state.items()},
                                    [m.gate.e_score_correction_bias.clone() for m in module.model.moe_layers()]))


class _NaNGrad(torch.autograd.Function):
    """Identity forward; backward hands back NaN: a finite loss whose gradient overflowed."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _nan_gradient(weight):
    return _NaNGrad.apply(weight)


def test_a_nan_window_is_skipped_and_training_goes_on(corpus):
    # Batch 8 of micro-batch 4: two micro-batches a step. Micro-batch 3 is the second half of step 2's window.
    callback = PoisonLoss(lambda micro: micro == 3)
    module = fit_in_process(corpus, callback, max_steps=5)
    skipped = [s for s, _, _, _, _ in callback.after_step]
    assert skipped == [0, 1, 1, 1, 1] and module.skipped_steps == 1  # 5 steps, the second one skipped
    assert [c for _, c, _, _, _ in callback.after_step] == [8, 16, 24, 32, 40]  # the poisoned data is consumed
    assert [r.skip_reason for r in callback.reports] == [None, "loss", None, None, None]
    # The skipped step has its own number, as a gradient skip does: one value per metric and step in the store.
    assert [r.step for r in callback.reports] == [1, 2, 3, 4, 5]
    (_, _, before, state_before, _), (_, _, after, state_after, _) = callback.after_step[0], callback.after_step[1]
    for a, b in zip(before, after):  # the skipped step left every weight exactly as it was
        assert torch.equal(a, b)
    for key in state_before:  # and the optimizer's momentum buffers too
        for name in state_before[key]:
            assert torch.equal(state_before[key][name], state_after[key][name])
    final = callback.after_step[-1][2]
    assert all(torch.isfinite(p).all() for p in final)
    assert any(not torch.equal(a, b) for a, b in zip(after, final))  # training went on after the skip
    assert module.nonfinite_in_a_row == 0


@pytest.mark.parametrize("gradient", [False, True], ids=["loss", "gradient"])
def test_too_many_skipped_steps_in_a_row_stop_with_a_clear_error(corpus, gradient):
    callback = PoisonLoss(lambda micro: micro >= 2, gradient=gradient)  # every window after the first step
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row were skipped for a non-finite loss or "
                                                 r"gradient \(model.max_nonfinite_in_a_row=3\)"):
        fit_in_process(corpus, callback, max_steps=10, max_nonfinite_in_a_row=3)
    assert [s for s, _, _, _, _ in callback.after_step] == [0, 1, 2]  # the third skip raised before recording
    assert [r.skip_reason for r in callback.reports] == [None] + ["gradient" if gradient else "loss"] * 2
    assert all(torch.isfinite(p).all() for p in callback.after_step[-1][2])


def test_a_skipped_gradient_step_leaves_weights_state_and_routing_bias_untouched(corpus):
    callback = PoisonLoss(lambda micro: micro in (2, 3), gradient=True)  # both halves of step 2
    fit_in_process(corpus, callback, max_steps=3)
    assert [r.skip_reason for r in callback.reports] == [None, "gradient", None]
    (_, _, w0, s0, b0), (_, _, w1, s1, b1), (_, _, w2, _, b2) = callback.after_step
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert all(torch.equal(s0[k][n], s1[k][n]) for k in s0 for n in s0[k])
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))  # the bias did not move on the skipped step
    assert any(not torch.equal(a, b) for a, b in zip(b1, b2))  # and moves again on the next real step
    assert callback.reports[1].bias_update_rate == 0.0 and callback.reports[2].bias_update_rate == 1e-3
