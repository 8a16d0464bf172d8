"""Each experiment kind's tables, figures and fitted numbers, side by side with the paper's (moonlight.md §4).

The spec's `analysis:` names the arms each role is played by; `paper_numbers:` holds the paper's values.
"""
from __future__ import annotations

import math

from app.experiments import figures
from app.experiments.results import Analysis, ReportData, Stats, compare_text


def analyse(data: ReportData) -> Analysis:
    return {"update-rms": update_rms, "weight-decay": weight_decay, "scaling": _scaling, "svd-entropy": svd_entropy,
            "sft-matrix": sft_matrix}.get(data.spec.kind, lambda _d: Analysis())(data)


def _scaling(data: ReportData) -> Analysis:
    from app.experiments.scaling import scaling

    return scaling(data)


def _paper(value, scientific: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.3e}" if scientific else f"{value:.3f}"


def _only_group(data: ReportData) -> str:
    return data.spec.groups[0].name


# ---------------------------------------------------------------------------------------------- Table 1 / 8
def update_rms(data: ReportData) -> Analysis:
    """Table 1 (update scale modes) and App. A Table 8 (update RMS sweep), with weight RMS of an [H, H] and an
    [H, 4H] matrix at the end."""
    out = Analysis()
    group = _only_group(data)
    cfg = data.spec.analysis
    paper = data.spec.paper_numbers
    header = ["method", "arm", "selected lr_scale", "train loss", "val loss", "attn q W RMS [H,H]",
              "MLP up W RMS [H,4H]", "paper train", "paper val", "paper q RMS", "paper MLP RMS"]
    for table in ("table1", "table8"):
        rows, labels, means, spreads, paper_vals = [], [], [], [], []
        for arm in cfg.get(table, []):
            sel = data.plan.selections.get((group, arm))
            p = paper.get(table, {}).get(arm, {})
            val = data.stat(group, arm)
            waiting = next((why for g, a, why in data.plan.waiting if g == group and a == arm), None)
            rows.append([data.label(arm), arm,
                         waiting and f"waiting: {waiting}" or (f"{sel.lr_scale:g}" if sel and sel.lr_scale else "–"),
                         data.stat(group, arm, "train_loss").fmt(), val.fmt(),
                         data.stat(group, arm, "measure/attn_q_rms").fmt(3, True),
                         data.stat(group, arm, "measure/mlp_up_rms").fmt(3, True),
                         _paper(p.get("train")), _paper(p.get("val")), _paper(p.get("attn_q_rms"), True),
                         _paper(p.get("mlp_rms"), True)])
            labels.append(data.label(arm))
            means.append(val.mean)
            spreads.append(val.spread)
            paper_vals.append(p.get("val"))
        if rows:
            out.tables[table] = (header, rows)
            if any(math.isfinite(m) for m in means):
                out.figures[f"{table}_val_loss.png"] = figures.bars_figure(
                    labels, means, spreads, f"{table}: final val loss (this scale) and the paper's", "val loss",
                    paper_vals)
    ref = cfg.get("reference")
    _table8_at_reference_lr(data, out)
    for arm in cfg.get("table1", []) + cfg.get("table8", []):
        if ref and arm != ref:
            out.notes.append(compare_text(data.label(arm), data.stat(group, arm), data.label(ref),
                                          data.stat(group, ref)))
    for arm in cfg.get("table1", []) + cfg.get("table8", []):
        s = data.stat(group, arm)
        if s.values:
            key = arm.replace("-", "_")
            out.metrics[f"val_loss/{key}"] = s.mean
            q = data.stat(group, arm, "measure/attn_q_rms")
            if q.values:
                out.metrics[f"attn_q_rms/{key}"] = q.mean
            m = data.stat(group, arm, "measure/mlp_up_rms")
            if m.values:
                out.metrics[f"mlp_up_rms/{key}"] = m.mean
    return out


def _table8_at_reference_lr(data: ReportData, out: Analysis) -> None:
    """Table 8 as the paper ran it: one lr for every update RMS r (the reference arm's selected lr_scale), so r
    changes the step size; AdamW (another optimizer) keeps its own selected lr. The per-arm sweeps above let lr
    absorb part of r (the update is lr·r·√max(A, B)·O; only the weight decay, lr·λ, tells them apart)."""
    group = _only_group(data)
    cfg = data.spec.analysis
    ref_sel = data.plan.selections.get((group, cfg.get("reference")))
    if not cfg.get("table8") or ref_sel is None or not ref_sel.lr_scale:
        return
    base = data.spec.overrides.get("model.optimizer")
    paper = data.spec.paper_numbers.get("table8", {})
    header = ["method", "arm", "lr_scale", "train loss", "val loss", "attn q W RMS [H,H]", "MLP up W RMS [H,4H]",
              "paper val", "paper q RMS", "paper MLP RMS"]
    rows, labels, means, spreads, paper_vals = [], [], [], [], []
    for arm in cfg["table8"]:
        optimizer = data.spec.arm(arm).overrides.get("model.optimizer", base)
        sel = data.plan.selections.get((group, arm))
        lr = ref_sel.lr_scale if optimizer == base else (sel.lr_scale if sel else None)
        if not lr:
            continue
        val = data.stat(group, arm, lr_scale=lr)
        p = paper.get(arm, {})
        rows.append([data.label(arm), arm, f"{lr:g}" + ("" if optimizer == base else " (its own)"),
                     data.stat(group, arm, "train_loss", lr_scale=lr).fmt(), val.fmt(),
                     data.stat(group, arm, "measure/attn_q_rms", lr_scale=lr).fmt(3, True),
                     data.stat(group, arm, "measure/mlp_up_rms", lr_scale=lr).fmt(3, True),
                     _paper(p.get("val")), _paper(p.get("attn_q_rms"), True), _paper(p.get("mlp_rms"), True)])
        labels.append(data.label(arm))
        means.append(val.mean)
        spreads.append(val.spread)
        paper_vals.append(p.get("val"))
        if val.values:
            out.metrics[f"val_loss_at_reference_lr/{arm.replace('-', '_')}"] = val.mean
    out.tables["table8_at_reference_lr"] = (header, rows)
    if any(math.isfinite(m) for m in means):
        out.figures["table8_at_reference_lr_val_loss.png"] = figures.bars_figure(
            labels, means, spreads, f"table8 at one lr (lr_scale {ref_sel.lr_scale:g}): final val loss and the "
            "paper's", "val loss", paper_vals)


# ---------------------------------------------------------------------------------------------- Fig. 2
def weight_decay(data: ReportData) -> Analysis:
    """Fig. 2: val loss over tokens for AdamW, Muon without and with weight decay, the "vanilla − WD" difference,
    and the growth of weight RMS and layer-output RMS."""
    out = Analysis()
    group = _only_group(data)
    cfg = data.spec.analysis
    arms = [cfg["adamw"], cfg["vanilla"], cfg["wd"]]
    label = {a: data.label(a) for a in arms}
    for key, name, title in (("val/loss", "val_loss_over_tokens.png", "held-out loss over tokens"),
                             ("measure/hidden_matrix_rms", "weight_rms_over_tokens.png",
                              "RMS over all hidden matrices"),
                             ("measure/layer_output_rms", "layer_output_rms_over_tokens.png",
                              "layer output RMS (mean over layers, held-out samples)")):
        series = {label[a]: data.curves(group, a, key) for a in arms}
        if any(series.values()):
            out.figures[name] = figures.curves_figure(series, title, key.split("/")[-1],
                                                      logy=key != "val/loss")
    diff = _difference_curves(data.curves(group, cfg["vanilla"], "val/loss"), data.curves(group, cfg["wd"],
                                                                                          "val/loss"))
    if diff:
        out.figures["vanilla_minus_wd.png"] = figures.curves_figure(
            {"vanilla − WD (val loss; > 0: WD ahead)": diff}, "Muon without minus with weight decay", "Δ val loss",
            zero_line=True)
        x, mean, _, _ = figures.mean_curve(diff)
        if x.size:
            crossing = next((float(t) for t, v in zip(x, mean) if v > 0 and t > x[0]), None)
            out.metrics["vanilla_minus_wd_final"] = float(mean[-1])
            out.notes.append(f"vanilla − WD val loss at the end: {mean[-1]:+.4f} (the paper: WD ahead by 0.017 at "
                             f"iteration 66000; vanilla ahead by 0.023 at 24000)" +
                             (f"; WD first ahead at {crossing:,.0f} tokens" if crossing else ""))
    header = ["arm", "final val loss", "final hidden-matrix RMS", "final layer-output RMS", "max layer-output RMS"]
    rows = []
    for a in arms:
        rows.append([label[a], data.stat(group, a).fmt(), data.stat(group, a, "measure/hidden_matrix_rms").fmt(3, True),
                     data.stat(group, a, "measure/layer_output_rms").fmt(3, True),
                     data.stat(group, a, "measure/layer_output_rms_max").fmt(3, True)])
        if data.stat(group, a).values:
            out.metrics[f"val_loss/{a.replace('-', '_')}"] = data.stat(group, a).mean
    out.tables["weight_decay"] = (header, rows)
    out.notes.append(compare_text(label[cfg["wd"]], data.stat(group, cfg["wd"]), label[cfg["vanilla"]],
                                  data.stat(group, cfg["vanilla"])))
    out.notes.append(compare_text(label[cfg["wd"]], data.stat(group, cfg["wd"]), label[cfg["adamw"]],
                                  data.stat(group, cfg["adamw"])))
    return out


def _difference_curves(a: list, b: list) -> list[list[tuple[float, float]]]:
    """Per seed pair (same seed order), a − b at the token counts both have."""
    out = []
    for ca, cb in zip(a, b):
        db = dict(cb)
        out.append([(t, v - db[t]) for t, v in ca if t in db])
    return [c for c in out if c]


# ---------------------------------------------------------------------------------------------- Fig. 4
def svd_entropy(data: ReportData) -> Analysis:
    """Fig. 4: SVD entropy per group over training for Muon and AdamW, and the fraction of matrices whose final
    entropy is higher under Muon (paired by matrix and seed; the paper: > 90 % at 1.2T tokens)."""
    from app.experiments.measure import svd_matrix_group
    from components.metrics.svd_entropy import GROUPS

    out = Analysis()
    group = _only_group(data)
    muon, adamw = data.spec.analysis["muon"], data.spec.analysis["adamw"]
    header = ["paper group", f"{data.label(muon)} final", f"{data.label(adamw)} final", "matrices higher under Muon"]
    rows = []
    higher: dict[str, list[bool]] = {}
    m_rows, a_rows = data.selected_rows(group, muon), data.selected_rows(group, adamw)
    for m_row, a_row in zip(sorted(m_rows, key=lambda r: r.point.seed), sorted(a_rows, key=lambda r: r.point.seed)):
        for key, value in m_row.metrics.items():
            if key.startswith("measure/svd/") and key in a_row.metrics:
                g = svd_matrix_group(key) or "other"
                higher.setdefault(g, []).append(value > a_row.metrics[key])
    for g in GROUPS:
        ms, ad = data.stat(group, muon, f"svd_entropy/{g}"), data.stat(group, adamw, f"svd_entropy/{g}")
        if not ms.values and not ad.values:
            continue
        flags = higher.get(g, [])
        rows.append([g, ms.fmt(), ad.fmt(), f"{sum(flags)}/{len(flags)}" if flags else "–"])
        series = {data.label(muon): data.curves(group, muon, f"svd_entropy/{g}"),
                  data.label(adamw): data.curves(group, adamw, f"svd_entropy/{g}")}
        out.figures[f"svd_entropy_{g}.png"] = figures.curves_figure(series, f"SVD entropy, {g}", "SVD entropy")
    flags = [f for fs in higher.values() for f in fs]
    if flags:
        fraction = sum(flags) / len(flags)
        out.metrics["fraction_matrices_higher_entropy_muon"] = fraction
        rows.append(["all matrices", "", "", f"{sum(flags)}/{len(flags)} = {fraction:.1%}"])
        out.notes.append(f"{fraction:.1%} of matrices ({sum(flags)} of {len(flags)}, paired by seed) have a higher "
                         "final SVD entropy under Muon (the paper: > 90 % at 1.2T tokens, for the MoE model)")
    out.tables["svd_entropy"] = (header, rows)
    out.notes.append(compare_text(data.label(muon), data.stat(group, muon), data.label(adamw), data.stat(group, adamw)))
    return out


# ---------------------------------------------------------------------------------------------- Table 6
def sft_matrix(data: ReportData) -> Analysis:
    """Table 6: pretrain × fine-tune optimizer, held-out SFT loss (and offline task scores when measured)."""
    out = Analysis()
    group = _only_group(data)
    cells = data.spec.analysis.get("cells", [])
    paper = data.spec.paper_numbers.get("table6", {})
    wanted = str(data.spec.analysis.get("eval", {}).get("tasks", "")).split(",")
    tasks = sorted({k for c in cells for r in data.selected_rows(group, c["arm"]) for k in r.metrics
                    if k.startswith("eval/") and k.split("/")[1] in wanted and not k.endswith("_stderr")})
    header = ["pretrain", "SFT", "arm", "held-out SFT loss", *tasks, "paper (MMLU / HumanEval / MBPP / GSM8K)"]
    rows = []
    for c in cells:
        arm = c["arm"]
        waiting = next((why for g, a, why in data.plan.waiting if g == group and a == arm), None)
        scores = [data.stat(group, arm, t).fmt(3) for t in tasks]
        p = paper.get(f"{c['pretrain']},{c['sft']}")
        rows.append([c["pretrain"], c["sft"], arm, f"waiting: {waiting}" if waiting else data.stat(group, arm).fmt(),
                     *scores, " / ".join(map(str, p)) if p else "–"])
        if data.stat(group, arm).values:
            out.metrics[f"sft_val_loss/{c['pretrain']}_{c['sft']}"] = data.stat(group, arm).mean
    out.tables["sft_matrix"] = (header, rows)
    out.notes.append("at CPU scale the benchmark scores are near chance; the held-out SFT loss carries the "
                     "comparison")
    by = {(c["pretrain"], c["sft"]): data.stat(group, c["arm"]) for c in cells}
    for pre in ("muon", "adamw"):
        a, b = by.get((pre, "muon"), Stats([])), by.get((pre, "adamw"), Stats([]))
        out.notes.append(f"pretrained with {pre}: " + compare_text("SFT muon", a, "SFT adamw", b, "held-out SFT loss"))
    return out
