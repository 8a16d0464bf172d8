"""Training plots: each PNG is written and has the axes and lines its inputs call for."""

import numpy as np
import pytest
from matplotlib.image import imread

from app import plots


def _png_shape(path):
    assert path.stat().st_size > 1000
    return imread(path).shape


def test_loss_lr_figure_has_a_line_per_series_and_boundary(tmp_path):
    tokens = np.arange(1, 51) * 1024
    boundaries = [("warmup", 0), ("stable", 10_000), ("cooldown", 40_000)]
    path = tmp_path / "loss_lr.png"
    fig = plots.loss_lr_figure(tokens, 5 / np.sqrt(np.arange(1, 51)), np.linspace(0, 1e-3, 50), boundaries,
                               val_tokens=[25_600, 51_200], val_loss=[2.0, 1.5], path=str(path))
    ax_loss, ax_lr = fig.axes
    assert len(fig.axes) == 2
    assert len(ax_loss.lines) == 2 + len(boundaries)  # train, validation, one vertical line per stage
    assert len(ax_lr.lines) == 1 + len(boundaries)
    assert [t.get_text() for t in ax_loss.texts] == ["warmup", "stable", "cooldown"]
    assert sorted(line.get_xdata()[0] for line in ax_lr.lines[1:]) == [0, 10_000, 40_000]
    np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), np.linspace(0, 1e-3, 50))
    assert _png_shape(path) == (600, 900, 4)  # 9x6 in at 100 dpi, RGBA


def test_expert_imbalance_is_a_layer_by_tokens_heatmap(tmp_path):
    ratio = np.array([[1.0, 2.0, 3.0], [1.5, 1.2, 1.1], [1.0, 1.0, 4.0], [2.0, 2.0, 2.0]])  # [snapshots, layers]
    path = tmp_path / "load.png"
    fig = plots.expert_imbalance_figure([100, 200, 400, 800], ratio, path=str(path))
    assert len(fig.axes) == 2  # heatmap + colorbar
    mesh = fig.axes[0].collections[0]
    np.testing.assert_allclose(mesh.get_array().reshape(3, 4), ratio.T)
    assert fig.axes[0].get_xlabel() == "tokens seen" and fig.axes[0].get_ylabel() == "MoE layer"
    _png_shape(path)


def test_training_figures_come_from_the_metric_history():
    history = {
        "train/tokens": {1: 100.0, 2: 200.0, 3: 300.0, 4: 400.0},
        "train/loss": {1: 5.0, 2: 4.0, 3: 3.5, 4: 3.0},
        "train/lr": {1: 0.0, 2: 1e-3, 3: 1e-3, 4: 5e-4},
        "val/loss": {0: 6.0, 2: 4.5, 4: 3.2},
        "experts/layer_00/max_over_mean": {2: 1.5, 4: 1.2},
        "experts/layer_01/max_over_mean": {2: 2.0, 4: 1.1},
        "svd_entropy/Experts": {1: 0.9, 4: 0.8},
        "optim/muon/update_rms": {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2},
        "optim/adamw/update_rms": {1: 0.3, 2: 0.3, 3: 0.3, 4: 0.3},
    }
    figures = plots.training_figures(history, [("warmup", 0), ("decay", 250)])
    assert sorted(figures) == ["expert_load.png", "loss_lr.png", "svd_entropy.png", "update_rms.png"]
    ax_loss, _ = figures["loss_lr.png"].axes
    train, val = ax_loss.lines[:2]
    np.testing.assert_allclose(train.get_xdata(), [100, 200, 300, 400])
    np.testing.assert_allclose(val.get_xdata(), [0, 200, 400])  # validation at step 0 is at 0 tokens
    np.testing.assert_allclose(val.get_ydata(), [6.0, 4.5, 3.2])
    mesh = figures["expert_load.png"].axes[0].collections[0]
    np.testing.assert_allclose(mesh.get_array().reshape(2, 2), [[1.5, 1.2], [2.0, 1.1]])
    assert [line.get_label() for line in figures["update_rms.png"].axes[0].lines] == ["adamw", "muon"]


@pytest.mark.parametrize("make", [plots.svd_entropy_figure, plots.update_rms_figure])
def test_group_series_has_one_line_per_group_in_paper_order(tmp_path, make):
    tokens = [10, 20, 30]
    series = {"Router": [0.9, 0.8, 0.7], "AttnQO": [0.5, 0.6, 0.7], "Experts": [0.3, 0.3, 0.4]}
    path = tmp_path / "groups.png"
    fig = make(tokens, series, path=str(path))
    (ax,) = fig.axes
    assert ax.get_xlabel() == "tokens seen"
    assert [line.get_label() for line in ax.lines] == ["AttnQO", "Experts", "Router"]
    np.testing.assert_allclose(ax.lines[2].get_ydata(), series["Router"])
    assert _png_shape(path) == (450, 800, 4)


def test_bad_plot_input_names_the_field():
    with pytest.raises(ValueError, match=r"lr has 2 values but the x axis has 3"):
        plots.loss_lr_figure([1, 2, 3], [1.0, 0.9, 0.8], [1e-3, 1e-3])
    with pytest.raises(ValueError, match="increasing token order"):
        plots.loss_lr_figure([1, 2, 3], [1, 1, 1], [1, 1, 1], [("stable", 5), ("warmup", 0)])
    with pytest.raises(ValueError, match=r"series\['Dense'\] has 1 values"):
        plots.svd_entropy_figure([1, 2], {"Dense": [0.5]})
    with pytest.raises(ValueError, match=r"\[snapshots, layers\].*\(4,\)"):
        plots.expert_imbalance_figure([1, 2, 3, 4], np.ones(4))
