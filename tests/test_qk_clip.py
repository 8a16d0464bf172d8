"""QK-clip on one device: the chunked per-head max logit, the clip's bound and row layout, τ = ∞ changes nothing."""
from __future__ import annotations

import copy

import pytest
import qk_clip_helpers as qh
import torch

from components.model.attention_stats import head_max_logits
from components.optim.qk_clip import QKClip
from components.optim.routing import build_muon

SETTINGS = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)


def _full_logit_max(q, k, scale, mask=None):
    """The reference: every logit at once, [B, H, S_q, S_k]."""
    s_q, s_k = q.shape[2], k.shape[2]
    logits = (q @ k.transpose(-1, -2)) * scale
    allowed = mask if mask is not None else torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)
    return logits.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))


@pytest.mark.parametrize(("b", "h", "s_q", "s_k"), [(2, 3, 37, 37), (1, 2, 5, 12), (3, 4, 130, 130), (2, 2, 1, 9)])
@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 21])
def test_chunked_per_head_max_equals_the_whole_logit_matrix(b, h, s_q, s_k, chunk_elements):
    gen = torch.Generator().manual_seed(s_q * 7 + s_k)
    q, k = torch.randn(b, h, s_q, 8, generator=gen), torch.randn(b, h, s_k, 8, generator=gen)
    want = _full_logit_max(q, k, 0.3)
    torch.testing.assert_close(head_max_logits(q, k, 0.3, None, chunk_elements), want, rtol=1e-6, atol=0)
    mask = torch.rand(b, 1, s_q, s_k, generator=gen) > 0.5
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(head_max_logits(q, k, 0.3, mask, chunk_elements), _full_logit_max(q, k, 0.3, mask),
                               rtol=1e-6, atol=0)


def test_an_empty_batch_records_minus_infinity_per_head():
    got = head_max_logits(torch.zeros(0, 3, 4, 8), torch.zeros(0, 3, 4, 8), 0.3)
    assert got.tolist() == [float("-inf")] * 3


def test_tracking_leaves_the_forward_and_backward_bitwise_unchanged():
    plain, tracked = qh.hot_model(), qh.hot_model()
    ids, targets = qh.batch(0)
    qh.forward_backward(plain, ids, targets, track=False)
    s = qh.forward_backward(tracked, ids, targets, track=True)
    assert s.shape == (2, 3) and bool((s[:, list(qh.HOT_HEADS)] > 3 * qh.TAU).all()) and bool((s[:, 1] < qh.TAU).all())
    for (name, p), q in zip(plain.named_parameters(), tracked.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("q_lora_rank", [None, 5], ids=["q_proj", "q_b_proj"])
def test_one_clipped_step_brings_every_clipped_head_to_tau_and_leaves_the_rest_bitwise(q_lora_rank):
    """lr = 0 isolates the clip: the step leaves the weights as they were, so the max logit measured in its forward
    is the one the clip acts on, and the recomputed logit must come out at τ (the derivation in qk_clip.py). Each
    layer is recomputed on the inputs it had: in a full forward, layer 0's clip changes what layer 1 sees."""
    clipped, reference = qh.hot_model(q_lora_rank), qh.hot_model(q_lora_rank)
    ids, targets = qh.batch(0)
    inputs = qh.attention_inputs(clipped, ids)
    before = qh.max_logits_on(clipped, inputs)
    clip = QKClip(qh.TAU)
    counts = qh.clipped_step(clipped, build_muon(clipped, **dict(SETTINGS, lr=0.0)), clip, ids, targets)
    qh.clipped_step(reference, build_muon(reference, **dict(SETTINGS, lr=0.0)), None, ids, targets)
    assert counts.tolist() == [len(qh.HOT_HEADS)] * 2
    after = qh.max_logits_on(clipped, inputs)  # each layer on the inputs its logits were measured on
    hot = list(qh.HOT_HEADS)
    assert bool((after[:, hot] <= qh.TAU * (1 + 1e-5)).all()) and bool((after[:, hot] >= qh.TAU * (1 - 1e-5)).all())
    assert torch.equal(after[:, 1], before[:, 1])  # the unclipped head
    _assert_only_hot_query_key_rows_changed(clipped, reference, before, clip)


def _assert_only_hot_query_key_rows_changed(clipped, reference, s, clip):
    """Every weight bitwise the reference's except the hot heads' query rows (no-position × √γ, rotary × γ) and
    their no-position key rows in kv_b_proj (× √γ); values, the shared rotary key and o_proj untouched."""
    c = clipped.config
    d, e = c.qk_head_dim, c.qk_nope_head_dim + c.v_head_dim
    changed = set()
    for layer, (a, b) in enumerate(zip(qh.attention_layers(clipped), qh.attention_layers(reference))):
        gamma = clip.factors(s[layer])
        want_q, want_kv = qh.query_weight(b).detach().clone(), b.kv_b_proj.weight.detach().clone()
        for h in qh.HOT_HEADS:
            want_q[h * d:h * d + c.qk_nope_head_dim] *= gamma[h].sqrt()
            want_q[h * d + c.qk_nope_head_dim:(h + 1) * d] *= gamma[h]
            want_kv[h * e:h * e + c.qk_nope_head_dim] *= gamma[h].sqrt()
        torch.testing.assert_close(qh.query_weight(a).detach(), want_q, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.kv_b_proj.weight.detach(), want_kv, rtol=1e-6, atol=0)
        for rows_q, rows_kv in ((slice(d, 2 * d), slice(e, 2 * e)),):  # head 1: bitwise
            assert torch.equal(qh.query_weight(a)[rows_q], qh.query_weight(b)[rows_q])
            assert torch.equal(a.kv_b_proj.weight[rows_kv], b.kv_b_proj.weight[rows_kv])
        for h in qh.HOT_HEADS:  # value rows: bitwise
            assert torch.equal(a.kv_b_proj.weight[h * e + c.qk_nope_head_dim:(h + 1) * e],
                               b.kv_b_proj.weight[h * e + c.qk_nope_head_dim:(h + 1) * e])
        changed |= {id(qh.query_weight(a)), id(a.kv_b_proj.weight)}
    for (name, p), q in zip(clipped.named_parameters(), reference.parameters()):
        if id(p) not in changed:
            assert torch.equal(p, q), name


def test_a_clipped_training_step_lands_near_tau_within_one_updates_drift():
    """At a training lr the clip acts on the weights after the update, with the logits measured before it (K2):
    the recomputed max logit of a clipped head is τ moved by one step's update, here within 5%."""
    model = qh.hot_model()
    ids, targets = qh.batch(0)
    inputs = qh.attention_inputs(model, ids)
    qh.clipped_step(model, build_muon(model, **SETTINGS), QKClip(qh.TAU), ids, targets)
    after = qh.max_logits_on(model, inputs)[:, list(qh.HOT_HEADS)]
    assert bool((after <= qh.TAU * 1.05).all()) and bool((after >= qh.TAU * 0.9).all()), after


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_alpha_split_moves_the_factor_between_query_and_key_with_the_same_logit(alpha):
    model = qh.hot_model()
    ids, _ = qh.batch(0)
    inputs = qh.attention_inputs(model, ids)
    s = qh.max_logits_on(model, inputs)
    reference = copy.deepcopy(model)
    QKClip(qh.TAU, alpha).apply(qh.attention_layers(model), s)
    after = qh.max_logits_on(model, inputs)[:, list(qh.HOT_HEADS)]
    torch.testing.assert_close(after, torch.full_like(after, qh.TAU), rtol=1e-5, atol=0)
    attn, ref = qh.attention_layers(model)[0], qh.attention_layers(reference)[0]
    gamma = QKClip(qh.TAU).factors(s[0])[0]
    nope = attn.config.qk_nope_head_dim
    torch.testing.assert_close(attn.kv_b_proj.weight[:nope], ref.kv_b_proj.weight[:nope] * gamma ** (1 - alpha),
                               rtol=1e-6, atol=0)


def test_infinite_threshold_trains_bitwise_like_no_clip():
    off, inf = qh.hot_model(), qh.hot_model()
    opt_off, opt_inf = build_muon(off, **SETTINGS), build_muon(inf, **SETTINGS)
    for step in range(3):
        ids, targets = qh.batch(step)
        qh.clipped_step(off, opt_off, None, ids, targets)
        counts = qh.clipped_step(inf, opt_inf, QKClip(float("inf")), ids, targets)
        assert counts.tolist() == [0, 0]
    for (name, p), q in zip(off.named_parameters(), inf.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(("threshold", "alpha", "field"), [
    (0.0, 0.5, "model.qk_clip_threshold=0.0 must be a number > 0"),
    (float("nan"), 0.5, "model.qk_clip_threshold=nan must be a number > 0"),
    ("100", 0.5, "model.qk_clip_threshold='100' must be a number > 0"),
    (100.0, 1.5, r"model.qk_clip_alpha=1.5 must be a number in \[0, 1\]"),
])
def test_bad_clip_settings_name_the_field_and_what_is_allowed(threshold, alpha, field):
    with pytest.raises(ValueError, match=field):
        QKClip(threshold, alpha)
