"""What the summaries of the HEATMAPS plugin carry, written and read in one place.

**Matrices.** Each sample, a callback writes one float32 matrix per metric as a tensor summary whose
metadata names this plugin (``plugin_name``), has ``DATA_CLASS_TENSOR`` and carries JSON content that says
how to read the matrix (see :func:`matrix_content`).

**Alerts.** Each spike alert is written under the one tag :data:`ALERT_TAG` (``alerts``) as a tensor
summary of the same plugin, at the alert's step: a 1-D ``DT_STRING`` tensor with one element per alert of
that step, each element the UTF-8 JSON ``{"alert": record, "number": n}`` (see :func:`encode_alert`),
where ``record`` is exactly one ``alerts.jsonl`` object and ``n`` counts the alerts this writer has
written so far (1, 2, ...). Two alerts at one step are written as one tensor of two elements (the
second write of a step repeats the first alert: a data provider keeps the latest value of a step).
The metadata's content is :func:`alert_content` (``{"version": 1, "type": "alerts"}``). A string tensor
is what both of TensorBoard's data providers return through ``read_tensors`` (the Rust data server and
``--load_fast=false``), as an object array of bytes. TensorBoard keeps a sample of a tag's values
(``--samples_per_plugin lightning_heatmaps=0`` keeps all): ``number`` lets the dashboard say when
alerts were dropped.

The callbacks write both (:mod:`lightning_heatmaps.sinks`), the plugin reads them
(:mod:`lightning_heatmaps_tensorboard.plugin`); both go through this module.

Standard library only: TensorBoard imports the plugin, and with it this module, at start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

#: The plugin's name: in every summary's metadata, in the dashboard's URL (``#lightning_heatmaps``) and in
#: ``--samples_per_plugin=lightning_heatmaps=all``.
PLUGIN_NAME = "lightning_heatmaps"
#: Tags of the matrix summaries start with this (apart from the image tags, ``heatmaps/...``).
TAG_PREFIX = "matrices/"
#: Version of the JSON content; a reader refuses content of a newer version.
CONTENT_VERSION = 1
#: The tag of the alert summaries (see the module docstring).
ALERT_TAG = "alerts"
#: Version of the alert encoding; a reader refuses a newer one.
ALERT_VERSION = 1
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
    parsed = _parse_json("matrix", content)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("version"), int):
        raise ValueError("matrix content has no version.")
    return _check_version("matrix", parsed, CONTENT_VERSION)


def _parse_json(kind: str, content: bytes) -> Any:
    try:
        return json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{kind} content is not JSON ({error}).") from None


def _check_version(kind: str, parsed: dict[str, Any], newest: int) -> dict[str, Any]:
    if parsed["version"] > newest:
        raise ValueError(
            f"{kind} content version {parsed['version']} is newer than this plugin reads ({newest}): "
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


def alert_content() -> bytes:
    """The JSON content of the alert summaries' metadata.

    Example:
        >>> read_alert_content(alert_content())["type"]
        'alerts'
    """
    return json.dumps({"version": ALERT_VERSION, "type": "alerts"}, separators=(",", ":")).encode("utf-8")


def read_alert_content(content: bytes) -> dict[str, Any]:
    """Parse the alert summaries' metadata content; ``ValueError`` if this version cannot read it.

    Example:
        >>> read_alert_content(b'{"version": 2, "type": "alerts"}')
        Traceback (most recent call last):
        ...
        ValueError: alert content version 2 is newer than this plugin reads (1): upgrade lightning-heatmaps.
    """
    parsed = _parse_json("alert", content)
    if not isinstance(parsed, dict) or parsed.get("type") != "alerts" or not isinstance(parsed.get("version"), int):
        raise ValueError("alert content has no version or is not of type 'alerts'.")
    return _check_version("alert", parsed, ALERT_VERSION)


def encode_alert(record: Mapping[str, Any], number: int) -> bytes:
    """One element of an alert tensor: the UTF-8 JSON ``{"alert": record, "number": number}``.

    Non-finite floats (a NaN loss) are written as the JSON extensions ``NaN`` and ``Infinity``, as
    ``json.dumps`` writes them; :func:`decode_alert` and the dashboard read them back.

    Example:
        >>> decode_alert(encode_alert({"step": 7, "signal": "loss", "z": float("inf")}, 1))
        ({'step': 7, 'signal': 'loss', 'z': inf}, 1)
    """
    return json.dumps({"alert": dict(record), "number": int(number)}, separators=(",", ":"), default=_plain).encode("utf-8")


def _plain(value: Any) -> Any:
    # A NumPy scalar (np.float32 z, np.int64 step) as the Python number it holds; anything else is an error.
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        return value.item()
    raise TypeError(f"an alert holds {type(value).__name__!r}, which JSON cannot write.")


def decode_alert(element: bytes) -> tuple[dict[str, Any], int]:
    """The inverse of :func:`encode_alert`: ``(record, number)``; ``ValueError`` if it is not one."""
    try:
        parsed = json.loads(element.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"alert is not JSON ({error}).") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("alert"), dict) or not isinstance(parsed.get("number"), int):
        raise ValueError("alert element is not {'alert': {...}, 'number': int}.")
    return parsed["alert"], parsed["number"]
