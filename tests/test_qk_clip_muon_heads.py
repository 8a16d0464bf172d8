"""Per-head Muon granularity (`muon_granularity: head`): each head's block of the attention projections is one
matrix for Newton–Schulz and the update scale; everything else steps as before."""
from __future__ import annotations

import pytest
import qk_clip_helpers as qh
import torch

from components.optim.head_blocks import block_view
from components.optim.muon import Muon
from components.optim.newton_schulz import newton_schulz
from components.optim.routing import build_muon
from components.optim.update import update_scale

HEAD_PARAMS = ("self_attn.q_proj.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight")


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


def _in_singular_basis(o: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uᵀ O V for G = U Σ Vᵀ: (its off-diagonal part, its diagonal). Newton–Schulz keeps G's singular vectors and
    maps each singular value into the quintic's band, so for O = NS(G) the first is ~0 and the second ~1."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    d = u.T @ o.double() @ vh.T
    diagonal = torch.diagonal(d)
    return d - torch.diag(diagonal), diagonal


def test_head_granularity_routes_the_attention_projections_with_their_head_blocks():
    model = qh.hot_model(q_lora_rank=5)
    opt = build_muon(model, lr=0.02, muon_granularity="head")
    groups = {g["name"]: g for g in opt.param_groups}
    heads = groups["muon_heads"]
    names = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_b_proj", "kv_b_proj", "o_proj")]
    assert sorted(heads["param_names"]) == sorted(names) and heads["algorithm"] == "muon"
    specs = dict(zip(heads["param_names"], heads["blocks"]))
    assert specs["model.layers.0.self_attn.q_b_proj.weight"] == (0, 3)
    assert specs["model.layers.0.self_attn.o_proj.weight"] == (1, 3)
    assert "model.layers.0.self_attn.q_a_proj.weight" in groups["muon"]["param_names"]
    matrix = build_muon(model, lr=0.02)
    assert [g["name"] for g in matrix.param_groups] == ["muon", "adamw"]


def test_bad_granularity_and_bad_blocks_are_refused_with_the_field_named():
    model = qh.hot_model()
    with pytest.raises(ValueError, match=r"muon_granularity='expert' is unknown; choose one of \('matrix', 'head'\)"):
        build_muon(model, lr=0.02, muon_granularity="expert")
    w = model.model.layers[0].self_attn.q_proj.weight  # [18, 16]
    with pytest.raises(ValueError, match=r"parameter 'q' of shape \(18, 16\) has head blocks=\(0, 4\)"):
        Muon([{"params": [w], "param_names": ["q"], "blocks": [(0, 4)]}], lr=0.02)


@pytest.mark.parametrize("q_lora_rank", [None, 5])
def test_each_head_block_of_the_update_is_its_own_orthogonalization(q_lora_rank):
    """One step from zero momentum with lr 1 and no decay: -ΔW = s·NS(X), X = (1+μ)·G (G Gaussian). Per block h:
    -ΔW_h / s_h is NS(X_h) (the same matrix step, scale from the block's own shape); in G_h's singular basis it is
    diagonal with every value in the quintic's band (the SVD polar factor U_h V_hᵀ within the NS tolerance); the
    block of the whole matrix's polar factor is not."""
    model = qh.hot_model(q_lora_rank)
    opt = build_muon(model, lr=1.0, weight_decay=0.0, ns_dtype=torch.float32, muon_granularity="head")
    groups = {g["name"]: g for g in opt.param_groups}
    specs = dict(zip(groups["muon_heads"]["param_names"], groups["muon_heads"]["blocks"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():  # well-conditioned (Gaussian) gradients: the quintic's band then holds
        p.grad = torch.randn(p.shape, generator=gen)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    checked = 0
    for name, p in model.named_parameters():
        if name not in specs:
            continue
        spec = specs[name]
        update = block_view(before[name] - p.detach(), spec)  # s·O per block
        g = block_view(grads[name], spec)
        s = update_scale("moonlight", update.shape)  # 0.2·sqrt(max(a, b)) of one block
        o = update / s
        torch.testing.assert_close(o, newton_schulz(g * 1.95, dtype=torch.float32), rtol=0, atol=1e-5)
        whole = block_view(_polar(grads[name]), spec)
        for h in range(spec[1]):
            inside, singular = _in_singular_basis(o[h], g[h])
            assert float(inside.abs().max()) < 1e-5, (name, h)  # G_h's singular vectors, kept
            assert singular.min() > 0.6 and singular.max() < 1.25, (name, h, singular)  # the quintic's band
            assert torch.linalg.matrix_norm(o[h].double() - _polar(g[h]), ord=2) < 0.35, (name, h)
            assert float(_in_singular_basis(whole[h], g[h])[0].abs().max()) > 1e-2, (name, h)  # not per matrix
        checked += 1
    assert checked == 6
