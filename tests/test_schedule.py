"""Token-based stages: the Moonlight preset's numbers, LR shapes, YAML round trip, validation, the plot."""
import math

import pytest
import yaml

from app.plots import schedule_figure
from components.schedule import Stage, StageSchedule, get_schedule, parse_tokens


@pytest.fixture(scope="module")
def moonlight():
    return get_schedule("moonlight")


def test_moonlight_lr_at_the_papers_points(moonlight):
    assert moonlight.at(0).lr == 0.0
    assert moonlight.at(16.5e9).lr == pytest.approx(2.1e-4)           # halfway up the warm-up
    assert moonlight.at(33e9).lr == pytest.approx(4.2e-4, rel=1e-12)  # peak at the end of the warm-up
    assert moonlight.at(5.2e12).lr == pytest.approx(4.2e-5, rel=1e-12)
    rewarm_end = 5.2e12 + 100 * 4096 * 8192                           # 100 steps of 4096 x 8192 tokens
    assert moonlight.at(rewarm_end).lr == pytest.approx(1e-4, rel=1e-12)
    assert moonlight.at(5.7e12).lr == 0.0
    assert moonlight.at(6e12).lr == 0.0                                # past the end: the last stage's end
    middle = 33e9 + (5.2e12 - 33e9) / 2
    assert moonlight.at(middle).lr == pytest.approx((4.2e-4 + 4.2e-5) / 2)


def test_moonlight_batch_mixture_and_bias_rate(moonlight):
    assert [moonlight.at(t).batch_size for t in (0, 33e9, 199_999_999_999, 200e9, 5.3e12)] == [
        2048, 2048, 2048, 4096, 4096]
    assert [moonlight.at(t).bias_update_rate for t in (1e9, 1e12, 5.2e12 - 1, 5.2e12, 5.6e12)] == [
        1e-3, 1e-3, 1e-3, 0.0, 0.0]
    assert [moonlight.at(t).stage_name for t in (0, 33e9, 5.2e12)] == ["warmup", "stable_cosine", "cooldown"]
    assert moonlight.at(5.2e12).mixture != moonlight.at(5.2e12 - 1).mixture
    assert moonlight.seq_len == 8192


def test_cosine_constant_and_rewarm_shapes():
    s = StageSchedule([
        Stage("a", 100, "constant", 1.0, 0.0, 4, {"x": 1}),
        Stage("b", 300, "cosine", 1.0, 0.1, 4, {"x": 1}),
        Stage("c", 500, "rewarm_linear", 0.1, 0.0, 4, {"x": 1}, rewarm_peak=0.5, rewarm_tokens=100),
    ], seq_len=2)
    assert s.at(50).lr == 1.0
    assert s.at(150).lr == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s.at(350).lr == pytest.approx(0.3)   # halfway up the re-warm
    assert s.at(450).lr == pytest.approx(0.25)  # halfway down after it


def test_yaml_round_trip_and_token_strings(moonlight):
    text = yaml.safe_dump(moonlight.to_dict())
    again = StageSchedule.from_dict(yaml.safe_load(text))
    assert again == moonlight
    assert [again.at(t) for t in (1e9, 3e11, 5.25e12)] == [moonlight.at(t) for t in (1e9, 3e11, 5.25e12)]
    assert parse_tokens("5.2T") == 5_200_000_000_000 and parse_tokens("1.5M") == 1_500_000
    assert parse_tokens(33e9) == 33_000_000_000
    plain = yaml.safe_load("seq_len: 4\nstages:\n- {name: a, end_tokens: 2M, lr_shape: constant, lr_start: 1e-3,"
                           " lr_end: 0, batch_size: 8, mixture: {x: 1}, bias_update_rate: 1e-3}\n")
    assert StageSchedule.from_dict(plain).at(5).lr == 1e-3  # YAML reads 1e-3 as a string


def test_tiny_preset_is_moonlight_shaped():
    tiny = get_schedule("tiny")
    assert [s.lr_shape for s in tiny.stages] == ["linear", "cosine", "rewarm_linear"]
    assert [s.bias_update_rate for s in tiny.stages] == [1e-3, 1e-3, 0.0]
    assert 1_000_000 <= tiny.total_tokens <= 3_000_000
    assert set(tiny.stages[-1].mixture) == {"english", "code"}
    assert tiny.at(tiny.starts[2]).mixture != tiny.at(tiny.starts[2] - 1).mixture


@pytest.mark.parametrize("change, message", [
    ({"end_tokens": 50}, r"stages\[1\] \('b'\)\.end_tokens=50 must be greater than the stage start 100"),
    ({"lr_shape": "step"}, r"stages\[1\] \('b'\)\.lr_shape='step'; allowed: linear, cosine, constant"),
    ({"lr_start": -1.0}, r"stages\[1\] \('b'\)\.lr_start=-1.0 must be a number >= 0"),
    ({"batch_size": 0}, r"batch_size has batch=0"),
    ({"batch_size": [[150, 4]]}, r"first step starts at 150 tokens, after the stage start 100"),
    ({"mixture": {}}, r"stages\[1\] \('b'\)\.mixture=\{\} must map"),
    ({"lr_shape": "rewarm_linear", "rewarm_peak": 1.0}, r"give exactly one of rewarm_tokens"),
    ({"lr_shape": "rewarm_linear", "rewarm_peak": 1.0, "rewarm_tokens": 500}, r"re-warm lasts 500 tokens"),
    ({"rewarm_peak": 1.0}, r"apply only to lr_shape 'rewarm_linear'"),
    ({"name": "a"}, r"name='a' is used twice"),
    ({"end_tokens": "lots"}, r"end_tokens='lots' must be a token count"),
])
def test_bad_stages_name_the_field(change, message):
    first = {"name": "a", "end_tokens": 100, "lr_shape": "linear", "lr_start": 0.0, "lr_end": 1.0,
             "batch_size": 4, "mixture": {"x": 1.0}}
    second = {**first, "name": "b", "end_tokens": 300, **change}
    with pytest.raises(ValueError, match=message):
        StageSchedule.from_dict({"seq_len": 4, "stages": [first, second]})


def test_unknown_field_and_preset_are_rejected():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['warmup'\]"):
        StageSchedule.from_dict({"seq_len": 4, "stages": [{"name": "a", "warmup": 3}]})
    with pytest.raises(ValueError, match="schedule preset 'gpt' is unknown"):
        get_schedule("gpt")


def test_plot_writes_a_png(moonlight, tmp_path):
    path = tmp_path / "schedule.png"
    schedule_figure(moonlight, path=str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
