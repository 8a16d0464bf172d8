"""Metric math: SVD entropy, expert load statistics, the routing-bias update rule."""
import math
from collections import Counter

import pytest
import torch

from components.metrics.expert_load import ExpertLoad, load_stats
from components.metrics.svd_entropy import group_of, svd_entropy, svd_entropy_by_group
from components.model.balancing import update_routing_bias
from components.model.config import get_preset
from components.model.transformer import build_model


def test_svd_entropy_is_one_for_orthogonal_and_zero_for_rank_one():
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert svd_entropy(q) == pytest.approx(1.0, abs=1e-5)
    rank_one = torch.outer(torch.randn(16), torch.randn(8))
    assert svd_entropy(rank_one) == pytest.approx(0.0, abs=1e-3)


def test_svd_entropy_matches_the_formula_on_known_singular_values():
    sigma = torch.tensor([3.0, 2.0, 1.0])
    p = sigma.pow(2) / sigma.pow(2).sum()
    expected = float(-(p * p.log()).sum() / math.log(3))
    assert svd_entropy(torch.diag(sigma)) == pytest.approx(expected, abs=1e-6)


def test_every_tiny_matrix_belongs_to_a_paper_group():
    model = build_model(get_preset("tiny"), seed=0)
    groups = {group_of(n) for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "lm_head" not in n}
    assert groups == {"AttnQO", "AttnKV", "Experts", "SharedExperts", "Router", "Dense"}
    result = svd_entropy_by_group(model)
    assert set(result) == groups and all(0.5 < v <= 1.0 for v in result.values())  # random init: near 1


def test_load_stats_of_uniform_and_skewed_loads():
    stats = load_stats(torch.tensor([[10, 10, 10, 10]]))
    assert stats["cv"].item() == 0 and stats["max_over_mean"].item() == 1
    stats = load_stats(torch.tensor([[40, 0, 0, 0]]))
    assert stats["max_over_mean"].item() == 4 and stats["min_over_mean"].item() == 0
    assert stats["cv"].item() == pytest.approx(math.sqrt(3))


def test_expert_load_metric_accumulates_counts():
    metric = ExpertLoad(num_layers=2, num_experts=4)
    metric.update(torch.tensor([[1, 2, 3, 4], [4, 4, 4, 4]]))
    metric.update(torch.tensor([[3, 2, 1, 0], [0, 0, 0, 0]]))
    assert metric.compute()["cv"].item() == 0  # both layers end up perfectly balanced


def test_routing_bias_update_follows_moonlight_rule():
    bias = torch.zeros(4)
    counts = torch.tensor([10, 30, 20, 20])  # mean 20: expert 0 under, 1 over, 2 and 3 exactly balanced
    delta = update_routing_bias(bias, counts, rate=1e-3)
    sign = torch.tensor([1.0, -1.0, 0.0, 0.0])
    torch.testing.assert_close(delta, 1e-3 * (sign - sign.mean()))
    torch.testing.assert_close(bias, delta)
    assert update_routing_bias(bias, counts, rate=0.0).abs().sum() == 0  # the cooldown freezes the bias


def test_routing_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    config = get_preset("tiny")
    model = build_model(config, seed=0)
    router = model.moe_layers()[0].gate
    with torch.no_grad():
        router.weight[0] += 0.5  # make expert 0 attract most tokens
    x = torch.randn(2048, config.hidden_size)
    before = load_stats(torch.bincount(router(x)[0].view(-1), minlength=8)[None])["cv"].item()
    for _ in range(300):
        counts = torch.bincount(router(x)[0].view(-1), minlength=8)
        update_routing_bias(router.e_score_correction_bias, counts, rate=1e-3)
    after = load_stats(torch.bincount(router(x)[0].view(-1), minlength=8)[None])["cv"].item()
    assert after < before / 2


def test_negative_rate_is_rejected():
    with pytest.raises(ValueError, match="rate=-0.1"):
        update_routing_bias(torch.zeros(2), torch.ones(2), rate=-0.1)


def test_every_per_matrix_svd_measure_maps_back_to_its_paper_group():
    """The svd-entropy report pairs `measure/svd/...` keys by group; an expert's key carries its index."""
    from app.experiments.measure import svd_entropy_by_matrix, svd_matrix_group

    model = build_model(get_preset("tiny"), seed=0)
    measures = svd_entropy_by_matrix(model, experts_per_layer=2)
    by_group = Counter(svd_matrix_group(key) for key in measures)
    assert None not in by_group
    expert_params = [n for n, p in model.named_parameters() if p.ndim == 3 and group_of(n) == "Experts"]
    assert expert_params and by_group["Experts"] == 2 * len(expert_params)
    assert set(by_group) == {"AttnQO", "AttnKV", "Experts", "SharedExperts", "Router", "Dense"}
