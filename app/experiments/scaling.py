"""The scaling experiment's analysis (Fig. 1a / Fig. 3, Table 2 protocol): per model size the final loss of AdamW at
its best lr, of Muon reusing that lr (the paper's protocol) and of Muon at its own best lr; L = a·C^b fitted per
optimizer with C from the project's FLOP counter; the compute ratio at equal loss at the largest C; and the
tokens-equivalent speedup from AdamW's L(D) = α·D^−β + γ at one size, inverted at Muon's final loss.
"""
from __future__ import annotations

import math

from app.experiments import figures
from app.experiments.results import Analysis, ReportData, compare_text
from components.metrics.fits import compute_ratio_at_equal_loss, fit_power_law, fit_saturating_power_law

PROTOCOLS = (("muon_swept", "Muon, own lr sweep"), ("muon_reuse", "Muon, AdamW's lr (paper protocol)"))


def scaling(data: ReportData) -> Analysis:
    out = Analysis()
    cfg = data.spec.analysis
    roles = {"adamw": cfg["adamw"], "muon_reuse": cfg.get("muon_reuse"), "muon_swept": cfg.get("muon_swept")}
    labels = {"adamw": "AdamW", **dict(PROTOCOLS)}
    header = ["size", "params (no emb)", "tokens", "FLOPs", "AdamW lr_scale", "AdamW val loss",
              "Muon (AdamW's lr) val loss", "Muon lr_scale", "Muon (own lr) val loss", "Muon (own) − AdamW"]
    rows = []
    points: dict[str, list[tuple[float, float, float]]] = {labels[r]: [] for r in roles if roles[r]}
    for group in data.spec.groups:
        stats = {r: data.stat(group.name, arm) for r, arm in roles.items() if arm}
        reference = next((row for row in data.selected_rows(group.name, roles["adamw"])), None)
        if reference is None:
            rows.append([group.label or group.name, "–", "–", "–", "pending", "–", "–", "–", "–", "–"])
            continue
        for r, s in stats.items():
            if s.values:
                points[labels[r]].append((reference.flops, s.mean, s.spread))
        sel = {r: data.plan.selections.get((group.name, arm)) for r, arm in roles.items() if arm}
        lr = {r: (f"{s.lr_scale:g}" if s and s.lr_scale else "pending") for r, s in sel.items()}
        diff = (stats["muon_swept"].mean - stats["adamw"].mean) if "muon_swept" in stats else math.nan
        rows.append([group.label or group.name, reference.params, f"{reference.tokens:,.0f}", f"{reference.flops:.3e}",
                     lr["adamw"], stats["adamw"].fmt(), stats.get("muon_reuse", stats["adamw"]).fmt()
                     if "muon_reuse" in stats else "–", lr.get("muon_swept", "–"),
                     stats["muon_swept"].fmt() if "muon_swept" in stats else "–",
                     f"{diff:+.4f}" if math.isfinite(diff) else "–"])
        if "muon_swept" in stats:
            out.notes.append(f"{group.name}: " + compare_text("Muon", stats["muon_swept"], "AdamW", stats["adamw"]))
    out.tables["scaling"] = (header, rows)

    fits = {}
    for label, pts in points.items():
        if len(pts) >= 2:
            c, loss, _ = zip(*pts)
            fits[label] = fit_power_law(c, loss)
            out.metrics[f"fit/{_key(label)}/a"] = fits[label].a
            out.metrics[f"fit/{_key(label)}/b"] = fits[label].b
    ratio_text = []
    adamw_fit = fits.get("AdamW")
    if adamw_fit is not None:
        c_max = max(c for c, _, _ in points["AdamW"])
        for role, label in PROTOCOLS:
            if label in fits:
                ratio = compute_ratio_at_equal_loss(adamw_fit, fits[label], c_max)
                name = "muon_compute_ratio_at_equal_loss" + ("" if role == "muon_swept" else "_reuse_lr")
                out.metrics[name] = ratio
                ratio_text.append(f"{label}: {ratio:.3f}× AdamW's FLOPs at C={c_max:.2e}")
        out.notes += [f"compute ratio at equal loss (from the fits, at the largest C): {t}" for t in ratio_text]
        out.notes.append("the paper: Muon 2.506·C^−0.052, AdamW 2.608·C^−0.054 (C in PF-days), 0.519× FLOPs")
    if points and any(points.values()):
        out.figures["scaling_law.png"] = figures.scaling_figure(points, fits, "\n".join(ratio_text) or None)
    _tokens_equivalent(data, cfg, roles, out)
    return out


def _tokens_equivalent(data: ReportData, cfg: dict, roles: dict, out: Analysis) -> None:
    """Fit AdamW's L(D) at `tokens_group` over its budgets; invert it at Muon's final loss at budget 1."""
    group, budget_arm = cfg.get("tokens_group"), cfg.get("budgets_arm")
    if not group or not budget_arm:
        return
    pts = []
    ref = data.selected_rows(group, roles["adamw"])
    s = data.stat(group, roles["adamw"])
    if ref and s.values:
        pts.append((ref[0].tokens, s.mean))
    arm = data.spec.arm(budget_arm)
    for budget in arm.budgets:
        rows = data.selected_rows(group, budget_arm, budget)
        st = data.stat(group, budget_arm, budget=budget)
        if rows and st.values:
            pts.append((rows[0].tokens, st.mean))
    pts.sort()
    if len({d for d, _ in pts}) < 3:
        out.notes.append(f"tokens-equivalent speedup: needs AdamW at >= 3 budgets at {group}, has {len(pts)}")
        return
    d, loss = zip(*pts)
    try:
        fit = fit_saturating_power_law(d, loss)
    except ValueError as err:
        out.notes.append(f"tokens-equivalent speedup: the L(D) fit failed: {err}")
        return
    out.metrics.update({"fit/adamw_tokens/alpha": fit.alpha, "fit/adamw_tokens/beta": fit.beta,
                        "fit/adamw_tokens/gamma": fit.gamma})
    muon_point = None
    for role, label in PROTOCOLS:
        arm_name = roles.get(role)
        rows = data.selected_rows(group, arm_name) if arm_name else []
        st = data.stat(group, arm_name) if arm_name else None
        if not rows or not st or not st.values:
            continue
        tokens = rows[0].tokens
        needed = fit.inverse(st.mean)
        ratio = tokens / needed if math.isfinite(needed) else 0.0
        name = "muon_tokens_to_match_adamw" + ("" if role == "muon_swept" else "_reuse_lr")
        out.metrics[name] = ratio
        beyond = " (Muon's loss is below AdamW's fitted asymptote γ: AdamW never reaches it)" if not math.isfinite(
            needed) else ""
        out.notes.append(f"tokens-equivalent ({label}): Muon reaches {st.mean:.4f} with {tokens:,.0f} tokens; "
                         f"AdamW's L(D) needs {needed:,.0f} for that loss -> ratio {ratio:.3f}{beyond}")
        if role == "muon_swept":
            muon_point = (tokens, st.mean)
    out.figures["adamw_loss_vs_tokens.png"] = figures.tokens_fit_figure(
        list(d), list(loss), fit, muon_point, f"AdamW L(D) at {group}; Muon's final loss marked")


def _key(label: str) -> str:
    return {"AdamW": "adamw", PROTOCOLS[0][1]: "muon_swept", PROTOCOLS[1][1]: "muon_reuse"}[label]
