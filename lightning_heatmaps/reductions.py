"""The maths: pure functions from tensors to poolable statistics, and from statistics to metrics.

Every metric is a ratio of pooled sums (or a max), so values pool *exactly* over micro-batches,
over the components of a layer (the ``all`` column), and over ranks: a layer's ``all`` RMS is
``sqrt(sum of squares / element count)`` over all its components, never an average of averages.

Device side (no host reads): :func:`activation_partials` and :func:`squared_norms` produce 0-d / 1-d
tensors on the input's device. Host side: :func:`metric_table` turns the per-slot statistics
(numpy arrays, one entry per monitored component) into a ``layers x (components + all)`` matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ALL_COMPONENTS = "all"


@dataclass(frozen=True)
class MetricDefinition:
    """A metric as ``numerator / denominator``, optionally square-rooted, pooled by sum (or max).

    ``denominator`` names another statistic, ``"count"`` (elements), or is ``None``.

    Example:
        >>> ACTIVATION_METRICS["rms"].name
        'activation_rms'
    """

    name: str
    numerator: str
    denominator: str | None
    root: bool
    pool: str = "sum"

    @property
    def statistics(self) -> tuple[str, ...]:
        """Statistics this metric needs (excluding ``count``, which the host knows from shapes)."""
        needed = [self.numerator] + ([self.denominator] if self.denominator not in (None, "count") else [])
        return tuple("nonzero" if s == "zeros" else s for s in needed)


#: Activation metrics by the short name users pass (``ActivationHeatmap(metrics=...)``).
ACTIVATION_METRICS: dict[str, MetricDefinition] = {
    "rms": MetricDefinition("activation_rms", "sumsq", "count", root=True),
    "l2": MetricDefinition("activation_l2", "sumsq", None, root=True),
    "mean_abs": MetricDefinition("activation_mean_abs", "sumabs", "count", root=False),
    "max_abs": MetricDefinition("activation_max_abs", "maxabs", None, root=False, pool="max"),
    "zero_fraction": MetricDefinition("activation_zero_fraction", "zeros", "count", root=False),
}

#: Gradient and weight metrics by name (``GradientHeatmap(metrics=...)``).
GRADIENT_METRICS: dict[str, MetricDefinition] = {
    "grad_norm": MetricDefinition("grad_norm", "grad_sumsq", None, root=True),
    "grad_rms": MetricDefinition("grad_rms", "grad_sumsq", "count", root=True),
    "grad_to_weight": MetricDefinition("grad_to_weight", "grad_sumsq", "weight_sumsq", root=True),
    "update_ratio": MetricDefinition("update_ratio", "update_sumsq", "weight_sumsq", root=True),
    "weight_drift": MetricDefinition("weight_drift", "drift_sumsq", "initial_sumsq", root=True),
}

#: Mixture-of-experts metrics by name (``ExpertHeatmap(metrics=...)``), per layer x expert.
EXPERT_METRICS: dict[str, MetricDefinition] = {
    "token_share": MetricDefinition("expert_token_share", "routed", "tokens", root=False),
    "grad_norm": MetricDefinition("expert_grad_norm", "grad_sumsq", None, root=True),
}

#: Attention metrics by name (``AttentionHeatmap(metrics=...)``), per layer x head. ``entropy_sum`` is divided by
#: the query rows counted; ``max_logit`` pools by max (over micro-batches, heads and ranks).
ATTENTION_METRICS: dict[str, MetricDefinition] = {
    "max_logit": MetricDefinition("attention_max_logit", "max_logit", None, root=False, pool="max"),
    "entropy": MetricDefinition("attention_entropy", "entropy_sum", "count", root=False),
}

#: How per-call partial values of each activation statistic combine into the statistic.
_PARTIAL_ORDER = {"sumsq": 2, "sumabs": 1, "maxabs": float("inf")}


def activation_partials(x: Tensor, statistics: Sequence[str]) -> list[Tensor]:
    """One 0-d tensor per statistic for one activation tensor, on its device (no host read).

    ``sumsq`` and ``sumabs`` return the L2 and L1 norms (squared/summed by :func:`pool_partials`),
    ``maxabs`` the max-abs, ``nonzero`` the count of non-zero elements. All computed in fp32.

    Example:
        >>> [float(v) for v in activation_partials(torch.tensor([3.0, -4.0, 0.0]), ["sumsq", "maxabs", "nonzero"])]
        [5.0, 4.0, 2.0]
    """
    partials = []
    for statistic in statistics:
        if statistic == "nonzero":
            partials.append(torch.count_nonzero(x))
        else:
            partials.append(torch.linalg.vector_norm(x, ord=_PARTIAL_ORDER[statistic], dtype=torch.float32))
    return partials


def pool_partials(partials: Tensor, statistic: str) -> Tensor:
    """Combine partials laid out as ``(slots, calls)`` into one statistic per slot.

    Example:
        >>> pool_partials(torch.tensor([[3.0, 4.0]]), "sumsq")  # two micro-batches with norms 3 and 4
        tensor([25.])
    """
    partials = partials.to(torch.float32)
    if statistic == "sumsq":
        return partials.square().sum(dim=1)
    if statistic == "maxabs":
        return partials.amax(dim=1)
    return partials.sum(dim=1)


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norms of many tensors with one grouped kernel, in fp32, on their device.

    Example:
        >>> [round(v, 4) for v in squared_norms([torch.ones(4), torch.full((2,), 3.0)]).tolist()]
        [4.0, 18.0]
    """
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32)).square()


def metric_table(
    definition: MetricDefinition,
    statistics: Mapping[str, np.ndarray],
    slot_layer: np.ndarray,
    slot_component: np.ndarray,
    num_layers: int,
    num_components: int,
) -> np.ndarray:
    """The ``(num_layers, num_components + 1)`` matrix of a metric; the last column pools each layer.

    Args:
        definition: the metric.
        statistics: per-slot arrays (one entry per monitored component) of the statistics the metric
            needs, plus ``count`` (elements); ``zeros`` may be given as ``nonzero``.
        slot_layer: layer index of each slot.
        slot_component: component (column) index of each slot.
        num_layers: rows of the result.
        num_components: component columns of the result (``all`` is added after them).

    Returns:
        float64 matrix; cells with no component, or whose denominator is zero (e.g. a module that
        did not run), are NaN.

    Example:
        >>> stats = {"sumsq": np.array([4.0, 12.0]), "count": np.array([1, 3])}
        >>> metric_table(ACTIVATION_METRICS["rms"], stats, np.array([0, 0]), np.array([0, 1]), 1, 2)
        array([[2., 2., 2.]])
    """
    stats = dict(statistics)
    count = np.asarray(stats["count"], dtype=np.float64)
    if "zeros" not in stats and "nonzero" in stats:
        stats["zeros"] = count - np.asarray(stats["nonzero"], dtype=np.float64)
    stats["count"] = count
    shape = (num_layers, num_components + 1)
    fill = -np.inf if definition.pool == "max" else 0.0

    def scatter(name: str) -> np.ndarray:
        cells = np.full(shape, fill)
        values = np.asarray(stats[name], dtype=np.float64)
        cells[slot_layer, slot_component] = values
        column = cells[:, :num_components]
        if definition.pool == "max":
            # NaN must survive pooling (np.max propagates it); empty layers stay -inf -> NaN below.
            cells[:, -1] = np.max(column, axis=1)
        else:
            cells[:, -1] = column.sum(axis=1)
        return cells

    present = np.zeros(shape, dtype=bool)
    present[slot_layer, slot_component] = True
    present[:, -1] = present[:, :num_components].any(axis=1)
    ran = scatter("count") > 0
    numerator = scatter(definition.numerator)
    if definition.denominator is None:
        table = numerator.copy()
    else:
        denominator = scatter(definition.denominator)
        with np.errstate(divide="ignore", invalid="ignore"):
            table = numerator / denominator
        table[denominator == 0] = np.nan
    if definition.root:
        with np.errstate(invalid="ignore"):
            table = np.sqrt(table)
    table[~present | ~ran] = np.nan
    return table
