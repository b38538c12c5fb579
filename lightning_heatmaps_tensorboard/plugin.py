"""The HEATMAPS tab: a small WSGI app over TensorBoard's data provider, and the dashboard's static files.

Routes (under ``/data/plugin/lightning_heatmaps``):

- ``/static/<file>``: the dashboard's ES modules and stylesheet, from a fixed list of files (anything
  else, ``..`` included, is a 404);
- ``/runs``: JSON ``{run: {tag: {content..., "max_step": int}}}`` of every matrix time series;
- ``/values?run=R&tag=T[&after=S]``: one time series as binary (see :func:`encode_values`), only the
  samples with a step greater than ``after`` when it is given, so a live refresh sends only what is new;
- ``/alerts?run=R``: JSON ``{"alerts": [record, ...], "kept": int, "written": int}``, the run's spike alerts
  in step order (each exactly one ``alerts.jsonl`` object; non-finite numbers as the strings ``"NaN"``,
  ``"Infinity"``, ``"-Infinity"``, as TensorBoard's ``http_util.Respond`` writes them), how many TensorBoard
  kept, and how many the writer had written by the newest alert kept (more than ``kept`` when TensorBoard
  dropped some; see :mod:`~lightning_heatmaps_tensorboard.metadata`).

A bad ``run``, ``tag`` or ``after`` is answered with a 400 whose text says what was wrong; every response
names its content type and carries ``X-Content-Type-Options: nosniff`` (``http_util.Respond``).

The plugin reads through ``context.data_provider`` only, so it works with TensorBoard's default Rust data
server and with ``--load_fast=false`` alike.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_heatmaps_tensorboard.metadata import ALERT_TAG, PLUGIN_NAME, decode_alert, read_alert_content, read_content

_STATIC_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: The only files the static route serves, with their content types.
STATIC_FILES = {
    "index.js": "text/javascript",
    "dashboard.js": "text/javascript",
    "data.js": "text/javascript",
    "colors.js": "text/javascript",
    "heatmap.js": "text/javascript",
    "linechart.js": "text/javascript",
    "canvas.js": "text/javascript",
    "baseline.js": "text/javascript",
    "host.js": "text/javascript",
    "style.css": "text/css",
}
#: Header of a ``/values`` body: magic, format version, samples, rows, columns (little-endian uint32).
VALUES_HEADER = struct.Struct("<4sIIII")
VALUES_MAGIC = b"LHMV"
_MAX_PARAMETER_LENGTH = 4096
# Ask the data provider for every sample it holds; how many it holds is TensorBoard's choice
# (`--samples_per_plugin`), see the README.
_ALL_SAMPLES = 10**9


class BadRequest(ValueError):
    """A request parameter the plugin cannot serve; answered with a 400 and this message."""


def encode_values(steps: np.ndarray, values: np.ndarray) -> bytes:
    """The binary body of ``/values``: header, float64 steps, float32 values (row-major, little-endian).

    Header: ``b"LHMV"``, format version 1, then samples ``n``, rows ``r`` and columns ``c`` as uint32; then
    ``n`` float64 steps (exact for every integer step below 2**53); then ``n * r * c`` float32 values,
    sample by sample, each a row-major ``r x c`` matrix. The header is 20 bytes, so the value block starts
    at ``20 + 8 n``; the dashboard copies the steps out, as float64 needs 8-byte alignment.

    Example:
        >>> body = encode_values(np.array([0, 10]), np.zeros((2, 3, 4), np.float32))
        >>> len(body) == 20 + 2 * 8 + 2 * 3 * 4 * 4
        True
        >>> decode_values(body)[1].shape
        (2, 3, 4)
    """
    values = np.ascontiguousarray(values, dtype="<f4")
    samples, rows, columns = values.shape
    header = VALUES_HEADER.pack(VALUES_MAGIC, 1, samples, rows, columns)
    return header + np.asarray(steps, dtype="<f8").tobytes() + values.tobytes()


def decode_values(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`encode_values`: ``(steps, values)``."""
    magic, version, samples, rows, columns = VALUES_HEADER.unpack_from(body)
    if magic != VALUES_MAGIC or version != 1:
        raise ValueError("not a lightning-heatmaps values body")
    offset = VALUES_HEADER.size
    steps = np.frombuffer(body, dtype="<f8", count=samples, offset=offset).astype(np.int64)
    values = np.frombuffer(body, dtype="<f4", count=samples * rows * columns, offset=offset + 8 * samples)
    return steps, values.reshape(samples, rows, columns)


def _parameter(request: Any, name: str, required: bool = True) -> str | None:
    value = request.args.get(name)
    if value is None:
        if required:
            raise BadRequest(f"Missing query parameter {name!r}.")
        return None
    if len(value) > _MAX_PARAMETER_LENGTH or "\x00" in value:
        raise BadRequest(f"Invalid value for {name}: longer than {_MAX_PARAMETER_LENGTH} characters or holds a NUL.")
    return value


def _bad_request(request: Any, message: str) -> wrappers.Response:
    return http_util.Respond(request, message, "text/plain", code=400)


class HeatmapsPlugin(base_plugin.TBPlugin):
    """The HEATMAPS dashboard (TensorBoard plugin ``lightning_heatmaps``).

    TensorBoard finds it through the ``tensorboard_plugins`` entry point of the lightning-heatmaps wheel.

    Example:
        >>> from tensorboard.plugins import base_plugin
        >>> HeatmapsPlugin(base_plugin.TBContext()).frontend_metadata().tab_name
        'Heatmaps'
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data_provider = context.data_provider

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/values": self._serve_values,
            "/alerts": self._serve_alerts,
        }

    def is_active(self) -> bool:
        # Deprecated by TensorBoard: whether the tab shows is decided from `data_plugin_names` and the data.
        return False

    def data_plugin_names(self) -> tuple[str, ...]:
        return (PLUGIN_NAME,)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name="Heatmaps")

    # --- routes ----------------------------------------------------------------------------------

    @wrappers.Request.application
    def _serve_static(self, request: Any) -> wrappers.Response:
        # Only a listed file name, looked up as a dictionary key: `..`, `%2e%2e`, sub-folders and absolute
        # paths can never reach the file system.
        name = request.path.split("/static/", 1)[-1]
        content_type = STATIC_FILES.get(name)
        if content_type is None:
            return http_util.Respond(request, f"Not found: {name[:100]!r} is not a file of this dashboard.", "text/plain", code=404)
        with open(os.path.join(_STATIC_DIRECTORY, name), "rb") as file:
            body = file.read()
        return http_util.Respond(request, body, content_type)

    @wrappers.Request.application
    def _serve_runs(self, request: Any) -> wrappers.Response:
        return http_util.Respond(request, self.runs(request.environ), "application/json")

    @wrappers.Request.application
    def _serve_values(self, request: Any) -> wrappers.Response:
        try:
            run = _parameter(request, "run")
            tag = _parameter(request, "tag")
            after_text = _parameter(request, "after", required=False)
            after = None
            if after_text is not None:
                try:
                    after = int(after_text)
                except ValueError:
                    raise BadRequest(f"Invalid value for after={after_text[:100]!r}: must be an integer step.") from None
            steps, values = self.values(request.environ, run, tag, after)
        except BadRequest as error:
            return _bad_request(request, str(error))
        return http_util.Respond(request, encode_values(steps, values), "application/octet-stream")

    @wrappers.Request.application
    def _serve_alerts(self, request: Any) -> wrappers.Response:
        try:
            alerts = self.alerts(request.environ, _parameter(request, "run"))
        except BadRequest as error:
            return _bad_request(request, str(error))
        return http_util.Respond(request, alerts, "application/json")

    # --- data ------------------------------------------------------------------------------------

    def _context(self, environ: dict) -> tuple[Any, str]:
        return plugin_util.context(environ), plugin_util.experiment_id(environ)

    def runs(self, environ: dict) -> dict[str, dict[str, dict[str, Any]]]:
        """``{run: {tag: content + max_step}}`` of every matrix time series this plugin can read."""
        ctx, experiment = self._context(environ)
        listing = self._data_provider.list_tensors(ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME)
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for run, tags in listing.items():
            for tag, series in tags.items():
                if tag == ALERT_TAG:
                    continue  # not a matrix: served by /alerts
                try:
                    content = read_content(series.plugin_content)
                except ValueError as error:
                    content = {"error": str(error)}
                content["max_step"] = int(series.max_step)
                result.setdefault(run, {})[tag] = content
        return result

    def values(self, environ: dict, run: str, tag: str, after: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Steps and ``(samples, rows, columns)`` values of one time series, in step order."""
        ctx, experiment = self._context(environ)
        listing = self._data_provider.list_tensors(
            ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME, run_tag_filter=provider.RunTagFilter(runs=[run])
        )
        if run not in listing:
            raise BadRequest(f"Invalid value for run={run[:200]!r}: no run with heatmaps matrices has that name.")
        if tag not in listing[run] or tag == ALERT_TAG:
            raise BadRequest(f"Invalid value for tag={tag[:200]!r}: run {run[:200]!r} has no heatmaps matrices under that tag.")
        data = self._data_provider.read_tensors(
            ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME, downsample=_ALL_SAMPLES,
            run_tag_filter=provider.RunTagFilter([run], [tag]),
        )
        datums = sorted(data.get(run, {}).get(tag, []), key=lambda datum: (datum.step, datum.wall_time))
        by_step = {datum.step: datum for datum in datums if after is None or datum.step > after}  # the latest write of a step
        arrays = [np.asarray(datum.numpy, dtype=np.float32) for datum in by_step.values()]
        shape = arrays[-1].shape if arrays else None
        if shape is not None and len(shape) != 2:
            raise BadRequest(f"Invalid value for tag={tag[:200]!r}: its tensors are not matrices (shape {shape}).")
        # A run restarted with another model can leave older matrices of another shape: the newest shape wins.
        kept = [(step, array) for step, array in zip(by_step, arrays) if array.shape == shape]
        if not kept:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0, 0), dtype=np.float32)
        return np.array([step for step, _ in kept], dtype=np.int64), np.stack([array for _, array in kept])


    def alerts(self, environ: dict, run: str) -> dict[str, Any]:
        """``{"alerts": [record, ...], "kept": int, "written": int}`` of one run, records in step order.

        A run the plugin knows (it has matrices or alerts) but with no alerts gives an empty list; an unknown
        run is a :class:`BadRequest`.
        """
        ctx, experiment = self._context(environ)
        listing = self._data_provider.list_tensors(
            ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME, run_tag_filter=provider.RunTagFilter(runs=[run])
        )
        if run not in listing:
            raise BadRequest(f"Invalid value for run={run[:200]!r}: no run with heatmaps matrices or alerts has that name.")
        series = listing[run].get(ALERT_TAG)
        if series is None:
            return {"alerts": [], "kept": 0, "written": 0}
        try:
            read_alert_content(series.plugin_content)
        except ValueError as error:
            raise BadRequest(f"Run {run[:200]!r} has alerts this plugin cannot read: {error}") from None
        data = self._data_provider.read_tensors(
            ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME, downsample=_ALL_SAMPLES,
            run_tag_filter=provider.RunTagFilter([run], [ALERT_TAG]),
        )
        # Every element of every value kept, once: the Rust data server keeps only the latest write of a step
        # (which repeats that step's earlier alerts), the Python multiplexer keeps every write.
        seen: dict[bytes, tuple[int, int, dict[str, Any]]] = {}
        for datum in data.get(run, {}).get(ALERT_TAG, []):
            for element in np.asarray(datum.numpy, dtype=object).reshape(-1):
                raw = bytes(element)
                if raw in seen:
                    continue
                try:
                    record, number = decode_alert(raw)
                except ValueError:
                    continue  # not an alert of this format: never shown as one
                seen[raw] = (datum.step, number, record)
        ordered = sorted(seen.values(), key=lambda item: (item[0], item[1]))
        # The writer's count at its newest alert kept (a resumed run counts again from 1: never below kept).
        written = max((number for step, number, _ in ordered if step == ordered[-1][0]), default=0)
        return {"alerts": [record for _, _, record in ordered], "kept": len(ordered), "written": max(written, len(ordered))}
