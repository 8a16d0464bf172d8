"""Training plots logged as MLflow artifacts: loss and lr over tokens with stage boundaries, expert load
heatmaps, SVD entropy per group (Moonlight §3.4) and update RMS per group (§2.2).

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
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen")
    ax_lr.xaxis.set_major_formatter(EngFormatter())
    ax_lr.grid(alpha=0.3)
    return _finish(figure, path)


def _load_matrix(load) -> np.ndarray:
    array = np.asarray(load, dtype=np.float64)
    mean = array.mean(axis=-1, keepdims=True)
    return np.divide(array, mean, out=np.zeros_like(array), where=mean > 0)


def expert_load_figure(load, step: int | None = None, path: str | None = None) -> Figure:
    """Heatmap of expert load at one step: rows are MoE layers, columns experts, colour = tokens routed to
    the expert divided by the layer's mean (1 = perfectly balanced). ``load``: [layers, experts] counts."""
    array = np.asarray(load, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"load must be a non-empty [layers, experts] array, got shape {array.shape}")
    relative = _load_matrix(array)
    layers, experts = array.shape
    figure = Figure(figsize=(max(4.0, 0.25 * experts + 2), max(2.5, 0.3 * layers + 1.5)))
    ax = figure.subplots()
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0,
                      vmax=max(2.0, float(relative.max())))
    figure.colorbar(image, ax=ax, label="load / mean load")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load" + (f" at step {step}" if step is not None else ""))
    return _finish(figure, path)


def expert_load_over_time_figure(steps, load, path: str | None = None) -> Figure:
    """One panel per MoE layer: experts (rows) over steps (columns), colour = load / mean load.

    ``load``: [steps, layers, experts] counts; ``steps``: the step of each snapshot.
    """
    array = np.asarray(load, dtype=np.float64)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"load must be a non-empty [steps, layers, experts] array, got shape {array.shape}")
    x = _series("steps", steps, array.shape[0])
    relative = _load_matrix(array)
    layers = array.shape[1]
    vmax = max(2.0, float(relative.max()))
    figure = Figure(figsize=(9, 1.8 * layers + 1), layout="constrained")
    axes = np.atleast_1d(figure.subplots(layers, 1, sharex=True, squeeze=False)[:, 0])
    # Cell edges halfway between snapshots, so uneven step spacing is drawn to scale.
    half = np.diff(x) / 2 if x.size > 1 else np.array([0.5])
    edges = np.concatenate([[x[0] - half[0]], x[:-1] + half, [x[-1] + half[-1]]])
    expert_edges = np.arange(array.shape[2] + 1) - 0.5
    for layer, ax in enumerate(axes):
        mesh = ax.pcolormesh(edges, expert_edges, relative[:, layer, :].T, cmap="viridis", vmin=0.0, vmax=vmax)
        ax.invert_yaxis()
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1].set_xlabel("step")
    figure.colorbar(mesh, ax=list(axes), label="load / mean load")
    return _finish(figure, path)


def group_series_figure(
    steps, series: Mapping[str, Sequence[float]], ylabel: str, title: str, log_y: bool = False,
    path: str | None = None,
) -> Figure:
    """One line per parameter group over steps; paper groups first in their fixed order and colours."""
    x = _series("steps", steps)
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
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _finish(figure, path)


def svd_entropy_figure(steps, entropy: Mapping[str, Sequence[float]], path: str | None = None) -> Figure:
    """SVD entropy per group over steps (Moonlight §3.4: Muon keeps it higher than AdamW)."""
    return group_series_figure(steps, entropy, "normalized SVD entropy", "SVD entropy per group", path=path)


def update_rms_figure(steps, rms: Mapping[str, Sequence[float]], path: str | None = None) -> Figure:
    """Update RMS per group over steps (Moonlight §2.2: Muon's scaled update should sit near AdamW's 0.2-0.4)."""
    return group_series_figure(steps, rms, "update RMS", "update RMS per group", log_y=True, path=path)
