"""Parameter routing: matrices, router and expert stacks to Muon; embeddings, head, norms, biases to AdamW."""
import pytest
import torch
from torch import nn

from components.model.config import get_preset
from components.model.transformer import build_model
from components.optim.muon import Muon
from components.optim.routing import build_muon, build_param_groups, format_routing_table, route_parameters


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny"), seed=0)


def test_tiny_model_routes(tiny):
    routes = route_parameters(tiny)
    assert routes["model.embed_tokens.weight"] == "adamw"
    assert routes["lm_head.weight"] == "adamw"
    assert routes["model.norm.weight"] == "adamw"
    assert routes["model.layers.0.self_attn.kv_a_layernorm.weight"] == "adamw"
    assert routes["model.layers.0.self_attn.q_proj.weight"] == "muon"
    assert routes["model.layers.1.mlp.gate.weight"] == "muon"  # the router
    assert routes["model.layers.1.mlp.experts.down_proj"] == "muon"  # a 3-D expert stack
    assert all(r == "adamw" for n, r in routes.items() if dict(tiny.named_parameters())[n].ndim < 2)


def test_override_forcing_a_vector_onto_muon_names_it(tiny):
    with pytest.raises(ValueError, match="'model.norm.weight' has shape \\(128,\\)"):
        route_parameters(tiny, overrides={"model.norm.weight": "muon"})
    routes = route_parameters(tiny, overrides={"*.q_proj.weight": "adamw"})
    assert routes["model.layers.3.self_attn.q_proj.weight"] == "adamw"
    with pytest.raises(ValueError, match="matches no parameter"):
        route_parameters(tiny, overrides={"nothing.*": "adamw"})


def test_norm_weight_decay_is_configurable_and_defaults_to_the_shared_value(tiny):
    groups = build_param_groups(tiny, lr=1e-3, weight_decay=0.1, norm_weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["adamw_norm"]["weight_decay"] == 0.0 and by_name["adamw"]["weight_decay"] == 0.1
    assert "model.norm.weight" in by_name["adamw_norm"]["param_names"]
    opt = build_muon(tiny, lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw"]
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert total == sum(p.numel() for p in tiny.parameters())


def test_routing_table_lists_every_parameter_and_totals(tiny):
    table = format_routing_table(tiny)
    assert "model.layers.1.mlp.experts.gate_proj" in table and "(8, 128, 128)" in table
    muon_total = sum(p.numel() for n, p in tiny.named_parameters() if route_parameters(tiny)[n] == "muon")
    assert f"{muon_total:,}" in table


def test_build_muon_trains_the_tiny_model(tiny):
    model = build_model(get_preset("tiny"), seed=1)
    opt = build_muon(model, lr=3e-3, ns_dtype=torch.float32)
    x = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert isinstance(opt, Muon) and 0 < opt.last_stats["muon/update_rms"] < 0.25


def test_plain_named_parameters_route_by_name():
    named = [("embed.weight", nn.Parameter(torch.ones(4, 3))), ("w", nn.Parameter(torch.ones(3, 3))),
             ("b", nn.Parameter(torch.ones(3)))]
    assert route_parameters(named) == {"embed.weight": "adamw", "w": "muon", "b": "adamw"}
