"""The hand-written autograd pieces of the model: fused LM head + cross-entropy, and expert dispatch/combine.

Each is compared, value and gradient, with the plain PyTorch expression it replaces.
"""
import pytest
import torch
import torch.nn.functional as F
from test_model import SMALL
from torch.utils._python_dispatch import TorchDispatchMode

from components.model.config import ModelConfig
from components.model.fused_loss import linear_cross_entropy
from components.model.moe import Experts
from components.model.transformer import build_model


def _reference_head(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)


@pytest.mark.parametrize("chunk_elements", [None, 7 * 50, 50 * 50])  # default (one chunk), uneven chunks, many
def test_linear_cross_entropy_matches_unfused_head(chunk_elements):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(123, 16, generator=gen, requires_grad=True)
    w = (0.3 * torch.randn(50, 16, generator=gen)).requires_grad_()
    t = torch.randint(0, 50, (123,), generator=gen)
    t[::4] = -100
    expected = _reference_head(x, w, t)
    gx, gw = torch.autograd.grad(2.5 * expected, (x, w))
    got = linear_cross_entropy(x, w, t, chunk_elements=chunk_elements)
    hx, hw = torch.autograd.grad(2.5 * got, (x, w))  # a non-unit upstream gradient must scale both
    assert abs(got.item() - expected.item()) < 1e-6
    torch.testing.assert_close(hx, gx, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(hw, gw, atol=1e-7, rtol=1e-5)
    assert hx[::4].abs().max().item() == 0.0  # ignored positions get no gradient


def test_linear_cross_entropy_bf16_and_no_grad():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen).bfloat16().requires_grad_()
    w = (0.3 * torch.randn(40, 16, generator=gen)).bfloat16().requires_grad_()
    t = torch.randint(0, 40, (64,), generator=gen)
    got = linear_cross_entropy(x, w, t)
    got.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert abs(got.item() - _reference_head(x.detach(), w.detach(), t).item()) < 1e-3
    with torch.no_grad():  # evaluation: same value (that no gradient work is done is tested below)
        assert linear_cross_entropy(x, w, t).item() == pytest.approx(got.item(), abs=1e-6)


def test_second_backward_through_the_same_graph_is_refused():
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    loss = linear_cross_entropy(x, w, torch.randint(0, 10, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_model_fused_loss_equals_loss_from_logits():
    model = build_model(ModelConfig(**SMALL), seed=4)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    fused = model(ids[:, :-1], targets=ids[:, 1:])
    assert fused.logits is None
    grads = torch.autograd.grad(fused.loss, list(model.parameters()))
    plain = model(ids[:, :-1], targets=ids[:, 1:], return_logits=True)
    assert plain.logits.shape == (2, 11, 101)
    expected = F.cross_entropy(plain.logits.reshape(-1, 101).float(), ids[:, 1:].reshape(-1))
    assert abs(fused.loss.item() - expected.item()) < 1e-6
    for g, h in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)


def test_expert_dispatch_gradients_match_a_per_token_loop():
    config = ModelConfig(**SMALL)
    experts = Experts(config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    x = torch.randn(30, config.hidden_size, generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(30)])
    indices[:10] = torch.tensor([3, 5])  # a crowded expert; experts 0..7 may also be empty
    weights = torch.rand(30, 2, generator=gen, requires_grad=True)
    counts = torch.bincount(indices.reshape(-1), minlength=8)
    upstream = torch.randn(30, config.hidden_size, generator=gen)

    got = torch.autograd.grad((experts(x, indices, weights, counts) * upstream).sum(),
                              [x, weights, *experts.parameters()])
    rows = []
    for t in range(30):
        y = 0
        for j in range(2):
            e = indices[t, j]
            h = F.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            y = y + weights[t, j] * (experts.down_proj[e] @ h)
        rows.append(y)
    expected = torch.autograd.grad((torch.stack(rows) * upstream).sum(), [x, weights, *experts.parameters()])
    for g, h in zip(got, expected):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


def _random_experts() -> tuple[ModelConfig, Experts]:
    config = ModelConfig(**SMALL)
    experts = Experts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    return config, experts


def test_experts_without_tokens_get_exactly_zero_gradients():
    config, experts = _random_experts()
    x = torch.randn(12, config.hidden_size, requires_grad=True)
    indices = torch.tensor([[1, 3], [5, 1], [3, 5]] * 4)
    counts = torch.bincount(indices.reshape(-1), minlength=8)
    for _ in range(2):  # twice: the second backward must not see the first one's buffers
        experts.zero_grad(set_to_none=True)
        experts(x, indices, torch.rand(12, 2), counts).square().sum().backward()
        for p in experts.parameters():
            unused = [e for e in range(8) if e not in (1, 3, 5)]
            assert torch.count_nonzero(p.grad[unused]).item() == 0
            assert torch.count_nonzero(p.grad[[1, 3, 5]]).item() > 0


class _MatmulLog(TorchDispatchMode):
    """Records (op name, input dtypes) of every matmul that reaches the kernels."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "bmm", "_grouped_mm"):
            self.calls.append((name, tuple(a.dtype for a in args if torch.is_tensor(a))))
        return func(*args, **(kwargs or {}))


def test_linear_cross_entropy_does_no_gradient_work_without_grad_mode():
    x = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)  # parameters require grad, as in validation
    t = torch.randint(0, 50, (64,))
    with torch.no_grad(), _MatmulLog() as log:
        value = linear_cross_entropy(x, w, t, chunk_elements=32 * 50)
    assert [name for name, _ in log.calls] == ["mm", "mm"]  # the two chunks' logits, no gradient matmuls
    with torch.inference_mode():
        assert linear_cross_entropy(x, w, t, chunk_elements=32 * 50).item() == value.item()


def test_hand_written_functions_compute_in_the_autocast_dtype():
    model = build_model(ModelConfig(**SMALL), seed=6)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulLog() as log:
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    with _MatmulLog() as backward_log:
        loss.backward()
    calls = log.calls + backward_log.calls
    assert len(calls) > 20
    assert all(d == torch.bfloat16 for _, dtypes in calls for d in dtypes[:2]), \
        sorted({(n, d) for n, d in calls if torch.float32 in d[:2]})
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


def test_all_ignored_targets_give_zero_gradients_like_torch():
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    t = torch.full((6,), -100)
    loss = linear_cross_entropy(x, w, t)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x @ w.t(), t))
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_experts_take_an_empty_batch():
    config, experts = _random_experts()
    x = torch.zeros(0, config.hidden_size, requires_grad=True)
    y = experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(8, dtype=torch.long))
    assert y.shape == (0, config.hidden_size)
    y.sum().backward()
    assert x.grad.shape == (0, config.hidden_size)
