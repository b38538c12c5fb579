"""Rendering: a labelled heatmap :class:`~matplotlib.figure.Figure` from a matrix, and its pixels.

No pyplot: every figure is a standalone ``Figure`` on an Agg canvas, so rendering holds no global
state and is safe on a background thread.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MISSING_COLOR = "#d9d9d9"
NONFINITE_COLOR = "#e6007e"


def format_step(step: float) -> str:
    """Compact step label: ``950``, ``1.5k``, ``30k``, ``1.2M``.

    Example:
        >>> [format_step(s) for s in (0, 950, 1500, 30000, 1_200_000)]
        ['0', '950', '1.5k', '30k', '1.2M']
    """
    step = float(step)
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(step) >= factor:
            return f"{step / factor:.3g}{suffix}"
    return f"{step:.0f}"


def _tick_positions(count: int, most: int) -> np.ndarray:
    if count <= most:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, most).round().astype(int))


def _step_ticks(steps: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Ticks at round step values (``30k, 60k, ...``), placed by interpolation between sample columns."""
    if steps.size < 2 or not np.all(np.diff(steps) > 0):
        positions = _tick_positions(steps.size, 8)
        return positions, [format_step(steps[i]) for i in positions]
    values = MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10], integer=True).tick_values(steps[0], steps[-1])
    values = values[(values >= steps[0]) & (values <= steps[-1])]
    return np.interp(values, steps, np.arange(steps.size)), [format_step(v) for v in values]


def heatmap_figure(
    values: np.ndarray,
    *,
    row_labels: Sequence[str],
    column_labels: Sequence[str] | None = None,
    column_steps: Sequence[int] | None = None,
    title: str = "",
    colorbar_label: str = "",
    xlabel: str = "",
    ylabel: str = "layer",
    cmap: str = "viridis",
    log_scale: bool = False,
    color_limits: tuple[float, float] | None = None,
    missing: np.ndarray | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Figure:
    """A heatmap of ``values`` (rows = layers, first row at the bottom).

    Non-finite cells are painted in magenta and marked (``x`` NaN, ``^`` +Inf, ``v`` -Inf); cells
    flagged in ``missing`` (no such component in that layer) are grey.

    Args:
        values: ``(rows, columns)`` matrix.
        row_labels: one label per row.
        column_labels: one label per column (components), or
        column_steps: one training step per column (a layer x step history; ticks read ``30k``).
        title: figure title.
        colorbar_label: title of the colour bar (the metric).
        xlabel: x-axis title; ylabel: y-axis title.
        cmap: a matplotlib colour map name.
        log_scale: logarithmic colour scale (non-positive values are shown as missing).
        color_limits: fixed ``(vmin, vmax)``; by default the finite range of ``values``.
        missing: boolean mask, same shape as ``values``, of cells that do not exist.
        size: figure size in inches; dpi: pixels per inch.

    Example:
        >>> figure = heatmap_figure(np.eye(2), row_labels=["0", "1"], column_steps=[0, 1000], colorbar_label="rms")
        >>> figure_to_rgb(figure).shape[2]
        3
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"`values` must be a 2-D matrix, got shape {values.shape}.")
    rows, columns = values.shape
    if len(row_labels) != rows:
        raise ValueError(f"Got {len(row_labels)} row labels for a matrix with {rows} rows.")
    if column_labels is not None and len(column_labels) != columns:
        raise ValueError(f"Got {len(column_labels)} column labels for a matrix with {columns} columns.")
    if column_steps is not None and len(column_steps) != columns:
        raise ValueError(f"Got {len(column_steps)} column steps for a matrix with {columns} columns.")
    if missing is None:
        missing = np.zeros(values.shape, dtype=bool)
    if np.asarray(missing).shape != values.shape:
        raise ValueError(f"`missing` has shape {np.asarray(missing).shape}, expected {values.shape}.")
    missing = np.asarray(missing, dtype=bool)
    nonfinite = ~np.isfinite(values) & ~missing
    drawable = np.isfinite(values) & ~missing & ((values > 0) if log_scale else True)
    shown = np.ma.masked_array(values, mask=~drawable)

    finite = values[drawable]
    if color_limits is not None:
        vmin, vmax = color_limits
    elif finite.size:
        vmin, vmax = float(finite.min()), float(finite.max())
    else:
        vmin, vmax = (1.0, 10.0) if log_scale else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = (vmin / 2, vmax * 2) if log_scale else (vmin - 0.5, vmax + 0.5)
    norm = colors.LogNorm(vmin, vmax) if log_scale else colors.Normalize(vmin, vmax)

    longest_label = max((len(str(label)) for label in column_labels), default=0) if column_labels is not None else 0
    rotation = 0 if column_labels is None or (columns <= 6 and longest_label <= 6) else (90 if columns > 16 else 45)
    rotated = rotation != 0
    if size is None:
        per_column = 0.55 if columns <= 12 else 0.24
        width = 8.0 if column_steps is not None else min(16.0, max(4.5, 1.6 + per_column * columns))
        size = (width, max(3.0, min(10.0, 1.4 + 0.16 * rows)) + (0.08 * min(longest_label, 12) if rotated else 0.0))
    # Fixed margins (in inches) instead of constrained layout: a third of the drawing time saved.
    width, height = size
    label_room = 0.3 + 0.08 * min(longest_label, 12) if rotated else 0.6
    left, right, bottom, top = 0.75 / width, 1.25 / width, (0.3 + label_room) / height, 0.4 / height
    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((left, bottom, 1 - left - right, 1 - bottom - top))
    colorbar_axes = figure.add_axes((1 - right + 0.15 / width, bottom, 0.15 / width, 1 - bottom - top))
    colormap = matplotlib.colormaps[cmap].with_extremes(bad=MISSING_COLOR)
    image = axes.imshow(shown, aspect="auto", origin="lower", interpolation="nearest", cmap=colormap, norm=norm)
    colorbar = figure.colorbar(image, cax=colorbar_axes)
    colorbar.set_label(colorbar_label)

    if nonfinite.any():
        overlay = np.ma.masked_array(np.ones(values.shape), mask=~nonfinite)
        axes.imshow(overlay, aspect="auto", origin="lower", interpolation="nearest",
                    cmap=colors.ListedColormap([NONFINITE_COLOR]), vmin=0, vmax=1)
        if nonfinite.sum() <= 400:
            for marker, mask in (("x", np.isnan(values)), ("^", values == np.inf), ("v", values == -np.inf)):
                r, c = np.nonzero(mask & nonfinite)
                axes.scatter(c, r, marker=marker, color="black", s=18, linewidths=1)
        title = f"{title}  [NaN/Inf cells: magenta]" if title else "NaN/Inf cells: magenta"

    row_ticks = _tick_positions(rows, 32)
    axes.set_yticks(row_ticks, [row_labels[i] for i in row_ticks])
    if column_steps is not None:
        positions, labels = _step_ticks(np.asarray(column_steps, dtype=np.float64))
        axes.set_xticks(positions, labels)
    elif column_labels is not None:
        axes.set_xticks(np.arange(columns), list(column_labels), rotation=rotation,
                        ha="right" if rotation == 45 else "center", fontsize=8 if columns > 16 else None)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    return figure


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Draw ``figure`` and return its pixels as an ``(H, W, 3)`` uint8 array.

    Example:
        >>> figure_to_rgb(Figure(figsize=(1, 1), dpi=10)).shape
        (10, 10, 3)
    """
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def rgb_to_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` uint8 image.

    Example:
        >>> rgb_to_png(np.zeros((2, 2, 3), dtype=np.uint8))[:4]
        b'\\x89PNG'
    """
    from PIL import Image  # pillow is a dependency of matplotlib

    stream = io.BytesIO()
    Image.fromarray(rgb).save(stream, format="png")
    return stream.getvalue()


def metric_images(
    metric: str,
    steps: np.ndarray,
    history: np.ndarray,
    *,
    layer_labels: Sequence[str],
    component_names: Sequence[str],
    missing: np.ndarray,
    per_component: bool = False,
    column_axis: str = "component",
    latest_name: str = "layer_x_component",
    **style: object,
) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """The images of one metric, each with the arrays behind it: ``[(name, rgb, arrays), ...]``.

    ``history`` is ``(samples, layers, components + 1)``, its last column the pooled ``all`` value;
    names are ``layer_x_step`` (the ``all`` column over the history), ``latest_name`` (default
    ``layer_x_component``: the latest sample; its x axis reads ``column_axis``) and, with ``per_component``, ``layer_x_step/<component>``.

    Example:
        >>> history = np.ones((3, 2, 2))
        >>> images = metric_images("grad_norm", np.array([0, 1, 2]), history, layer_labels=["0", "1"],
        ...                        component_names=["attn.q"], missing=np.zeros((2, 1), bool))
        >>> [name for name, _, _ in images]
        ['layer_x_step', 'layer_x_component']
    """
    layers = np.asarray(list(layer_labels))
    step = int(steps[-1])
    series = [("layer_x_step", "all", history[:, :, -1].T)]
    if per_component:
        series += [(f"layer_x_step/{name}", name, history[:, :, i].T) for i, name in enumerate(component_names)]
    images = []
    for name, component, matrix in series:
        absent = np.repeat(missing[:, [list(component_names).index(component)]], matrix.shape[1], axis=1) if component != "all" else None
        figure = heatmap_figure(
            matrix, row_labels=layers, column_steps=steps, missing=absent, xlabel="step", colorbar_label=metric,
            title=f"{metric} ({component}): layer x step", **style,
        )
        arrays = {"values": matrix, "steps": steps, "layer_labels": layers, "component": np.asarray(component), "metric": np.asarray(metric)}
        images.append((name, figure_to_rgb(figure), arrays))
    if not component_names:
        return images
    latest = history[-1, :, :-1]
    figure = heatmap_figure(
        latest, row_labels=layers, column_labels=list(component_names), missing=missing, xlabel=column_axis,
        colorbar_label=metric, title=f"{metric}: layer x {column_axis} (step {format_step(step)})", **style,
    )
    arrays = {
        "values": latest, "step": np.asarray(step), "layer_labels": layers,
        "component_labels": np.asarray(list(component_names)), "missing": missing, "metric": np.asarray(metric),
    }
    images.append((latest_name, figure_to_rgb(figure), arrays))
    return images
