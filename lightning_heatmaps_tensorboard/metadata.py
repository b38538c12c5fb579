"""What a matrix summary of the HEATMAPS plugin carries, written and read in one place.

Each sample, a callback writes one float32 matrix per metric as a tensor summary whose metadata names
this plugin (``plugin_name``), has ``DATA_CLASS_TENSOR`` and carries JSON content that says how to read
the matrix (see :func:`matrix_content`). The callbacks write it (:mod:`lightning_heatmaps.sinks`), the
plugin reads it (:mod:`lightning_heatmaps_tensorboard.plugin`); both go through this module.

Standard library only: TensorBoard imports the plugin, and with it this module, at start.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

#: The plugin's name: in every summary's metadata, in the dashboard's URL (``#lightning_heatmaps``) and in
#: ``--samples_per_plugin=lightning_heatmaps=all``.
PLUGIN_NAME = "lightning_heatmaps"
#: Tags of the matrix summaries start with this (apart from the image tags, ``heatmaps/...``).
TAG_PREFIX = "matrices/"
#: Version of the JSON content; a reader refuses content of a newer version.
CONTENT_VERSION = 1
#: Why a cell has no value: a component a layer does not have, or one with no trainable parameter.
MISSING_REASONS = ("not monitored", "frozen")


def matrix_content(
    *,
    callback: str,
    metric: str,
    kind: str,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    row_axis: str = "layer",
    column_axis: str = "component",
    log_scale: bool = False,
    color_limits: Sequence[float] | None = None,
    pooled_column: bool = False,
    missing: Sequence[tuple[int, int, str]] = (),
    every_n_steps: int | None = None,
) -> bytes:
    """The JSON content of a matrix summary.

    Args:
        callback: the callback's class name (``GradientHeatmap``).
        metric: the metric's full name (``grad_norm``, ``attention_only/grad_norm``, ``logit_lens``).
        kind: what the matrix is (``layer_x_component``, ``layer_x_expert``, ``layer_x_token``,
            ``layer_x_position``, ``layer_x_site``).
        row_labels: one label per row (rows are layers; the first is drawn at the bottom).
        column_labels: one label per column (components, experts, token strings, positions, sites).
        row_axis: the rows' axis name.
        column_axis: the columns' axis name.
        log_scale: whether the dashboard starts on a log colour scale.
        color_limits: the dashboard's starting fixed colour range, or ``None`` for automatic.
        pooled_column: whether the last column is the pooled ``all`` value of its row.
        missing: ``(row, column, reason)`` of every cell that has no value by construction, with
            ``reason`` one of :data:`MISSING_REASONS`.
        every_n_steps: how often the callback samples, when it is on a step schedule (the dashboard uses
            it to tell when TensorBoard kept only part of the history).

    Example:
        >>> content = matrix_content(callback="GradientHeatmap", metric="grad_norm", kind="layer_x_component",
        ...                          row_labels=["0", "1"], column_labels=["attn.q", "all"], pooled_column=True,
        ...                          missing=[(1, 0, "frozen")])
        >>> read_content(content)["missing"]
        [[1, 0, 'frozen']]
    """
    rows, columns = [str(label) for label in row_labels], [str(label) for label in column_labels]
    for row, column, reason in missing:
        if reason not in MISSING_REASONS or not (0 <= row < len(rows) and 0 <= column < len(columns)):
            raise ValueError(f"Invalid missing cell {(row, column, reason)!r}: must be (row, column, one of {MISSING_REASONS}).")
    content: dict[str, Any] = {
        "version": CONTENT_VERSION,
        "callback": callback,
        "metric": metric,
        "kind": kind,
        "row_axis": row_axis,
        "column_axis": column_axis,
        "row_labels": rows,
        "column_labels": columns,
        "log_scale": bool(log_scale),
        "color_limits": None if color_limits is None else [float(v) for v in color_limits],
        "pooled_column": bool(pooled_column),
        "missing": [[int(row), int(column), reason] for row, column, reason in missing],
        "every_n_steps": None if every_n_steps is None else int(every_n_steps),
    }
    return json.dumps(content, separators=(",", ":")).encode("utf-8")


def read_content(content: bytes) -> dict[str, Any]:
    """Parse a matrix summary's content; ``ValueError`` if it is not content this version can read.

    Example:
        >>> read_content(b'{"version": 99}')
        Traceback (most recent call last):
        ...
        ValueError: matrix content version 99 is newer than this plugin reads (1): upgrade lightning-heatmaps.
    """
    try:
        parsed = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"matrix content is not JSON ({error}).") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("version"), int):
        raise ValueError("matrix content has no version.")
    if parsed["version"] > CONTENT_VERSION:
        raise ValueError(
            f"matrix content version {parsed['version']} is newer than this plugin reads ({CONTENT_VERSION}): "
            "upgrade lightning-heatmaps."
        )
    return parsed


def matrix_tag(metric: str, view: str | None = None) -> str:
    """The tag of a metric's matrices: ``matrices/<metric>`` or ``matrices/<metric>/<view>``.

    Example:
        >>> matrix_tag("grad_norm"), matrix_tag("logit_lens", "prompt_0")
        ('matrices/grad_norm', 'matrices/logit_lens/prompt_0')
    """
    return TAG_PREFIX + metric + ("" if view is None else "/" + view)
