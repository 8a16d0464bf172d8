"""The experiments' figures (object-oriented matplotlib, rendered by Agg, as app/plots.py): curves over tokens
averaged over seeds with their range shaded, bars with spreads, and the scaling-law plot of Fig. 1a.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FormatStrFormatter


def mean_curve(curves: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) over seeds at the token counts every seed has (same schedule -> same steps)."""
    finite = [{x: y for x, y in c if math.isfinite(x) and math.isfinite(y)} for c in curves if c]
    if not finite:
        return (np.array([]),) * 4
    xs = sorted(set.intersection(*(set(c) for c in finite)))
    ys = np.array([[c[x] for x in xs] for c in finite])
    return np.array(xs), ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def curves_figure(series: dict[str, list[list[tuple[float, float]]]], title: str, ylabel: str,
                  logy: bool = False, zero_line: bool = False) -> Figure:
    figure = Figure(figsize=(7, 4.2))
    ax = figure.add_subplot()
    for i, (label, curves) in enumerate(series.items()):
        x, mean, lo, hi = mean_curve(curves)
        if not x.size:
            continue
        ax.plot(x, mean, color=f"C{i}", label=f"{label} ({len(curves)} seed{'s' if len(curves) != 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
    if zero_line:
        ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def bars_figure(labels: list[str], means: list[float], spreads: list[float], title: str, ylabel: str,
                paper: list[float | None] | None = None) -> Figure:
    figure = Figure(figsize=(max(5, 1.1 * len(labels) + 2), 4))
    ax = figure.add_subplot()
    x = np.arange(len(labels))
    width = 0.38 if paper else 0.6
    ax.bar(x - (width / 2 if paper else 0), means, width, yerr=[0 if math.isnan(s) else s for s in spreads],
           capsize=4, label="measured (mean ± spread)", color="C0")
    if paper:
        ax.bar(x + width / 2, [math.nan if v is None else v for v in paper], width, label="paper", color="C1")
    finite = [v for v in means + [p for p in (paper or []) if p is not None] if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max((hi - lo) * 0.3, 0.02 * abs(hi))
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def sweep_figure(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "lr_scale") -> Figure:
    """Final val loss against the swept value, one line per arm (failed values left out)."""
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    for i, (label, pts) in enumerate(series.items()):
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final val loss (first seed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def scaling_figure(points: dict[str, list[tuple[float, float, float]]], fits: dict, ratio_text: str | None) -> Figure:
    """Fig. 1a: final loss against training FLOPs (log-log), points (mean ± spread over seeds) and each fit."""
    figure = Figure(figsize=(7, 4.5))
    ax = figure.add_subplot()
    all_c = [c for pts in points.values() for c, _, _ in pts]
    for i, (label, pts) in enumerate(points.items()):
        if not pts:
            continue
        c, loss, spread = map(np.array, zip(*pts))
        ax.errorbar(c, loss, yerr=np.nan_to_num(spread), fmt="o", color=f"C{i}", capsize=3, label=label)
        fit = fits.get(label)
        if fit is not None and all_c:
            grid = np.geomspace(min(all_c) / 1.5, max(all_c) * 1.5, 100)
            ax.plot(grid, fit(grid), "--", color=f"C{i}", label=f"{label}: L = {fit.a:.3f}·C^{fit.b:.4f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (C)")
    ax.set_ylabel("final val loss")
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 4.2, not 4.2×10⁰
        axis_format(FormatStrFormatter("%.1f"))
    if ratio_text:
        ax.set_title(ratio_text, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def tokens_fit_figure(d: list[float], loss: list[float], fit, muon: tuple[float, float] | None,
                      title: str) -> Figure:
    figure = Figure(figsize=(6.5, 4.2))
    ax = figure.add_subplot()
    ax.plot(d, loss, "o", color="C0", label="AdamW, final val loss per budget")
    if fit is not None:
        grid = np.geomspace(min(d) / 1.5, max(d) * 3, 100)
        ax.plot(grid, fit(grid), "--", color="C0",
                label=f"L(D) = {fit.alpha:.3g}·D^-{fit.beta:.3g} + {fit.gamma:.3f}")
    if muon is not None:
        ax.plot([muon[0]], [muon[1]], "s", color="C1", label="Muon at budget 1")
        ax.axhline(muon[1], color="C1", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens (D)")
    ax.set_ylabel("final val loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure
