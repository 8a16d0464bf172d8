"""Training plots logged as MLflow artifacts: loss and lr over tokens with stage boundaries, expert load
imbalance per layer, SVD entropy per group (Moonlight §3.4), update RMS per group (§2.2), the stage schedule.
`training_figures` builds them from a run's metric history (the tracking store plus its outage spool), so a
resumed or preempted run's plots cover the whole run.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``, rendered by Agg), never pyplot:
no global figure registry to leak, no GUI backend, safe in a training process. Each function returns the
Figure and, given ``path``, also writes it there as PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from components.metrics.svd_entropy import GROUPS

_GROUP_COLORS = {g: f"C{i}" for i, g in enumerate(GROUPS)}


def _series(name: str, values, length: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; there is nothing to plot")
    if length is not None and array.size != length:
        raise ValueError(f"{name} has {array.size} values but the x axis has {length}")
    return array


def _boundaries(boundaries) -> list[tuple[str, float]]:
    items = list(boundaries.items()) if isinstance(boundaries, Mapping) else list(boundaries)
    out = []
    for item in items:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"stage boundaries must be (name, token) pairs, got {item!r}")
        out.append((str(item[0]), float(item[1])))
    tokens = [t for _, t in out]
    if tokens != sorted(tokens):
        raise ValueError(f"stage boundaries must be in increasing token order, got {out}")
    return out


def save_png(figure: Figure, path: str, dpi: int = 100) -> str:
    """Write ``figure`` to ``path`` as PNG (creating the folder); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return path


def _finish(figure: Figure, path: str | None) -> Figure:
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    if path is not None:
        save_png(figure, path)
    return figure


def loss_lr_figure(
    tokens,
    loss,
    lr,
    boundaries: Mapping[str, float] | Sequence[tuple[str, float]] = (),
    val_tokens=None,
    val_loss=None,
    path: str | None = None,
) -> Figure:
    """Two stacked panels over tokens seen: training loss (and validation loss) above, lr below.

    ``boundaries``: (stage name, token at which it starts) pairs, drawn as a dashed vertical line in both
    panels and named above the loss panel.
    """
    x = _series("tokens", tokens)
    loss = _series("loss", loss, x.size)
    lr = _series("lr", lr, x.size)
    stages = _boundaries(boundaries)
    figure = Figure(figsize=(9, 6))
    ax_loss, ax_lr = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax_loss.plot(x, loss, color="C0", linewidth=1.0, label="train loss")
    if val_loss is not None:
        vx = _series("val_tokens", val_tokens)
        ax_loss.plot(vx, _series("val_loss", val_loss, vx.size), "o-", color="C3", markersize=3,
                     label="validation loss")
    ax_lr.plot(x, lr, color="C2", linewidth=1.0, label="lr")
    for name, token in stages:
        for ax in (ax_loss, ax_lr):
            ax.axvline(token, color="0.4", linestyle="--", linewidth=0.8)
        ax_loss.annotate(name, (token, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                         textcoords="offset points", fontsize=8, color="0.3")
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.legend(loc="center right", fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen")
    ax_lr.xaxis.set_major_formatter(EngFormatter())
    ax_lr.grid(alpha=0.3)
    return _finish(figure, path)


def expert_imbalance_figure(tokens, max_over_mean, path: str | None = None) -> Figure:
    """MoE layers (rows) over tokens seen (columns), colour = the busiest expert's load over the layer's mean load
    (1 = perfectly balanced; aux-loss-free balancing, App. C, should pull it towards 1).

    ``max_over_mean``: [snapshots, layers]; ``tokens``: the tokens seen at each snapshot.
    """
    array = np.asarray(max_over_mean, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"max_over_mean must be a non-empty [snapshots, layers] array, got shape {array.shape}")
    x = _series("tokens", tokens, array.shape[0])
    figure = Figure(figsize=(9, max(2.5, 0.3 * array.shape[1] + 1.5)), layout="constrained")
    ax = figure.subplots()
    # Cell edges halfway between snapshots, so uneven spacing is drawn to scale.
    half = np.diff(x) / 2 if x.size > 1 else np.array([0.5])
    edges = np.concatenate([[x[0] - half[0]], x[:-1] + half, [x[-1] + half[-1]]])
    mesh = ax.pcolormesh(edges, np.arange(array.shape[1] + 1) - 0.5, array.T, cmap="viridis", vmin=1.0,
                         vmax=max(2.0, float(np.nanmax(array))))
    ax.invert_yaxis()
    ax.set_yticks(range(array.shape[1]))
    ax.set_ylabel("MoE layer")
    ax.set_xlabel("tokens seen")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_title("expert load imbalance (max / mean load per layer)")
    figure.colorbar(mesh, ax=ax, label="max load / mean load")
    return _finish(figure, path)


def group_series_figure(
    tokens, series: Mapping[str, Sequence[float]], ylabel: str, title: str, log_y: bool = False,
    path: str | None = None,
) -> Figure:
    """One line per parameter group over tokens seen; paper groups first in their fixed order and colours."""
    x = _series("tokens", tokens)
    if not series:
        raise ValueError(f"series is empty; expected values for groups such as {list(GROUPS)}")
    names = [g for g in GROUPS if g in series] + sorted(k for k in series if k not in GROUPS)
    figure = Figure(figsize=(8, 4.5))
    ax = figure.subplots()
    for i, name in enumerate(names):
        y = _series(f"series[{name!r}]", series[name], x.size)
        ax.plot(x, y, color=_GROUP_COLORS.get(name, f"C{(len(GROUPS) + i) % 10}"), linewidth=1.2, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _finish(figure, path)


def svd_entropy_figure(tokens, entropy: Mapping[str, Sequence[float]], path: str | None = None) -> Figure:
    """SVD entropy per group over tokens seen (Moonlight §3.4: Muon keeps it higher than AdamW)."""
    return group_series_figure(tokens, entropy, "normalized SVD entropy", "SVD entropy per group", path=path)


def update_rms_figure(tokens, rms: Mapping[str, Sequence[float]], path: str | None = None) -> Figure:
    """Update RMS per group over tokens seen (Moonlight §2.2: Muon's scaled update should sit near AdamW's
    0.2-0.4)."""
    return group_series_figure(tokens, rms, "update RMS", "update RMS per group", log_y=True, path=path)


def schedule_figure(schedule, points: int = 600, path: str | None = None) -> Figure:
    """LR, global batch (sequences) and mixture weights over tokens seen, stage boundaries dashed (a
    `components.schedule.StageSchedule`)."""
    tokens = np.linspace(0, schedule.total_tokens, points)
    tokens = np.unique(np.concatenate([tokens, np.array(schedule.starts[1:], dtype=float)]))
    states = [schedule.at(t) for t in tokens]
    sets = sorted({name for s in schedule.stages for name in s.mixture})
    weights = np.array([[st.mixture.get(n, 0.0) / sum(st.mixture.values()) for n in sets] for st in states])
    figure = Figure(figsize=(8, 7))
    axes = figure.subplots(3, 1, sharex=True)
    axes[0].plot(tokens, [st.lr for st in states])
    axes[0].set_ylabel("learning rate")
    axes[1].step(tokens, [st.batch_size for st in states], where="post")
    axes[1].set_ylabel("global batch (sequences)")
    axes[2].stackplot(tokens, weights.T, labels=sets, step="post")
    axes[2].set_ylabel("mixture weight")
    axes[2].set_xlabel("tokens seen")
    axes[2].xaxis.set_major_formatter(EngFormatter())
    axes[2].legend(loc="upper left", fontsize="small")
    for ax in axes:
        for boundary in schedule.starts[1:]:
            ax.axvline(boundary, color="gray", linestyle="--", linewidth=0.8)
    figure.suptitle(" | ".join(s.name for s in schedule.stages))
    return _finish(figure, path)


def training_figures(history: Mapping[str, Mapping[int, float]], boundaries=()) -> dict[str, Figure]:
    """The run's figures from its metric history {key: {step: value}} (the keys `CrescentModule` and the
    callbacks log), x = tokens seen (`train/tokens` at each step; 0 before the first step)."""
    tokens = dict(history.get("train/tokens", {}))
    tokens.setdefault(0, 0.0)

    def over_tokens(key: str) -> tuple[list[float], list[float]]:
        points = sorted((s, v) for s, v in history.get(key, {}).items() if s in tokens)
        return [tokens[s] for s, _ in points], [v for _, v in points]

    def by_group(suffix: str, prefix: str) -> tuple[list[float], dict[str, list[float]]]:
        keys = sorted(k for k in history if k.startswith(prefix) and k.endswith(suffix))
        steps = sorted({s for k in keys for s in history[k] if s in tokens})
        series = {k[len(prefix):len(k) - len(suffix)]: [history[k].get(s, float("nan")) for s in steps] for k in keys}
        return [tokens[s] for s in steps], series

    figures: dict[str, Figure] = {}
    x, loss = over_tokens("train/loss")
    if x:
        _, lr = over_tokens("train/lr")
        vx, val = over_tokens("val/loss")
        figures["loss_lr.png"] = loss_lr_figure(x, loss, lr, boundaries, val_tokens=vx or None,
                                                val_loss=val or None)
    x, layers = by_group("/max_over_mean", "experts/layer_")
    if x and layers:
        figures["expert_load.png"] = expert_imbalance_figure(x, np.array([layers[k] for k in sorted(layers)]).T)
    x, entropy = by_group("", "svd_entropy/")
    if x and entropy:
        figures["svd_entropy.png"] = svd_entropy_figure(x, entropy)
    x, rms = by_group("/update_rms", "optim/")
    if x and rms:
        figures["update_rms.png"] = update_rms_figure(x, rms)
    return figures
