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


def test_expert_load_heatmap_is_relative_to_the_layer_mean(tmp_path):
    counts = np.array([[10, 30, 20, 20], [0, 0, 40, 40], [5, 5, 5, 5]])
    path = tmp_path / "load.png"
    fig = plots.expert_load_figure(counts, step=7, path=str(path))
    assert len(fig.axes) == 2  # heatmap + colorbar
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(image, [[0.5, 1.5, 1.0, 1.0], [0, 0, 2, 2], [1, 1, 1, 1]])
    assert fig.axes[0].get_title() == "expert load at step 7"
    assert _png_shape(path)[2] == 4  # RGBA PNG


def test_expert_load_over_time_has_one_panel_per_layer(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 100, size=(5, 3, 8))
    path = tmp_path / "load_time.png"
    fig = plots.expert_load_over_time_figure([1, 2, 4, 8, 16], counts, path=str(path))
    assert len(fig.axes) == 3 + 1  # one per MoE layer + colorbar
    mesh = fig.axes[1].collections[0].get_array().reshape(8, 5)
    np.testing.assert_allclose(mesh, (counts[:, 1, :] / counts[:, 1, :].mean(-1, keepdims=True)).T)
    _png_shape(path)


@pytest.mark.parametrize("make", [plots.svd_entropy_figure, plots.update_rms_figure])
def test_group_series_has_one_line_per_group_in_paper_order(tmp_path, make):
    steps = [10, 20, 30]
    series = {"Router": [0.9, 0.8, 0.7], "AttnQO": [0.5, 0.6, 0.7], "Experts": [0.3, 0.3, 0.4]}
    path = tmp_path / "groups.png"
    fig = make(steps, series, path=str(path))
    (ax,) = fig.axes
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
    with pytest.raises(ValueError, match=r"\[layers, experts\].*\(4,\)"):
        plots.expert_load_figure(np.ones(4))
