"""The spike rule: robust z of a value against the previous values of its own series, on a log scale.

Pure maths, no trainer: :class:`~lightning_heatmaps.SpikeAlert` feeds it the loss, the global gradient norm
and every sampled layer series, and the tests compare it with numpy/scipy.

The rule, for one series with values ``v_1, v_2, ...``:

1. ``x_t = log(max(|v_t|, LOG_FLOOR))`` (natural log; ``LOG_FLOOR = 1e-12`` keeps zeros finite).
2. The baseline of ``x_t`` is the last ``window`` values of the series that were accepted before it (at most
   128 by default). A value is accepted when it is finite and either the baseline still holds fewer than
   ``warmup`` values (during warm-up every finite value enters) or its z is at most ``threshold``: a spike
   never enters its own baseline.
3. ``z_t = (x_t - median(baseline)) / (MAD_SCALE * max(MAD(baseline), mad_floor))`` with
   ``MAD(b) = median(|b - median(b)|)`` and ``MAD_SCALE = 1.4826`` (so the scale estimates a standard
   deviation for normal data). ``mad_floor`` (``MAD_FLOOR = 0.02`` by default, in natural-log units: 2 %
   relative spread) keeps a constant series from giving an infinite z and sets the smallest jump that can
   alert: with the defaults a value must be ``exp(6 * 1.4826 * 0.02) = 1.19`` times the median at least.
4. A value is a spike when the baseline holds at least ``warmup`` values and ``z_t > threshold``. Spikes
   are upward only: a series that falls (the loss going down) never alerts. A value that is NaN or infinite
   is always reported, warm-up or not (its z is NaN; it never enters the baseline).
5. (:class:`SpikeMonitor`) The loss alerts on one spiking value; a sampled signal (the global gradient norm,
   a layer series) only when it spikes on ``confirm_samples`` (2) consecutive samples of its own, dated at
   the first: single-batch excursions of those diagnostics with the loss flat are noise in clean runs
   (``benchmarks/RESULTS.md``), a layer that really changed stays changed.

Example:
    >>> baseline = RobustBaseline(size=1, window=8, warmup=4)
    >>> [bool(baseline.update(np.array([v]), threshold=6.0)[0] > 6) for v in [1.0, 1.02, 0.99, 1.01, 1.0, 10.0]]
    [False, False, False, False, False, True]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Absolute values below this are taken as this before the log, so a zero has a finite log.
LOG_FLOOR = 1e-12
#: The MAD of a baseline (natural-log units) is taken as at least this much (2 % relative spread).
MAD_FLOOR = 0.02
#: MAD times this estimates the standard deviation of normal data (``1 / Phi^-1(3/4)``, rounded).
MAD_SCALE = 1.4826
#: Default accepted values per baseline.
WINDOW = 128
#: Default accepted values a baseline needs before its series can spike.
WARMUP = 64
#: Default robust z above which a value is a spike.
THRESHOLD = 6.0
#: Default consecutive spiking samples a sampled signal (gradient norm, layer series) needs before it alerts.
CONFIRM_SAMPLES = 2


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid value for {name}={value!r}: must be an integer >= {minimum}.")


def _check_number(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        raise ValueError(f"Invalid value for {name}={value!r}: must be a number {'>' if strict else '>='} {minimum}.")


def log_values(values: np.ndarray) -> np.ndarray:
    """``log(max(|v|, LOG_FLOOR))``; NaN and infinite values stay NaN and infinite.

    Example:
        >>> log_values(np.array([1.0, 0.0, np.nan])).round(2).tolist()
        [0.0, -27.63, nan]
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.log(np.maximum(np.abs(values), LOG_FLOOR))


def _median_and_mad(baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the median and MAD of the finite values (NaN for an empty column)."""
    if baseline.shape[0] == 0:
        return np.full(baseline.shape[1:], np.nan), np.full(baseline.shape[1:], np.nan)
    if np.isfinite(baseline).all():  # the common case, without nanmedian's overhead
        median = np.median(baseline, axis=0)
        return median, np.median(np.abs(baseline - median), axis=0)
    median = np.full(baseline.shape[1:], np.nan)
    mad = np.full(baseline.shape[1:], np.nan)
    filled = np.isfinite(baseline).any(axis=0)
    if filled.any():
        columns = baseline[:, filled]
        median[filled] = np.nanmedian(columns, axis=0)
        mad[filled] = np.nanmedian(np.abs(columns - median[filled]), axis=0)
    return median, mad


def robust_z(x: np.ndarray, baseline: np.ndarray, mad_floor: float = MAD_FLOOR) -> np.ndarray:
    """Robust z of log-values ``x`` (shape ``[n]``) against ``baseline`` (``[window, n]``, NaN where empty).

    Args:
        x: one log-value per series.
        baseline: earlier accepted log-values of each series, NaN for unused slots.
        mad_floor: the smallest MAD used (natural-log units).

    Returns:
        ``(x - median) / (MAD_SCALE * max(MAD, mad_floor))`` per series; NaN where the baseline is empty
        or ``x`` is not finite.

    Example:
        >>> robust_z(np.array([np.log(2.0)]), np.log(np.array([[1.0], [1.0], [1.0]]))).round(2).tolist()
        [23.38]
    """
    median, mad = _median_and_mad(np.asarray(baseline, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        return (np.asarray(x, dtype=np.float64) - median) / (MAD_SCALE * np.maximum(mad, mad_floor))


def baseline_median(baseline: np.ndarray) -> np.ndarray:
    """The median of each series' baseline on the original scale (``exp`` of the log median), NaN if empty."""
    return np.exp(_median_and_mad(np.asarray(baseline, dtype=np.float64))[0])


class RobustBaseline:
    """The robust baselines of ``size`` series updated together, one value of each per call (module rule).

    Args:
        size: number of series.
        window: accepted values kept per series (the baseline).
        warmup: accepted values a series needs before it can spike.
        mad_floor: the smallest MAD used, in natural-log units.

    Example:
        >>> baseline = RobustBaseline(size=2, window=4, warmup=2)
        >>> for step in range(3):
        ...     z = baseline.update(np.array([1.0, 5.0]), threshold=6.0)
        >>> baseline.update(np.array([1.0, 50.0]), threshold=6.0).round(1).tolist()
        [0.0, 77.7]
    """

    def __init__(self, size: int, window: int = WINDOW, warmup: int = WARMUP, mad_floor: float = MAD_FLOOR) -> None:
        self.size, self.window, self.warmup, self.mad_floor = size, window, warmup, mad_floor
        self._values = np.full((window, size), np.nan)  # log-values, a ring per series
        self._accepted = np.zeros(size, dtype=np.int64)  # values accepted over the run, per series
        self.last_median = np.full(size, np.nan)

    @property
    def ready(self) -> np.ndarray:
        """Per series: whether its baseline holds ``warmup`` values (it may spike)."""
        return np.minimum(self._accepted, self.window) >= self.warmup

    def median(self) -> np.ndarray:
        """Per series, the baseline's median on the original scale (NaN while empty)."""
        return baseline_median(self._values)

    def update(self, values: np.ndarray, threshold: float) -> np.ndarray:
        """Score one value per series (NaN: no value this time), then add the accepted ones to the baselines.

        Returns the robust z of each value (NaN where the value or the baseline is missing). A series is a
        spike where ``ready & (z > threshold)``; such values, and non-finite ones, are not added.
        """
        x = log_values(values)
        filled = self._values if self._accepted.min() >= self.window else self._values[: min(self.window, int(self._accepted.max()))]
        median, mad = _median_and_mad(filled)
        self.last_median = np.exp(median)  # the baseline each value was scored against (original scale)
        with np.errstate(invalid="ignore"):
            z = (x - median) / (MAD_SCALE * np.maximum(mad, self.mad_floor))
        with np.errstate(invalid="ignore"):
            accept = np.isfinite(x) & (~self.ready | ~(z > threshold))
        index = np.nonzero(accept)[0]
        self._values[self._accepted[index] % self.window, index] = x[index]
        self._accepted[index] += 1
        return z

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (checkpoints load with ``weights_only=True``)."""
        return {"values": torch.from_numpy(self._values.copy()), "accepted": torch.from_numpy(self._accepted.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values, accepted = np.asarray(state["values"], dtype=np.float64), np.asarray(state["accepted"], dtype=np.int64)
        if values.shape != self._values.shape:
            raise ValueError(f"saved baseline shape {values.shape} differs from this one's {self._values.shape}")
        self._values, self._accepted = values.copy(), accepted.copy()


def robust_z_series(
    values: Sequence[float] | np.ndarray,
    window: int = WINDOW,
    warmup: int = WARMUP,
    threshold: float = THRESHOLD,
    mad_floor: float = MAD_FLOOR,
) -> np.ndarray:
    """The robust z of every value of one series against its own earlier values (module rule), in order.

    The dashboard's "z against its own baseline" colouring computes exactly this (``static/baseline.js``).

    Returns:
        One z per value: NaN while the baseline holds fewer than ``warmup`` values and where the value is
        not finite.

    Example:
        >>> robust_z_series([1.0, 1.0, 1.0, 3.0, 1.0], window=4, warmup=3).round(1).tolist()
        [nan, nan, nan, 37.1, 0.0]
    """
    baseline = RobustBaseline(size=1, window=window, warmup=warmup, mad_floor=mad_floor)
    z = np.full(len(values), np.nan)
    for index, value in enumerate(np.asarray(values, dtype=np.float64)):
        ready = bool(baseline.ready[0])
        score = float(baseline.update(np.array([value]), threshold)[0])
        if ready:
            z[index] = score
    return z


def first_departures(steps: np.ndarray, z: np.ndarray, lower: float) -> tuple[np.ndarray, np.ndarray]:
    """Per series, its peak z over a recent history and the step its departure began.

    Args:
        steps: ``[h]`` steps of the history, oldest first.
        z: ``[h, n]`` robust z of every series at those steps (NaN: no value; ``+inf``: non-finite value).
        lower: the departure threshold.

    Returns:
        ``(peak, first_step)``: the largest z of each series (NaN if it never had one), and the first step of
        the unbroken run of values ``>= lower`` that holds that peak (-1 where the peak is below ``lower``).

    Example:
        >>> peak, first = first_departures(np.array([0, 1, 2, 3]), np.array([[0.0], [4.0], [5.0], [9.0]]), 3.0)
        >>> peak.tolist(), first.tolist()
        ([9.0], [1])
    """
    z = np.asarray(z, dtype=np.float64)
    h, n = z.shape
    with np.errstate(invalid="ignore"):
        peak = np.where(np.isnan(z).all(axis=0), np.nan, np.nanmax(np.where(np.isnan(z), -np.inf, z), axis=0) if h else np.nan)
        above = z >= lower
    first = np.full(n, -1, dtype=np.int64)
    for series in np.nonzero(peak >= lower)[0]:
        at = int(np.flatnonzero(z[:, series] == peak[series])[-1])
        start = at
        while start > 0 and above[start - 1, series]:
            start -= 1
        first[series] = steps[start]
    return peak, first


def lasting_spikes(z: np.ndarray, threshold: float, confirm_samples: int) -> np.ndarray:
    """Per series, whether it spiked on ``confirm_samples`` consecutive samples, or still spikes at the newest.

    Args:
        z: ``[h, n]`` robust z of every series, oldest first (NaN: no value).
        threshold: the spike threshold.
        confirm_samples: consecutive spiking samples that make a spike last.

    Example:
        >>> lasting_spikes(np.array([[9.0, 9.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]]), 6.0, 2).tolist()
        [False, True, True]
    """
    with np.errstate(invalid="ignore"):
        above = np.asarray(z, dtype=np.float64) > threshold
    if not len(above):
        return np.zeros(above.shape[1:], dtype=bool)
    run, longest = np.zeros(above.shape[1], dtype=np.int64), np.zeros(above.shape[1], dtype=np.int64)
    for row in above:
        run = np.where(row, run + 1, 0)
        longest = np.maximum(longest, run)
    return (longest >= confirm_samples) | above[-1]


def rank_departures(
    peak: np.ndarray, first_step: np.ndarray, threshold: float, lower: float, lasting: np.ndarray | None = None
) -> np.ndarray:
    """Indices of the series whose peak reached ``lower``, in the order an alert names them.

    Series whose peak passed ``threshold`` (and, given ``lasting``, whose spike lasted: see
    :func:`lasting_spikes`) come first, earliest departure first, then larger peak; then the others whose
    peak reached ``lower``, in the same order. The first is "the first to leave its baseline".

    Example:
        >>> rank_departures(np.array([7.0, 20.0, 4.0]), np.array([5, 6, 2]), 6.0, 3.0).tolist()
        [0, 1, 2]
    """
    with np.errstate(invalid="ignore"):
        candidates = np.nonzero(peak >= lower)[0]
    lasted = np.ones(len(peak), dtype=bool) if lasting is None else np.asarray(lasting, dtype=bool)
    order = sorted(candidates, key=lambda i: (not (peak[i] > threshold and lasted[i]), int(first_step[i]), -peak[i]))
    return np.asarray(order, dtype=np.int64)


def rank_nonfinite(
    nonfinite_step: np.ndarray, backward: np.ndarray, layer: np.ndarray, column: np.ndarray, layers: np.ndarray
) -> np.ndarray:
    """Indices of the cells that had a NaN/Inf value, in the order those values were computed.

    Earliest sample first; within a sample the forward pass (activations: layers first to last) before the
    backward pass (gradients: layers last to first); within a layer, columns in order. The first is where the
    NaN/Inf appeared: a NaN spreads to every later layer in the forward pass, and to every gradient below it.

    Args:
        nonfinite_step: per cell, the step of its first NaN/Inf value (-1: none).
        backward: per cell, whether its metric is measured in the backward pass.
        layer, column: per cell, its row (forward order) and column.
        layers: per cell, the number of layers of its metric.

    Example:
        >>> rank_nonfinite(np.array([5, 5, 5, -1]), np.array([True, False, False, False]), np.array([0, 2, 1, 0]),
        ...                np.array([0, 0, 3, 0]), np.array([4, 4, 4, 4])).tolist()
        [2, 1, 0]
    """
    candidates = np.flatnonzero(np.asarray(nonfinite_step) >= 0)
    order = sorted(candidates, key=lambda i: (int(nonfinite_step[i]), bool(backward[i]),
                                              int(layers[i]) - 1 - int(layer[i]) if backward[i] else int(layer[i]),
                                              int(column[i])))
    return np.asarray(order, dtype=np.int64)


# --- the monitor: every signal's baseline, the findings between checks, and the alert records ---------------


@dataclass
class _Finding:
    signal: str  # "loss", "grad_norm" or "series"
    step: int
    value: float
    baseline: float
    z: float  # NaN when the value is not finite
    series: dict[str, Any] | None = None  # metric, layer, component of a series finding

    @property
    def nonfinite(self) -> bool:
        return not math.isfinite(self.value)


@dataclass
class _SeriesGroup:
    """One metric's cells (layers x columns, the pooled column left out), their baselines and recent z."""

    metric: str
    layer_labels: tuple[str, ...]
    column_labels: tuple[str, ...]
    cells: np.ndarray  # flat indices of the monitored cells in [layers, columns]
    baseline: RobustBaseline
    backward: bool = False  # measured in the backward pass (gradients): its layers ran last to first
    history: deque = field(default_factory=deque)  # (step, z of every cell), oldest first
    run: np.ndarray | None = None  # per cell, consecutive spiking samples so far
    pending: dict[int, _Finding] = field(default_factory=dict)  # per cell, the first sample of its current run


class SpikeMonitor:
    """Robust baselines of the loss, the global gradient norm and every sampled layer series, and the alerts.

    It knows no trainer: an adapter (:class:`~lightning_heatmaps.SpikeAlert`) feeds it values with
    :meth:`observe_losses`, :meth:`observe_grad_norm` and :meth:`observe_series`, then calls :meth:`check`,
    which returns the alert record of everything found since the previous check (or ``None``).

    Args:
        threshold: robust z above which a value is a spike.
        window, warmup, mad_floor: see :class:`RobustBaseline`.
        lower_threshold: the z at which a series counts as having left its baseline (attribution).
        cooldown_steps: after an alert at step ``s``, findings of the same kind (spike, or non-finite value)
            at steps ``< s + cooldown_steps`` raise no new alert (they still stay out of the baselines).
        top_k: cells named in an alert.
        attribution_samples: samples of each series kept for attribution (its recent z).
        confirm_samples: a sampled signal (the gradient norm, a layer series) alerts only when it spikes on
            this many consecutive samples of its own; the finding is dated at the first of them. The loss
            alerts on one value, and a NaN/Inf always alerts at once.

    Raises:
        ValueError: an argument out of its range (the message names the argument, the value and the rule).

    Example:
        >>> monitor = SpikeMonitor(warmup=4)
        >>> for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.05, 9.0]):
        ...     _ = monitor.observe_losses([step], [loss])
        >>> record = monitor.check(5)
        >>> record["signal"], record["step"], round(record["z"], 1)
        ('loss', 5, 41.1)
    """

    def __init__(
        self,
        threshold: float = 6.0,
        window: int = 128,
        warmup: int = 64,
        mad_floor: float = MAD_FLOOR,
        lower_threshold: float = 3.0,
        cooldown_steps: int = 100,
        top_k: int = 5,
        attribution_samples: int = 16,
        confirm_samples: int = CONFIRM_SAMPLES,
    ) -> None:
        _check_number("threshold", threshold, 0.0, strict=True)
        _check_int("window", window, 2)
        _check_int("warmup", warmup, 1)
        if warmup > window:
            raise ValueError(f"Invalid value for warmup={warmup!r}: must be <= window={window}.")
        _check_number("lower_threshold", lower_threshold, 0.0, strict=True)
        if lower_threshold > threshold:
            raise ValueError(f"Invalid value for lower_threshold={lower_threshold!r}: must be <= threshold={threshold}.")
        _check_number("mad_floor", mad_floor, 0.0, strict=True)
        _check_int("cooldown_steps", cooldown_steps, 0)
        _check_int("top_k", top_k, 1)
        _check_int("attribution_samples", attribution_samples, 1)
        _check_int("confirm_samples", confirm_samples, 1)
        self.confirm_samples = confirm_samples
        self.threshold, self.lower_threshold = threshold, lower_threshold
        self.window, self.warmup, self.mad_floor = window, warmup, mad_floor
        self.cooldown_steps, self.top_k, self.attribution_samples = cooldown_steps, top_k, attribution_samples
        self.loss = RobustBaseline(1, window, warmup, mad_floor)
        self.grad_norm = RobustBaseline(1, window, warmup, mad_floor)
        self.groups: dict[str, _SeriesGroup] = {}
        self.cooldown_until = {"spike": -1, "nonfinite": -1}
        self._grad_norm_run: tuple[int, _Finding | None] = (0, None)  # consecutive spiking samples, the first
        self.alerts = 0
        self._findings: list[_Finding] = []
        self._pending_groups: dict[str, dict[str, Any]] = {}  # saved baselines of groups not seen yet

    # --- observations ----------------------------------------------------------------------------------

    def _observe_scalar(self, signal: str, baseline: RobustBaseline, step: int, value: float) -> float:
        ready = bool(baseline.ready[0])
        z = float(baseline.update(np.array([value]), self.threshold)[0])
        finding = _Finding(signal, step, float(value), float(baseline.last_median[0]), z)
        if not math.isfinite(value):
            self._findings.append(finding)
        elif signal == "grad_norm":  # a sampled signal: it must stay up for confirm_samples samples
            run, first = self._grad_norm_run
            spike = ready and z > self.threshold
            run, first = (run + 1, first if run else finding) if spike else (0, None)
            self._grad_norm_run = (run, first)
            if run == self.confirm_samples:
                self._findings.append(first)
        elif ready and z > self.threshold:
            self._findings.append(finding)
        return z

    def observe_losses(self, steps: Sequence[int], values: Sequence[float]) -> list[float]:
        """Score training losses in order (one per batch); returns their robust z (NaN during warm-up's start)."""
        return [self._observe_scalar("loss", self.loss, int(step), float(value)) for step, value in zip(steps, values)]

    def observe_grad_norm(self, step: int, value: float) -> float:
        """Score the global gradient norm of ``step`` (a sampled signal: see ``confirm_samples``); returns its z."""
        return self._observe_scalar("grad_norm", self.grad_norm, int(step), float(value))

    def observe_series(
        self,
        step: int,
        metrics: Mapping[str, np.ndarray],
        missing: np.ndarray,
        nonfinite: np.ndarray,
        layer_labels: Sequence[str],
        column_labels: Sequence[str],
        backward: bool = False,
    ) -> float:
        """Score one sample's tables (``[layers, columns + 1]``, the pooled last column is not scored).

        Cells in ``missing`` are skipped; cells in ``nonfinite`` are findings whatever the warm-up. A finite
        spike is a finding once the cell has spiked on ``confirm_samples`` consecutive samples (dated at the
        first). Rows are layers in forward order and columns components in the order they run; ``backward``
        says the tables were measured in the backward pass (gradients), which runs the layers last to first
        (for locating a NaN). Returns the largest z of the sample (NaN if none could be scored).
        """
        largest = np.nan
        for metric, table in metrics.items():
            group = self.groups.get(metric)
            cells = np.flatnonzero(~np.asarray(missing, dtype=bool))
            if group is None or len(group.cells) != len(cells) or (group.cells != cells).any():
                group = self._new_group(metric, cells, layer_labels, column_labels[:-1], backward)
            values = np.asarray(table, dtype=np.float64)[:, :-1].reshape(-1)[group.cells]
            bad = np.asarray(nonfinite, dtype=bool).reshape(-1)[group.cells]
            values = np.where(bad | np.isfinite(values), values, np.nan)  # a cell that did not run: no value
            ready = group.baseline.ready
            z = group.baseline.update(values, self.threshold)
            spikes = ready & (z > self.threshold) & ~bad
            group.run = np.where(spikes, group.run + 1, 0)
            history_z = np.where(bad, np.inf, z)
            group.history.append((int(step), history_z))
            while len(group.history) > self.attribution_samples:
                group.history.popleft()
            if np.isfinite(z).any():
                largest = float(np.nanmax([largest, np.nanmax(z)]))
            for index in np.flatnonzero((spikes & (group.run == 1)) | bad):
                layer, column = divmod(int(group.cells[index]), len(group.column_labels))
                finding = _Finding(
                    "series", int(step), float(values[index]), float(group.baseline.last_median[index]), float(z[index]),
                    {"metric": metric, "layer": group.layer_labels[layer], "component": group.column_labels[column]},
                )
                if bad[index]:
                    self._findings.append(finding)
                else:
                    group.pending[int(index)] = finding  # the run's first sample: reported once confirmed
            for index in np.flatnonzero(spikes & (group.run == self.confirm_samples)):
                self._findings.append(group.pending.pop(int(index)))
        return largest

    def _new_group(self, metric: str, cells: np.ndarray, layer_labels: Sequence[str], column_labels: Sequence[str],
                   backward: bool) -> _SeriesGroup:
        group = _SeriesGroup(metric, tuple(layer_labels), tuple(column_labels), cells,
                             RobustBaseline(len(cells), self.window, self.warmup, self.mad_floor), backward,
                             run=np.zeros(len(cells), dtype=np.int64))
        saved = self._pending_groups.pop(metric, None)
        if saved is not None and np.array_equal(np.asarray(saved["cells"]), cells):
            group.baseline.load_state_dict(saved["baseline"])
            if "run" in saved:
                group.run = np.asarray(saved["run"], dtype=np.int64).copy()
                for index, step, value, median, z in np.asarray(saved["pending"], dtype=np.float64).reshape(-1, 5):
                    layer, column = divmod(int(cells[int(index)]), len(column_labels))
                    group.pending[int(index)] = _Finding("series", int(step), value, median, z, {
                        "metric": metric, "layer": group.layer_labels[layer], "component": group.column_labels[column]})
            steps, z = np.asarray(saved["history_steps"]), np.asarray(saved["history_z"], dtype=np.float64)
            group.history.extend((int(step), row) for step, row in zip(steps, z))
        self.groups[metric] = group
        return group

    # --- decisions ---------------------------------------------------------------------------------------

    def check(self, step: int) -> dict[str, Any] | None:
        """The alert record of what was found since the previous check (``None`` if nothing, or in cool-down).

        ``step`` is the step of the check (the newest value observed). The record is one ``alerts.jsonl`` object.
        """
        findings, self._findings = self._findings, []
        findings = [f for f in findings if f.step >= self.cooldown_until["nonfinite" if f.nonfinite else "spike"]]
        if not findings:
            return None
        priority = {"loss": 0, "grad_norm": 1, "series": 2}
        primary = min(findings, key=lambda f: (not f.nonfinite, priority[f.signal], -(f.z if math.isfinite(f.z) else math.inf), f.step))
        for kind in {"nonfinite" if f.nonfinite else "spike" for f in findings}:
            self.cooldown_until[kind] = max(self.cooldown_until[kind], primary.step + self.cooldown_steps)
        self.alerts += 1
        layers = self.attribution(step)
        first_step = layers[0]["first_step"] if layers else None
        return {
            "step": primary.step,
            "signal": primary.signal,
            "value": _json_number(primary.value),
            "baseline": _json_number(primary.baseline),
            "z": _json_number(primary.z),
            "nonfinite": primary.nonfinite,
            "series": primary.series,
            "layers": layers,
            "lag_steps": None if first_step is None else primary.step - first_step,
            "signals": sorted({f.signal if f.series is None else f.series["metric"] for f in findings}),
            "checked_at": int(step),
            "threshold": self.threshold,
        }

    def attribution(self, step: int) -> list[dict[str, Any]]:
        """The cells that left their baselines up to ``step``, ranked, ``top_k`` of them.

        Cells with a NaN/Inf value come first, in the order the values were computed: earliest sample first,
        then forward-pass metrics before backward-pass ones, then the layer (first to last in the forward pass,
        last to first in the backward pass) and the column (see :func:`rank_nonfinite`). The others follow in
        :func:`rank_departures`'s order, where a spike counts as passing ``threshold`` only if it lasted
        ``confirm_samples`` samples or still goes on (:func:`lasting_spikes`): a transient excursion that has
        ended is not where a lasting change started.
        """
        entries: list[tuple[_SeriesGroup, int]] = []
        peaks, firsts, nonfinite_steps, lasting = [], [], [], []
        for group in self.groups.values():
            history = [(s, z) for s, z in group.history if s <= step]
            if not history:
                continue
            steps, z = np.array([s for s, _ in history]), np.stack([z for _, z in history])
            peak, first = first_departures(steps, z, self.lower_threshold)
            infinite = np.isposinf(z)
            lasting.append(lasting_spikes(z, self.threshold, self.confirm_samples))
            entries += [(group, index) for index in range(len(group.cells))]
            peaks.append(peak)
            firsts.append(first)
            nonfinite_steps.append(np.where(infinite.any(axis=0), steps[np.argmax(infinite, axis=0)], -1))
        if not entries:
            return []
        peak, first, nonfinite_step = np.concatenate(peaks), np.concatenate(firsts), np.concatenate(nonfinite_steps)
        positions = np.array([[group.backward, *divmod(int(group.cells[cell]), len(group.column_labels)),
                               len(group.layer_labels)] for group, cell in entries], dtype=np.int64)
        nonfinite = rank_nonfinite(nonfinite_step, positions[:, 0].astype(bool), positions[:, 1], positions[:, 2],
                                   positions[:, 3])
        finite_peak = np.where(nonfinite_step >= 0, np.nan, peak)
        order = [*nonfinite, *rank_departures(finite_peak, first, self.threshold, self.lower_threshold,
                                              np.concatenate(lasting))]
        ranked = []
        for index in order[: self.top_k]:
            group, cell = entries[index]
            layer, column = divmod(int(group.cells[cell]), len(group.column_labels))
            bad = bool(nonfinite_step[index] >= 0)
            ranked.append({"layer": group.layer_labels[layer], "component": group.column_labels[column],
                           "metric": group.metric, "z": _json_number(peak[index]),
                           "first_step": int(nonfinite_step[index] if bad else first[index]), "nonfinite": bad})
        return ranked

    # --- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Baselines, the recent z of every series (attribution), cool-downs and the alert count (tensors and plain types)."""
        groups = {
            metric: {
                "cells": torch.from_numpy(group.cells.copy()),
                "baseline": group.baseline.state_dict(),
                "history_steps": torch.tensor([step for step, _ in group.history], dtype=torch.int64),
                "history_z": torch.from_numpy(np.stack([z for _, z in group.history]) if group.history
                                              else np.zeros((0, len(group.cells)))),
                "run": torch.from_numpy(group.run.copy()),
                "pending": torch.tensor([[index, f.step, f.value, f.baseline, f.z] for index, f in group.pending.items()],
                                        dtype=torch.float64).reshape(-1, 5),
            }
            for metric, group in self.groups.items()
        }
        groups.update({metric: saved for metric, saved in self._pending_groups.items() if metric not in groups})
        run, first = self._grad_norm_run
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad_norm.state_dict(), "groups": groups,
                "cooldown_until": dict(self.cooldown_until), "alerts": self.alerts, "grad_norm_run": run,
                "grad_norm_first": [] if first is None else [first.step, first.value, first.baseline, first.z]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a series' baseline comes back when its first sample shows the same cells."""
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])
        self.cooldown_until = {kind: int(value) for kind, value in state["cooldown_until"].items()}
        self.alerts = int(state["alerts"])
        first = state.get("grad_norm_first") or None
        self._grad_norm_run = (int(state.get("grad_norm_run", 0)),
                               None if first is None else _Finding("grad_norm", int(first[0]), *map(float, first[1:])))
        self.groups = {}
        self._pending_groups = dict(state["groups"])


def _json_number(value: float) -> float | None:
    """A finite float, or ``None``: JSON has no NaN, and a wrong number is never written as a plausible one."""
    value = float(value)
    return value if math.isfinite(value) else None
