"""On CUDA: FlexAttention with the document block mask (what packed SFT samples use there) against SDPA with the
dense boolean mask, and against each document attended alone, forward and backward, fp32 and bf16, at the
`small` preset's head dims; and the model's `auto` backend choosing it. Skipped without CUDA."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import BF16_TOL, CUDA, exact_fp32_matmuls, randn, rel_err  # noqa: F401

from components.model.config import get_preset
from components.model.document_mask import DENSE_LIMIT_ON_GPU, DocumentMask
from components.model.transformer import build_model

pytestmark = pytest.mark.gpu

HEADS, HEAD_DIM = 4, 96  # small: qk_nope 64 + qk_rope 32; v (64) is zero-padded to 96 as the model does
FLEX_FP32_TOL = 1e-4  # a compiled Triton kernel with its own reduction order (fp32 dots: tf32 is off)


def _segments(lengths: list[int], seq_len: int, batch: int = 2) -> torch.Tensor:
    """segment ids [batch, seq_len]: documents of `lengths` back to back (numbered from 1), then padding (0);
    row b starts with the b-th document, so that rows differ."""
    rows = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        at = 0
        for k, n in enumerate(lengths[b:] + lengths[:b], 1):
            rows[b, at:at + n] = k
            at += n
    return rows.to(CUDA)


def _qkv(batch: int, seq_len: int, dtype, seed: int):
    q, k, v = (randn(batch, HEADS, seq_len, HEAD_DIM, seed=seed + i, dtype=dtype).requires_grad_()
               for i in range(3))
    return q, k, v


def _attend(backend: str, seg, q, k, v, upstream):
    out = DocumentMask(seg, backend).attend(q, k, v, HEAD_DIM ** -0.5)
    return out, torch.autograd.grad(out, (q, k, v), upstream)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FLEX_FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_flex_matches_sdpa_with_the_dense_mask(dtype, tol):
    seg = _segments([300, 17, 129, 400, 90], 1024)
    q, k, v = _qkv(2, 1024, dtype, seed=0)
    upstream = randn(2, HEADS, 1024, HEAD_DIM, seed=9, dtype=dtype)
    flex, flex_grads = _attend("flex", seg, q, k, v, upstream)
    sdpa, sdpa_grads = _attend("sdpa", seg, q, k, v, upstream)
    assert flex.dtype == dtype
    errors = [rel_err(flex, sdpa)] + [rel_err(a, b) for a, b in zip(flex_grads, sdpa_grads)]
    assert max(errors) < tol, errors


def test_flex_past_the_dense_limit_equals_each_document_alone():
    """4096 tokens: the dense mask is refused on the GPU (the exact message), and FlexAttention gives each
    document what causal SDPA gives it alone."""
    seq_len = 2 * DENSE_LIMIT_ON_GPU
    lengths = [1500, 3, 1100, 1400]  # 4003 tokens, then 93 of padding
    seg = _segments(lengths, seq_len, batch=1)
    with pytest.raises(RuntimeError, match=rf"use the flex backend for packed samples longer than "
                                           rf"{DENSE_LIMIT_ON_GPU} tokens"):
        DocumentMask(seg, "sdpa").dense()
    q, k, v = _qkv(1, seq_len, torch.bfloat16, seed=3)
    upstream = randn(1, HEADS, seq_len, HEAD_DIM, seed=4, dtype=torch.bfloat16)
    out, grads = _attend("flex", seg, q, k, v, upstream)
    at = 0
    for n in lengths:
        part = slice(at, at + n)
        alone = F.scaled_dot_product_attention(q[:, :, part], k[:, :, part], v[:, :, part], is_causal=True,
                                               scale=HEAD_DIM ** -0.5)
        alone_grads = torch.autograd.grad(alone, (q, k, v), upstream[:, :, part])
        assert rel_err(out[:, :, part], alone) < BF16_TOL, n
        for got, ref in zip(grads, alone_grads):  # the gradient a document sends reaches only its own rows
            assert rel_err(got[:, :, part], ref[:, :, part]) < BF16_TOL, n
        at += n


def test_packed_model_on_cuda_picks_flex_and_matches_sdpa():
    """The model's `auto` backend is FlexAttention on CUDA; a 2-layer model with `small`'s attention (4 heads, so
    that the compiled kernel of the fp32 test above is reused) over packed rows gives the loss and gradients the
    SDPA backend gives (fp32). Dense FFNs: a routing near-tie would move a token to another expert."""
    config = get_preset("small", num_hidden_layers=2, vocab_size=1024, num_attention_heads=HEADS,
                        n_routed_experts=0, first_k_dense_replace=0)
    model = build_model(config, device="cpu", seed=0).to(CUDA)
    seg = _segments([500, 211, 300], 1024)
    ids = torch.randint(0, 1024, (2, 1025), generator=torch.Generator().manual_seed(5)).to(CUDA)
    assert DocumentMask(seg, "auto").backend == "flex"
    results = {}
    for backend in ("auto", "sdpa"):
        model.attention_backend = backend
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(ids[:, :-1], targets=ids[:, 1:], segment_ids=seg).loss
        loss.backward()
        results[backend] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None and p.grad.norm() > 0}
    (flex_loss, flex_grads), (sdpa_loss, sdpa_grads) = results["auto"], results["sdpa"]
    assert abs(flex_loss - sdpa_loss) / sdpa_loss < 1e-5
    errors = {n: rel_err(flex_grads[n], sdpa_grads[n]) for n in sdpa_grads}
    assert max(errors.values()) < 1e-3, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_a_new_packing_of_the_same_shape_does_not_recompile():
    """Every SFT step builds a new DocumentMask (new segment ids, a new mask closure); with the shapes unchanged,
    the compiled FlexAttention (and the compiled block-mask builder) must be reused, not compiled again."""
    from torch._dynamo.utils import counters

    q, k, v = (t.detach() for t in _qkv(2, 1024, torch.bfloat16, seed=6))
    DocumentMask(_segments([300, 17, 129, 400, 90], 1024), "flex").attend(q, k, v, HEAD_DIM ** -0.5)
    graphs = counters["stats"]["unique_graphs"]
    for lengths in ([1000], [10, 500, 500]):
        DocumentMask(_segments(lengths, 1024), "flex").attend(q, k, v, HEAD_DIM ** -0.5)
    assert counters["stats"]["unique_graphs"] == graphs
