"""The experiment planner and spec rules, without training: what runs next given what finished (lr sweep with its
edge extension, seeds at the selected lr, lr reused from another arm, shared runs, fine-tuning waits), and the
fairness rules a spec cannot switch off."""
from __future__ import annotations

import math

import pytest

from app.experiments.configs import template_schedule
from app.experiments.plan import Outcome, plan, static_points
from app.experiments.spec import SpecError, parse_spec
from components.schedule import StageSchedule


def spec(arms, **top):
    raw = {"name": "t", "config": "tiny-cpu", "tokens": 40960, "seeds": [0, 1],
           "schedule": {"seq_len": 256, "batch_size": 16, "peak_lr": 3e-3, "mixture": {"english": 1.0}},
           "arms": arms, "sizes": {"cpu": {}, "gpu": {}}, **top}
    return parse_spec(raw, "cpu")


def sweep_arm(name="a", values=(0.5, 1.0, 2.0), max_extensions=2, **extra):
    return {"name": name, "overrides": {"model.optimizer": "muon"},
            "sweep": {"values": list(values), "factor": 2.0, "max_extensions": max_extensions}, **extra}


def ids(points):
    return [p.id for p in points]


def finished(losses: dict[float, float], arm="a", seed=0) -> dict[str, Outcome]:
    return {f"all__{arm}__lr{v:.4g}__s{seed}": Outcome(True, loss) for v, loss in losses.items()}


def test_first_the_sweep_values_with_the_first_seed():
    assert ids(plan(spec([sweep_arm()]), {}).todo) == ["all__a__lr0.5__s0", "all__a__lr1__s0", "all__a__lr2__s0"]


def test_best_in_the_middle_selects_it_and_runs_the_other_seeds_there():
    p = plan(spec([sweep_arm()]), finished({0.5: 3.0, 1.0: 2.0, 2.0: 2.5}))
    assert p.selections[("all", "a")].lr_scale == 1.0
    assert p.selections[("all", "a")].extensions == []
    assert ids(p.todo) == ["all__a__lr1__s1"]


def test_best_at_the_high_edge_extends_one_step_up_then_again():
    s = spec([sweep_arm()])
    p = plan(s, finished({0.5: 3.0, 1.0: 2.5, 2.0: 2.0}))
    assert ids(p.todo) == ["all__a__lr4__s0"]
    assert p.selections[("all", "a")].lr_scale is None
    assert "at the high edge" in p.selections[("all", "a")].extensions[0]
    p = plan(s, finished({0.5: 3.0, 1.0: 2.5, 2.0: 2.0, 4.0: 1.9}))
    assert ids(p.todo) == ["all__a__lr8__s0"]
    p = plan(s, finished({0.5: 3.0, 1.0: 2.5, 2.0: 2.0, 4.0: 1.9, 8.0: 2.2}))
    assert p.selections[("all", "a")].lr_scale == 4.0 and p.selections[("all", "a")].at_edge is None
    assert ids(p.todo) == ["all__a__lr4__s1"]


def test_best_at_the_low_edge_extends_down_and_stops_at_the_limit():
    s = spec([sweep_arm(max_extensions=1)])
    p = plan(s, finished({0.5: 2.0, 1.0: 2.5, 2.0: 3.0}))
    assert ids(p.todo) == ["all__a__lr0.25__s0"]
    p = plan(s, finished({0.25: 1.5, 0.5: 2.0, 1.0: 2.5, 2.0: 3.0}))
    sel = p.selections[("all", "a")]
    assert (sel.lr_scale, sel.at_edge, len(sel.extensions)) == (0.25, "low", 1)
    assert ids(p.todo) == ["all__a__lr0.25__s1"]


def test_a_failed_sweep_point_counts_as_worse_than_any_finished_one():
    outcomes = finished({0.5: 3.0, 1.0: 2.5})
    outcomes["all__a__lr2__s0"] = Outcome(False)
    p = plan(spec([sweep_arm()]), outcomes)
    assert p.selections[("all", "a")].lr_scale == 1.0
    assert dict(p.selections[("all", "a")].tried)[2.0] == math.inf


def test_lr_from_waits_for_the_selection_then_shares_the_runs_it_can():
    s = spec([sweep_arm("adamw", **{"overrides": {"model.optimizer": "adamw"}}),
              sweep_arm("muon"), {"name": "muon-reuse", "overrides": {"model.optimizer": "muon"},
                                  "lr_from": "adamw"}])
    p = plan(s, {})
    assert ("all", "muon-reuse", "waits for the lr selected for arm 'adamw'") in p.waiting
    outcomes = {**finished({0.5: 3.0, 1.0: 2.0, 2.0: 2.5}, "adamw"), **finished({0.5: 2.9, 1.0: 2.6, 2.0: 1.9,
                                                                                   4.0: 2.1}, "muon")}
    p = plan(s, outcomes)
    assert p.selections[("all", "muon-reuse")].lr_scale == 1.0
    # Muon at AdamW's lr, seed 0, is the Muon sweep's run: only seed 1 is new.
    assert ids(p.todo) == ["all__adamw__lr1__s1", "all__muon__lr2__s1", "all__muon__lr1__s1"]


def test_budgets_run_at_the_selected_lr_and_fine_tuning_waits_for_its_pretrained_point():
    s = spec([sweep_arm("pre"), {"name": "more", "overrides": {"model.optimizer": "muon", "model.weight_decay": 0.0},
                                 "lr_from": "pre", "budgets": [0.5, 2.0]},
              sweep_arm("sft", init_from="pre", overrides={"model.optimizer": "adamw"})])
    outcomes = finished({0.5: 3.0, 1.0: 2.0, 2.0: 2.5}, "pre")
    p = plan(s, outcomes)
    assert {"all__more__lr1__s0__t0.5", "all__more__lr1__s0__t2", "all__sft__lr0.5__s0"} <= set(ids(p.todo))
    assert next(pt for pt in p.todo if pt.id == "all__sft__lr0.5__s0").init_from == "all__pre__lr1__s0"
    outcomes.update(finished({0.5: 1.0, 1.0: 0.9, 2.0: 1.1}, "sft"))
    p = plan(s, outcomes)  # seed 1 of the fine-tuning needs seed 1 of the pretraining
    assert [w for w in p.waiting if w[1] == "sft"] == [("all", "sft", "all__pre__lr1__s1 has not finished")]
    assert "all__pre__lr1__s1" in ids(p.todo) and not [pt for pt in p.todo if pt.arm == "sft"]


def test_static_points_are_what_needs_no_result():
    s = spec([sweep_arm("x"), sweep_arm("y", overrides={"model.optimizer": "adamw"}),
              {"name": "z", "overrides": {"model.weight_decay": 0.0}, "lr_from": "x"}])
    assert ids(static_points(s)) == [f"all__{a}__lr{v}__s0" for a in "xy" for v in ("0.5", "1", "2")]


def test_the_runner_writes_a_complete_schedule_for_each_budget():
    template = spec([sweep_arm()]).schedule
    schedule = StageSchedule.from_dict(template_schedule(template, 40960 * 4))
    assert schedule.total_tokens == 40960 * 4
    assert schedule.at(0).lr == 0.0
    assert schedule.at(40960 * 4 // 10).lr == pytest.approx(3e-3)
    assert schedule.at(40960 * 4).lr == pytest.approx(3e-4)  # decayed to its end: final_lr_fraction × peak


@pytest.mark.parametrize("arms, top, message", [
    ([sweep_arm(overrides={"model.schedule": "tiny"})], {}, "'model.schedule' is set by the runner"),
    ([sweep_arm(overrides={"trainer.max_steps": 60})], {}, "'trainer.max_steps' is set by the runner"),
    ([sweep_arm()], {"seeds": [0]}, "seeds=[0] must be at least 2 distinct seeds"),
    ([sweep_arm(values=(1.0, 2.0))], {}, "must be at least 3 lr multipliers > 0"),
    ([{"name": "a", "overrides": {}}], {}, "give exactly one of sweep (its own lr sweep) and lr_from"),
    ([sweep_arm(), {"name": "b", "lr_from": "nope"}], {}, "lr_from='nope' must name another arm"),
    ([sweep_arm(unknown=1)], {}, "unknown key(s) ['unknown']"),
    ([sweep_arm(), sweep_arm("ft", init_from="a", epochs=0.5)], {}, "epochs=0.5 must be a number > 0, on an arm "
     "with keep_schedule"),
    ([sweep_arm(), sweep_arm("ft", init_from="a", keep_schedule=True, epochs=0)], {}, "epochs=0 must be a number > 0"),
])
def test_spec_rules(arms, top, message):
    with pytest.raises(SpecError) as err:
        spec(arms, **top)
    assert message in str(err.value)


def test_a_fine_tuning_point_starts_from_its_export_with_its_arm_s_epochs(tmp_path):
    from app.experiments.configs import point_config
    from app.experiments.plan import Point

    arms = [sweep_arm("pre"), sweep_arm("ft", init_from="pre", keep_schedule=True, epochs=0.4, config="sft-tiny-cpu"),
            sweep_arm("ft-pre", init_from="pre", keep_schedule=True, epochs=0.4)]
    s = spec(arms)
    ft = point_config(s, Point("all", "ft", 1.0, 0, 1.0, "all__pre__lr1__s0"), tmp_path, "sqlite:///x.db", "e", {},
                      init_export="/exports/step-00000010")
    assert ft.fingerprint  # reading it (as the runner does before training) must leave the config whole
    assert ft.config["model"]["init_from"] == "/exports/step-00000010"
    assert ft.config["model"]["schedule"]["epochs"] == 0.4  # sft-tiny-cpu's 2 epochs, shortened; lr still to 0
    assert ft.config["model"]["schedule"]["lr_end"] == 0.0
    with pytest.raises(SpecError, match="arm 'ft-pre': epochs=0.4 needs an epoch schedule in its config"):
        point_config(s, Point("all", "ft-pre", 1.0, 0, 1.0, "all__pre__lr1__s0"), tmp_path, "sqlite:///x.db", "e", {})
