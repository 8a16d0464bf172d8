"""The model on its own: KV cache, causality, routing, presets, counting, validation."""
import pytest
import torch

from components.model.config import PRESETS, ModelConfig, get_preset
from components.model.counting import count_parameters, flops_per_token
from components.model.moe import Experts, Router, gate_scaling_factor
from components.model.transformer import build_model

SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
             max_position_embeddings=128, rope_theta=10000.0)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_kv_cache_decoding_equals_full_forward(q_lora_rank):
    model = build_model(ModelConfig(**SMALL, q_lora_rank=q_lora_rank), seed=0).eval()
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(32)
        parts = [model(ids[:, :10], cache=cache).logits]  # prefill
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(10, 20)]  # one token at a time
        parts += [model(ids[:, 20:], cache=cache).logits]  # a multi-token chunk after a cached prefix
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_future_tokens_never_change_earlier_logits():
    model = build_model(ModelConfig(**SMALL), seed=1).eval()
    ids = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 9:] = (changed[0, 9:] + 7) % 101
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, :9] - b[:, :9]).abs().max().item() < 1e-6  # same up to float summation order
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_left_padding_with_attention_mask_matches_unpadded():
    model = build_model(ModelConfig(**SMALL), seed=2).eval()
    ids = torch.randint(1, 101, (1, 12), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids).logits
        got = model(padded, attention_mask=mask).logits[:, 5:]
    assert (got - plain).abs().max().item() < 1e-5


def test_router_bias_chooses_experts_but_weights_stay_unbiased():
    config = ModelConfig(**SMALL)
    router = Router(config)
    torch.nn.init.normal_(router.weight, 0, 0.5)
    x = torch.randn(64, 32)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 10.0  # forces expert 3 into every top-k
        indices, weights = router(x)
    assert (indices == 3).any(dim=1).all()
    scores = torch.sigmoid(x @ router.weight.t())
    chosen = scores.gather(1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * config.routed_scaling_factor)


def test_grouped_routing_only_picks_experts_from_topk_groups():
    config = ModelConfig(**{**SMALL, "n_group": 4, "topk_group": 1})
    router = Router(config)
    torch.nn.init.normal_(router.weight, 0, 1.0)
    indices, _ = router(torch.randn(200, 32))
    groups = indices // 2
    assert (groups == groups[:, :1]).all()  # both experts come from the same (single) kept group


def test_expert_dispatch_equals_per_token_reference():
    config = ModelConfig(**SMALL)
    experts = Experts(config)
    torch.nn.init.normal_(experts.gate_proj, 0, 0.3)
    torch.nn.init.normal_(experts.up_proj, 0, 0.3)
    torch.nn.init.normal_(experts.down_proj, 0, 0.3)
    x = torch.randn(40, 32)
    indices = torch.randint(0, 8, (40, 2))
    indices[:, 1] = (indices[:, 0] + 1 + torch.randint(0, 7, (40,))) % 8
    weights = torch.rand(40, 2)
    counts = torch.bincount(indices.view(-1), minlength=8)
    got = experts(x, indices, weights, counts)
    expected = torch.zeros_like(x)
    for t in range(40):
        for j in range(2):
            e = indices[t, j]
            h = torch.nn.functional.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            expected[t] += weights[t, j] * (experts.down_proj[e] @ h)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forward_returns_expert_counts_per_moe_layer():
    config = ModelConfig(**SMALL)
    model = build_model(config, seed=3)
    out = model(torch.randint(0, 101, (2, 10)), targets=torch.randint(0, 101, (2, 10)))
    assert out.expert_counts.shape == (2, 8)  # 3 layers, the first dense
    assert out.expert_counts.sum(dim=1).tolist() == [2 * 10 * 2] * 2
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_initialization_draws_the_same_values_under_another_default_device():
    """build_model(device="cuda") initializes inside `with torch.device("cuda")`, where an unplaced torch.empty lands
    on the GPU and refuses the CPU generator (seen on no GPU yet: a CPU run never hits it). "meta" stands in for the
    other device here: with an unplaced draw the copy fails ("Cannot copy out of meta tensor")."""
    model = build_model(ModelConfig(**SMALL), seed=3)
    expected = {name: p.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with torch.device("meta"):
        model.reset_parameters(3)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, expected[name]), name
    assert any(p.abs().sum() > 0 for p in expected.values() if p.ndim >= 2)


def test_moonlight_preset_counts_match_the_paper():
    model = build_model(get_preset("moonlight-16b-a3b"), device="meta")
    counts = count_parameters(model)
    assert round(counts.total_without_embeddings / 1e9, 2) == 15.29
    assert round(counts.activated_without_embeddings / 1e9, 2) == 2.24
    assert round(counts.total / 1e9, 2) == 15.96
    assert round(counts.activated / 1e9, 2) == 2.91


def test_presets_have_the_promised_sizes():
    tiny = count_parameters(build_model(get_preset("tiny"), device="meta"))
    dense = count_parameters(build_model(get_preset("tiny-dense"), device="meta"))
    small = count_parameters(build_model(get_preset("small"), device="meta"))
    assert 1e6 < tiny.total < 10e6 and get_preset("tiny").n_routed_experts == 8
    assert abs(dense.total - tiny.total) / tiny.total < 0.1 and not get_preset("tiny-dense").is_moe
    assert 100e6 <= small.total <= 300e6
    assert set(PRESETS) >= {"moonlight-16b-a3b", "small", "tiny", "tiny-dense"}


def test_flops_per_token_counts_only_activated_experts():
    config = get_preset("moonlight-16b-a3b")
    six_n = 6 * count_parameters(build_model(config, device="meta")).activated_without_embeddings
    flops = flops_per_token(config, seq_len=8192)
    # Activated matmuls + LM head + attention scores: above 6·N_active, well below 6·N_total.
    assert six_n < flops < 1.6 * six_n
    more = config.replace(num_experts_per_tok=8)
    assert flops_per_token(more, 8192) - flops == pytest.approx(6 * 26 * 2 * 3 * 2048 * 1408)


def test_gate_scaling_factor_reproduces_moonlight():
    assert gate_scaling_factor(64, 6, iterations=200_000) == pytest.approx(2.446, abs=0.002)
    assert gate_scaling_factor(256, 8, iterations=100_000) == pytest.approx(2.827, abs=0.005)


@pytest.mark.parametrize("field,value,rule", [
    ("num_experts_per_tok", 9, "n_routed_experts=8"),
    ("kv_lora_rank", 0, "positive integer"),
    ("qk_rope_head_dim", 5, "even"),
    ("n_group", 3, "divide n_routed_experts"),
    ("topk_group", 2, "n_group=1"),
    ("first_k_dense_replace", 7, "num_hidden_layers=3"),
])
def test_bad_config_names_field_value_and_rule(field, value, rule):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**SMALL, field: value})
    message = str(err.value)
    assert f"{field}={value!r}" in message and rule in message


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="tiny-dense"):
        get_preset("huge")
