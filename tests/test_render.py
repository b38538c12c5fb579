"""Figures: labels checked against the matrix, steps in 30k style, non-finite cells marked."""

import numpy as np
import pytest

from lightning_heatmaps.render import figure_to_rgb, format_step, heatmap_figure, metric_images

from conftest import magenta_pixels


def test_format_step():
    assert [format_step(s) for s in (0, 999, 30_000, 60_000, 1_500, 2_000_000)] == ["0", "999", "30k", "60k", "1.5k", "2M"]


def test_step_ticks_are_round_thousands():
    steps = np.arange(0, 300_001, 1_200)
    figure = heatmap_figure(np.random.rand(12, steps.size), row_labels=[str(i) for i in range(12)], column_steps=steps)
    figure_to_rgb(figure)
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels and all(label.endswith("k") or label == "0" for label in labels)
    assert "100k" in labels and "200k" in labels


def test_labels_must_match_the_matrix():
    with pytest.raises(ValueError, match="3 row labels for a matrix with 2 rows"):
        heatmap_figure(np.zeros((2, 2)), row_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="1 column labels for a matrix with 2 columns"):
        heatmap_figure(np.zeros((2, 2)), row_labels=["a", "b"], column_labels=["x"])
    with pytest.raises(ValueError, match="2-D"):
        heatmap_figure(np.zeros(3), row_labels=["a"])


def test_nonfinite_cells_are_painted_and_finite_ones_are_not():
    values = np.arange(12.0).reshape(3, 4)
    clean = figure_to_rgb(heatmap_figure(values, row_labels=["0", "1", "2"], column_labels=list("abcd")))
    values[1, 2] = np.nan
    values[2, 0] = np.inf
    marked = figure_to_rgb(heatmap_figure(values, row_labels=["0", "1", "2"], column_labels=list("abcd")))
    assert magenta_pixels(clean) == 0
    assert magenta_pixels(marked) > 500  # two whole cells


def test_metric_images_carry_their_arrays():
    history = np.random.rand(5, 3, 3)
    missing = np.array([[False, False], [False, True], [False, False]])
    images = metric_images("grad_norm", np.arange(5) * 10, history, layer_labels=["0", "1", "2"],
                           component_names=["attn.q", "mlp.up"], missing=missing, per_component=True)
    names = [name for name, _, _ in images]
    assert names == ["layer_x_step", "layer_x_step/attn.q", "layer_x_step/mlp.up", "layer_x_component"]
    by_name = {name: arrays for name, _, arrays in images}
    np.testing.assert_array_equal(by_name["layer_x_step"]["values"], history[:, :, -1].T)
    np.testing.assert_array_equal(by_name["layer_x_component"]["values"], history[-1, :, :2])
    assert by_name["layer_x_component"]["step"] == 40
    assert all(rgb.ndim == 3 and rgb.shape[2] == 3 for _, rgb, _ in images)


def test_log_scale_with_zero_and_infinite_cells():
    values = np.array([[0.0, 1e-3], [np.inf, 10.0]])
    figure = heatmap_figure(values, row_labels=["0", "1"], column_labels=["a", "b"], log_scale=True)
    rgb = figure_to_rgb(figure)
    image = figure.axes[0].images[0]
    assert image.norm.vmin == pytest.approx(1e-3) and image.norm.vmax == pytest.approx(10.0)
    assert magenta_pixels(rgb) > 200  # the +Inf cell is marked; the zero cell cannot be drawn on a log scale
