"""On CUDA: the experts' torch._grouped_mm path against the segment loop and a float64 reference (forward and
backward, fp32 and bf16), the model on CUDA against the CPU, and the dtypes every hand-written autograd function
computes in under bf16 autocast. Skipped without CUDA (tests/conftest.py); bench/gpu_suite.sh runs them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import BF16_TOL, CUDA, FP32_TOL, exact_fp32_matmuls, randn, rel_err  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from components.model import kernels
from components.model.config import get_preset
from components.model.kernels import expert_swiglu, grouped_mm_supported
from components.model.transformer import build_model

pytestmark = pytest.mark.gpu

EXPERTS, HIDDEN, INTER = 8, 256, 128
COUNTS = [300, 200, 0, 400, 350, 100, 500, 198]  # expert 2 receives no row; rows = 2048


def _expert_inputs(dtype: torch.dtype, seed: int = 0):
    rows = sum(COUNTS)
    xs = randn(rows, HIDDEN, seed=seed, dtype=dtype).requires_grad_()
    weights = [randn(EXPERTS, INTER, HIDDEN, seed=seed + 1, scale=0.05, dtype=dtype).requires_grad_(),
               randn(EXPERTS, INTER, HIDDEN, seed=seed + 2, scale=0.05, dtype=dtype).requires_grad_(),
               randn(EXPERTS, HIDDEN, INTER, seed=seed + 3, scale=0.05, dtype=dtype).requires_grad_()]
    upstream = randn(rows, HIDDEN, seed=seed + 4, dtype=dtype)
    return xs, weights, upstream


def _reference(xs, weights, upstream):
    """down_e(silu(gate_e x) · up_e x) per expert segment in float64 on the CPU, and its gradients."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (xs, *weights)]
    x, gate, up, down = leaves
    out, start = [], 0
    for e, n in enumerate(COUNTS):
        rows = x[start:start + n]
        out.append((F.silu(rows @ gate[e].T) * (rows @ up[e].T)) @ down[e].T)
        start += n
    y = torch.cat(out)
    return y, torch.autograd.grad(y, leaves, upstream.double().cpu())


def _run(path: str, xs, weights, upstream):
    counts = torch.tensor(COUNTS, device=CUDA)
    if path == "grouped":
        y = expert_swiglu(xs, counts, *weights)
    else:
        y = kernels._SegmentFFN.apply(xs, *weights, COUNTS)
    return y, torch.autograd.grad(y, [xs, *weights], upstream)


def test_grouped_mm_is_the_path_bf16_takes_on_this_gpu():
    """H200 is sm90: bf16 rows take torch._grouped_mm, fp32 rows the segment loop."""
    assert torch.cuda.get_device_capability()[0] >= 9, torch.cuda.get_device_name()
    assert grouped_mm_supported(torch.zeros(2, 2, device=CUDA, dtype=torch.bfloat16))
    assert not grouped_mm_supported(torch.zeros(2, 2, device=CUDA, dtype=torch.float32))


def test_grouped_mm_matches_the_segment_loop_and_float64_in_bf16():
    xs, weights, upstream = _expert_inputs(torch.bfloat16)
    ref_y, ref_grads = _reference(xs, weights, upstream)
    grouped_y, grouped_grads = _run("grouped", xs, weights, upstream)
    segment_y, segment_grads = _run("segment", xs, weights, upstream)
    assert grouped_y.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grouped_grads)
    errors = {"forward": (rel_err(grouped_y, ref_y), rel_err(segment_y, ref_y), rel_err(grouped_y, segment_y))}
    for name, g, s, r in zip(("x", "gate", "up", "down"), grouped_grads, segment_grads, ref_grads):
        errors[f"grad {name}"] = (rel_err(g, r), rel_err(s, r), rel_err(g, s))
    assert all(e < BF16_TOL for triple in errors.values() for e in triple), errors
    for g in grouped_grads[1:]:  # the expert that got no row: exactly zero, not stale memory
        assert torch.count_nonzero(g[2]).item() == 0


def test_segment_loop_on_cuda_matches_float64_in_fp32():
    xs, weights, upstream = _expert_inputs(torch.float32, seed=10)
    ref_y, ref_grads = _reference(xs, weights, upstream)
    y, grads = _run("segment", xs, weights, upstream)
    errors = [rel_err(y, ref_y)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < FP32_TOL, errors


def test_grouped_mm_in_fp32_where_torch_offers_it(monkeypatch):
    """The production path sends fp32 to the segment loop; this says whether torch._grouped_mm could take it."""
    xs, weights, upstream = _expert_inputs(torch.float32, seed=20)
    monkeypatch.setattr(kernels, "grouped_mm_supported", lambda x: True)
    try:
        y, grads = _run("grouped", xs, weights, upstream)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._grouped_mm takes no fp32 on this device: {str(err).splitlines()[0]}")
    ref_y, ref_grads = _reference(xs, weights, upstream)
    errors = [rel_err(y, ref_y)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < 1e-3, errors  # tf32 inside the grouped kernel would land near 3e-4


def _tiny(seed: int, preset: str = "tiny"):
    return build_model(get_preset(preset, vocab_size=512, num_hidden_layers=3), device="cpu", seed=seed)


def _loss_grads_routes(model, ids, device, autocast: bool):
    """Loss, every parameter's gradient, and the experts each MoE layer chose (to tell a near-tie flip)."""
    routes = []
    hooks = [moe.gate.register_forward_hook(lambda mod, inp, out: routes.append(out[0].sort(-1).values.cpu()))
             for moe in model.moe_layers()]
    model.zero_grad(set_to_none=True)
    ids = ids.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    for h in hooks:
        h.remove()
    return out.loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}, routes


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten().double().cpu() for g in grads.values()])


def test_a_model_built_on_cuda_has_the_cpu_builds_weights():
    """build_model(device="cuda") (the training module and the GPU benches build this way) initializes under
    `torch.device("cuda")`: the same seeded draws as the CPU, bitwise, and rotary tables and routing biases on CUDA."""
    config = get_preset("tiny", vocab_size=512, num_hidden_layers=3)
    on_cpu, on_cuda = build_model(config, device="cpu", seed=2), build_model(config, device=CUDA, seed=2)
    for (name, p), q in zip(on_cpu.named_parameters(), on_cuda.parameters()):
        assert q.device.type == "cuda" and torch.equal(q.cpu(), p), name
    for (name, b), c in zip(on_cpu.named_buffers(), on_cuda.buffers()):
        assert c.device.type == "cuda" and torch.allclose(c.cpu(), b, rtol=1e-6, atol=0), name


@pytest.mark.parametrize("packed", [False, True], ids=["causal-sdpa", "packed-flex"])
def test_an_empty_micro_batch_runs_forward_and_backward_under_cuda_bf16_autocast(packed):
    """A micro-batch with no rows (lost samples; a rank's padding at the end of the held-out set, which FSDP2 needs
    every rank to run) through the kernels CUDA picks: grouped_mm experts, SDPA or FlexAttention, the fused head.
    Its loss is NaN (nothing to average) and every parameter that a full batch reaches gets a zero gradient."""
    model = build_model(get_preset("tiny", vocab_size=512, num_hidden_layers=2), device=CUDA, seed=0)
    ids = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(3)).to(CUDA)
    segments = torch.ones(2, 128, dtype=torch.long, device=CUDA)
    segments[:, 64:] = 2
    grads = []
    for rows in (2, 0):
        # 'auto' is FlexAttention on CUDA; the full reference batch takes SDPA (no new flex compile in the suite)
        model.attention_backend = "sdpa" if rows else "auto"
        model.zero_grad(set_to_none=True)
        extra = {"segment_ids": segments[:rows]} if packed else {}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:rows, :-1], targets=ids[:rows, 1:], **extra).loss
        loss.backward()
        torch.cuda.synchronize()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.isnan(loss) and grads[1].keys() == grads[0].keys()
    assert all(torch.count_nonzero(g) == 0 for g in grads[1].values())


def test_model_in_fp32_on_cuda_matches_the_cpu():
    """The tiny MoE model (MLA through SDPA, the experts' segment loop, the fused head) on CUDA vs the same
    weights on the CPU. Where every token chose the same experts, each gradient agrees to 1e-4 (kernels and
    reduction orders differ); a near-tie may route a token elsewhere (scores agree to ~1e-7), and then only
    the whole gradient is compared, to 1e-2, with at most 2 tokens routed differently."""
    ids = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads, ref_routes = _loss_grads_routes(_tiny(seed=2), ids, torch.device("cpu"), autocast=False)
    loss, grads, routes = _loss_grads_routes(_tiny(seed=2).to(CUDA), ids, CUDA, autocast=False)
    flipped = sum(int((a != b).any(-1).sum()) for a, b in zip(routes, ref_routes))
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    if flipped == 0:
        errors = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads if ref_grads[n].norm() > 0}
        assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    else:
        assert flipped <= 2 and rel_err(_flat(grads), _flat(ref_grads)) < 1e-2, flipped


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny"])
def test_model_under_cuda_bf16_autocast_stays_near_the_fp32_cpu(preset):
    """Measured on this CPU (bf16 autocast vs fp32, same shapes): loss 1e-6 (dense) / 3e-5 (MoE); dense
    per-parameter gradients 1.1e-2; MoE whole gradient 3-5e-2 (the router runs on bf16 logits, so near-ties route
    some tokens elsewhere). Bounds: loss 1e-3, dense per-parameter 5e-2, MoE whole gradient 0.15."""
    ids = torch.randint(0, 512, (4, 257), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads, _ = _loss_grads_routes(_tiny(2, preset), ids, torch.device("cpu"), autocast=False)
    loss, grads, _ = _loss_grads_routes(_tiny(2, preset).to(CUDA), ids, CUDA, autocast=True)
    assert abs(loss - ref_loss) / ref_loss < 1e-3
    assert all(torch.isfinite(g).all() for g in grads.values())
    if preset == "tiny-dense":
        errors = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
        assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    else:
        assert rel_err(_flat(grads), _flat(ref_grads)) < 0.15


class _ComputeLog(TorchDispatchMode):
    """(op, input dtypes) of every matmul and attention kernel that reaches the device."""

    MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm")
    ATTENTION = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.MATMULS or name.startswith(self.ATTENTION):
            self.calls.append((name, tuple(a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point())))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("expert_path", ["grouped", "segment"])
def test_every_hand_written_function_computes_in_bf16_under_cuda_autocast(expert_path, monkeypatch):
    """_Dispatch/_Permute (dispatch and combine), the experts (_grouped_mm or _SegmentFFN) and _LinearCrossEntropy
    run out of autocast's reach: their matmuls must still see bf16 operands, forward and backward, and the
    parameters' gradients must come back in fp32 and finite."""
    if expert_path == "segment":
        monkeypatch.setattr(kernels, "grouped_mm_supported", lambda x: False)
    model = _tiny(seed=3).to(CUDA)
    ids = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(4)).to(CUDA)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16), _ComputeLog() as forward:
        out = model(ids[:, :-1], targets=ids[:, 1:])
    with _ComputeLog() as backward:
        out.loss.backward()
    calls = forward.calls + backward.calls
    names = {n for n, _ in calls}
    assert ("_grouped_mm" in names) == (expert_path == "grouped"), names
    assert any(n.startswith("_scaled_dot_product") for n in names), names
    not_bf16 = sorted({(n, d) for n, d in calls if any(x != torch.bfloat16 for x in d[:2])})
    assert not not_bf16, not_bf16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_dispatch_and_combine_keep_dtypes_and_invert_each_other_on_cuda():
    """The permutations are pure gathers: bitwise round trip on CUDA, gradients in the input dtype."""
    moe = _tiny(seed=5).to(CUDA).moe_layers()[0]
    x = randn(64, 128, seed=5, dtype=torch.bfloat16).requires_grad_()
    indices, _ = moe.gate(x)
    k = indices.shape[1]
    order = indices.reshape(-1).argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=CUDA)
    xs = kernels.dispatch_to_slots(x, order, inverse, k)
    back = kernels.permute_rows(xs, inverse, order).view(64, k, 128)
    assert xs.dtype == torch.bfloat16 and torch.equal(back, x[:, None].expand(64, k, 128))
    back.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, torch.full_like(x, float(k)))
