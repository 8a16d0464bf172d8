"""The single-device Muon + AdamW optimizer (Moonlight Eqs. 1–4)."""
import io

import pytest
import torch
from torch import nn

import components.optim.muon as muon_module
from components.optim.muon import Muon


def _params(seed=0, shapes=((16, 24), (24, 8), (3, 6, 10))):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen) * 0.1) for s in shapes]


def _grads(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g.clone()
        opt.step()


def test_matches_torch_muon_match_rms_adamw_after_10_steps():
    # Both run bf16 NS on differently scaled inputs (EMA = (1-μ)·sum): independent bf16 roundings alone put the
    # relative difference at ~0.0099-0.0100 here, at the 1e-2 bound; the fp32 test below is the tight one.
    ours_p = _params(shapes=((32, 48), (48, 16), (24, 24)))
    ref_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    start = [p.detach().clone() for p in ours_p]
    ours = Muon([{"params": ours_p, "algorithm": "muon"}], lr=0.02, weight_decay=0.1)
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    _run(ours, ours_p, 10)
    _run(ref, ref_p, 10)
    for a, b, s in zip(ours_p, ref_p, start):
        delta_ours, delta_ref = a.detach() - s, b.detach() - s
        rel = (delta_ours - delta_ref).norm() / delta_ref.norm()
        assert rel <= 1e-2, float(rel)


def test_matches_torch_muon_exactly_when_both_run_the_same_fp32_newton_schulz(monkeypatch):
    """With the NS rounding taken out, sum momentum + Nesterov + scale + decay equal torch's EMA form."""
    import torch.optim._muon as torch_muon

    def fp32_ns(grad, coefficients, steps, eps):
        return muon_module.newton_schulz(grad, steps, [coefficients], dtype=torch.float32)

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_ns)
    ours_p = _params(shapes=((32, 48), (48, 16)))
    ref_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = Muon([{"params": ours_p, "algorithm": "muon"}], lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    _run(ours, ours_p, 10)
    _run(ref, ref_p, 10)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_update_rms_telemetry_follows_lemma1_with_ns5(coefficients):
    p = _params(shapes=((64, 256), (8, 128, 32)))
    opt = Muon([{"params": p, "algorithm": "muon", "name": "hidden"}], lr=0.01, ns_coefficients=coefficients)
    _run(opt, p, 1)
    stats = opt.last_stats
    assert 0.15 <= stats["hidden/update_rms"] <= 0.25
    assert stats["hidden/weight_rms"] > 0 and stats["ns_seconds"] > 0 and stats["skipped_steps"] == 0


def test_scale_modes_set_the_update_rms_of_the_step():
    rms = {}
    for mode in ("moonlight", "keller", "update_norm", "baseline", "none"):
        p = _params(shapes=((16, 64),))
        opt = Muon(p, lr=0.01, scale_mode=mode, scale_hidden_size=100, ns_dtype=torch.float32)
        _run(opt, p, 1)
        rms[mode] = opt.last_stats["muon/update_rms"]
    assert rms["update_norm"] == pytest.approx(0.2, rel=1e-5)
    assert rms["moonlight"] / rms["none"] == pytest.approx(0.2 * 8, rel=1e-5)  # 0.2·sqrt(max(16, 64))
    assert rms["keller"] / rms["none"] == pytest.approx(1.0, rel=1e-5)  # sqrt(max(1, 16/64))
    assert rms["baseline"] / rms["none"] == pytest.approx(2.0, rel=1e-5)  # 0.2·sqrt(H=100)


@pytest.mark.parametrize("target", [0.05, 0.8])
def test_update_rms_sets_the_rms_of_the_update_for_every_shape(target):
    """App. A Table 8's knob r, for a wide, a tall and a stacked matrix (fp32 NS): update_norm gives RMS r exactly;
    moonlight's r·sqrt(max(A, B)) gives r up to NS's inexact singular values, r/0.2 times the paper's update."""
    for shape in ((16, 64), (96, 24), (4, 32, 48)):
        rms = {}
        for mode, r in (("update_norm", target), ("moonlight", target), ("moonlight", 0.2)):
            p = _params(shapes=(shape,))
            opt = Muon(p, lr=0.01, scale_mode=mode, update_rms=r, ns_dtype=torch.float32)
            _run(opt, p, 1)
            rms[mode, r] = opt.last_stats["muon/update_rms"]
        assert rms["update_norm", target] == pytest.approx(target, rel=1e-5), shape
        assert rms["moonlight", target] / rms["moonlight", 0.2] == pytest.approx(target / 0.2, rel=1e-5), shape
        assert 0.75 * target < rms["moonlight", target] < 1.25 * target, shape


def test_a_state_dict_saved_without_update_rms_loads_with_the_default():
    p = _params()
    opt = Muon(p, lr=0.01, update_rms=0.4)
    _run(opt, p, 1)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["update_rms"]  # as written before the setting existed
    fresh = Muon(p, lr=0.01, update_rms=0.4)
    fresh.load_state_dict(saved)
    assert [g["update_rms"] for g in fresh.param_groups] == [0.2] * len(fresh.param_groups)


def test_after_a_load_the_constructed_settings_come_back_and_the_run_state_stays():
    p = _params()
    opt = Muon(p, lr=0.01, weight_decay=0.1, momentum=0.95)
    _run(opt, p, 2)
    saved = opt.state_dict()
    saved["param_groups"][0]["skipped_steps"] = 3  # a run counter: the checkpoint's value must stay
    resumed = Muon(p, lr=0.02, weight_decay=0.0, momentum=0.9, ns_steps=4)  # the changed config
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["weight_decay"] == 0.1  # torch's way: the saved settings
    changes = resumed.use_constructed_settings()
    group = resumed.param_groups[0]
    assert (group["weight_decay"], group["momentum"], group["ns_steps"]) == (0.0, 0.9, 4)
    assert (group["lr"], group["skipped_steps"]) == (0.01, 3)
    assert changes == ["group 0 weight_decay: 0.1 -> 0.0", "group 0 momentum: 0.95 -> 0.9",
                       "group 0 ns_steps: 5 -> 4"]
    for q in p:
        assert torch.equal(resumed.state[q]["momentum_buffer"], opt.state[q]["momentum_buffer"])
    assert resumed.use_constructed_settings() == []


def test_a_step_the_caller_skips_updates_nothing_and_counts_as_skipped():
    p = _params()
    opt = Muon(p, lr=0.01)
    _run(opt, p, 1)
    weights = [q.detach().clone() for q in p]
    buffers = [opt.state[q]["momentum_buffer"].clone() for q in p]
    for q in p:
        q.grad = torch.full_like(q, float("nan"))  # what a non-finite loss leaves
    opt.step(skip=True)
    assert all(torch.equal(q, w) for q, w in zip(p, weights))
    assert all(torch.equal(opt.state[q]["momentum_buffer"], b) for q, b in zip(p, buffers))
    assert opt.last_stats["nonfinite"] == 1.0 and opt.param_groups[0]["skipped_steps"] == 1
    _run(opt, p, 1, start=1)
    assert opt.last_stats["nonfinite"] == 0.0 and not all(torch.equal(q, w) for q, w in zip(p, weights))


def test_one_step_is_the_papers_equation_4_with_fp32_ns():
    p = nn.Parameter(torch.randn(12, 20, generator=torch.Generator().manual_seed(1)))
    w0 = p.detach().clone()
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(2))
    opt = Muon([p], lr=0.1, weight_decay=0.2, momentum=0.9, ns_dtype=torch.float32)
    p.grad = g.clone()
    opt.step()
    x = g + 0.9 * g  # Nesterov input μM + g with M = g after the first step
    o = muon_module.newton_schulz(x, dtype=torch.float32)
    expected = w0 * (1 - 0.1 * 0.2) - 0.1 * 0.2 * (20 ** 0.5) * o
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], g)


def test_gradient_accumulation_runs_newton_schulz_once_per_step(monkeypatch):
    calls = []
    real = muon_module.newton_schulz
    monkeypatch.setattr(muon_module, "newton_schulz", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10, bias=False), nn.Tanh(), nn.Linear(10, 3, bias=False))
    twin = nn.Sequential(nn.Linear(6, 10, bias=False), nn.Tanh(), nn.Linear(10, 3, bias=False))
    twin.load_state_dict(model.state_dict())
    opt = Muon(model.parameters(), lr=0.05, ns_dtype=torch.float32)
    opt_twin = Muon(twin.parameters(), lr=0.05, ns_dtype=torch.float32)
    x = torch.randn(8, 6)
    for micro in x.chunk(4):  # 4 micro-batches, one optimizer step
        (model(micro).square().mean() / 4).backward()
    opt.step()
    assert len(calls) == 2  # one NS per matrix, not per micro-batch
    twin(x).square().mean().backward()
    opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_parameters_without_gradient_and_experts_without_tokens_do_not_move():
    stack, unused, norm = _params(shapes=((4, 6, 8), (5, 5), (7, 7)))
    bias = nn.Parameter(torch.ones(5))
    opt = Muon([{"params": [stack, unused], "algorithm": "muon"},
                {"params": [norm, bias], "algorithm": "adamw"}], lr=0.05)
    before = [t.detach().clone() for t in (stack, unused, bias)]
    for _ in range(3):
        g = torch.randn(4, 6, 8)
        g[2] = 0  # expert 2 got no tokens this step
        stack.grad = g
        norm.grad = torch.randn(7, 7)
        opt.step()
    assert torch.equal(stack[2], before[0][2])
    assert torch.count_nonzero(opt.state[stack]["momentum_buffer"][2]) == 0
    assert not torch.equal(stack[0], before[0][0])
    assert torch.equal(unused, before[1]) and torch.count_nonzero(opt.state[unused]["momentum_buffer"]) == 0
    assert torch.equal(bias, before[2]) and float(opt.state[bias]["step"]) == 0
    assert float(opt.state[norm]["step"]) == 3


def test_nesterov_off_with_bf16_params_does_not_normalize_the_momentum_in_place():
    p = nn.Parameter(torch.randn(8, 12).bfloat16())
    g = torch.randn(8, 12).bfloat16()
    opt = Muon([p], lr=0.01, nesterov=False)
    p.grad = g.clone()
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], g)  # M = g, not g / ||g||


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_is_skipped_and_counted_or_raises(policy):
    params = _params()
    opt = Muon([{"params": params, "algorithm": "muon", "param_names": ["a", "b", "experts"]}], lr=0.05,
               nonfinite=policy)
    _run(opt, params, 1)
    snapshot = [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p, g in zip(params, _grads(params, 5)):
        p.grad = g
    params[2].grad[1, 0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="experts"):
            opt.step()
    else:
        opt.step()
        assert opt.last_stats["skipped_steps"] == 1 and opt.last_stats["nonfinite"] == 1
        assert opt.param_groups[0]["skipped_steps"] == 1
    after = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": -1.0}, "lr=-1.0"),
    ({"momentum": 1.0}, "momentum=1.0"),
    ({"scale_mode": "spectral"}, "scale_mode='spectral'"),
    ({"scale_mode": "baseline"}, "scale_hidden_size=None"),
    ({"ns_coefficients": "cubic"}, "ns_coefficients='cubic'"),
    ({"nonfinite": "ignore"}, "nonfinite='ignore'"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"update_rms": 0.0}, r"update_rms=0.0 must be a number in \(0, 10\]"),
])
def test_invalid_hyperparameters_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Muon(_params(), **kwargs)


def test_vector_forced_onto_muon_is_rejected_by_name():
    with pytest.raises(ValueError, match="'final_norm.weight'"):
        Muon([{"params": [nn.Parameter(torch.ones(4))], "param_names": ["final_norm.weight"], "algorithm": "muon"}])


def test_resume_from_state_dict_gives_bitwise_identical_steps():
    def build(params):
        return Muon([{"params": params[:2], "algorithm": "muon"}, {"params": params[2:], "algorithm": "adamw"}],
                    lr=0.03, weight_decay=0.1, ns_dtype=torch.float32)

    shapes = ((16, 24), (3, 6, 10), (24,), (7, 5))
    full_p = _params(shapes=shapes)
    full = build(full_p)
    _run(full, full_p, 5)

    part_p = _params(shapes=shapes)
    part = build(part_p)
    _run(part, part_p, 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in part_p], "optim": part.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_p = [nn.Parameter(t.clone()) for t in saved["params"]]
    fresh = build(fresh_p)
    fresh.load_state_dict(saved["optim"])
    _run(fresh, fresh_p, 2, start=3)
    for a, b in zip(fresh_p, full_p):
        assert torch.equal(a, b)


def test_changing_group_lr_between_steps_takes_effect():
    params = _params()
    opt = Muon(params, lr=0.1)
    _run(opt, params, 1)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    _run(opt, params, 1, start=1)
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_gradient_summary_max_abs_is_the_inf_norm_exactly_and_keeps_nan_and_inf():
    g = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(9))
    g[1, 2, 3], g[2, 0, 0] = float("nan"), float("-inf")
    inf = float("inf")
    per_matrix = muon_module.max_abs(g, per_matrix=True)
    want = torch.linalg.vector_norm(g, ord=inf, dim=(-2, -1))
    assert torch.equal(per_matrix[[0, 2, 3]], want[[0, 2, 3]]) and per_matrix[2] == inf
    assert torch.isnan(per_matrix[1]) and torch.isnan(want[1])
    assert torch.isnan(muon_module.max_abs(g)).all() and muon_module.max_abs(g).shape == (1,)
    assert torch.equal(muon_module.max_abs(g[0]), torch.linalg.vector_norm(g[0], ord=inf).reshape(1))


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_step_writes_the_ns_input_in_the_ns_dtype_and_orientation_with_the_same_numbers(nesterov):
    from components.optim.update import momentum_step

    gen = torch.Generator().manual_seed(10)
    buf, grad = torch.randn(3, 40, 12, generator=gen), torch.randn(3, 40, 12, generator=gen)
    expected = momentum_step(buf.clone(), grad, 0.95, nesterov).to(torch.bfloat16)
    out = torch.empty(3, 12, 40, dtype=torch.bfloat16).mT  # tall matrices stored wide, as NS wants them
    got = momentum_step(buf, grad, 0.95, nesterov, out=out)
    assert got is out and torch.equal(got, expected)


def test_adamw_update_rms_telemetry_is_the_rms_of_the_bias_corrected_step():
    p = nn.Parameter(torch.randn(50, 40, generator=torch.Generator().manual_seed(11)))
    opt = Muon([{"params": [p], "algorithm": "adamw", "name": "emb"}], lr=0.01, adamw_eps=1e-8)
    g = torch.randn(50, 40, generator=torch.Generator().manual_seed(12))
    p.grad = g.clone()
    opt.step()
    update = g / (g.abs() + 1e-8)  # step 1: m̂ = g, v̂ = g²
    assert opt.last_stats["emb/update_rms"] == pytest.approx(float(update.square().mean().sqrt()), rel=1e-6)
    assert opt.last_stats["emb/weight_rms"] == pytest.approx(float(p.detach().square().mean().sqrt()), rel=1e-6)
