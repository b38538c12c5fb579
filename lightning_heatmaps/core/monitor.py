"""The core every heatmap shares, whatever trainer drives it: the schedule, the host pipeline, the outputs.

:class:`HeatmapMonitor` knows no trainer. An adapter (the Lightning callbacks, :mod:`lightning_heatmaps.hf`,
:mod:`lightning_heatmaps.fabric`, :mod:`lightning_heatmaps.loop`) translates its framework's hooks into the
monitor's explicit events, in this order::

    attach(model, context)                 # once, when the (wrapped/sharded) model is final
    begin_training()                       # after any checkpoint restore
    for each optimizer step:
        for each micro-batch:
            begin_micro_batch(step)        # step: optimizer steps taken so far (Lightning's global_step)
            ... forward ...
            before_backward()
            ... backward ...
            end_micro_batch(step_after)    # step_after: the count after this micro-batch
        before_optimizer_step(...)         # gradients accumulated and unscaled, not yet clipped
        ... optimizer.step() ...
    end_training()
    close()                                # or abort() on an exception

Data flows one way. On a sampled step a subclass fills a device-side statistics tensor
(``(statistics, slots)``); :meth:`HeatmapMonitor._finish_sample` copies it to the host with one
non-blocking copy; once the copy has landed (checked without blocking on later steps) the numbers
become metric matrices (:func:`~lightning_heatmaps.reductions.metric_table`), enter the ring buffers,
and go to the background writer, which logs scalars and renders images through the sinks.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from lightning_heatmaps._ranks import rank_zero_warn
from lightning_heatmaps.core.context import RunContext
from lightning_heatmaps.distributed import append_payload, check_tensor_placement, split_payload
from lightning_heatmaps.layers import LayerMap, ModuleSelection, layer_tags, resolve_layers, selection_key
from lightning_heatmaps.reductions import ALL_COMPONENTS, MetricDefinition, metric_table
from lightning_heatmaps.render import metric_images
from lightning_heatmaps.ring_buffer import POLICIES, RingBuffer
from lightning_heatmaps.sinks import RunOutputs, check_output_name
from lightning_heatmaps_tensorboard.metadata import matrix_content, matrix_tag


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid value for {name}={value!r}: must be an integer >= {minimum}.")


# --- public sample observation (issue 18) ----------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One sample of a heatmap monitor, as its listeners see it (see :meth:`HeatmapMonitor.add_sample_listener`).

    Attributes:
        step: the optimizer step the sample was taken at (``trainer.global_step`` when it started).
        callback: the callback's class name (``ActivationHeatmap``, ``GradientHeatmap``, ...).
        name: the instance's ``name`` (``None`` when unnamed).
        metrics: full metric name (``activation_rms``, ``<name>/grad_norm``) -> ``[layers, columns + 1]``
            float64 table; the last column pools each layer (``all``). NaN where a cell has no value.
        layer_labels: one label per row.
        column_labels: one label per column, the pooled ``all`` last.
        column_axis: what a column is: ``component``, ``expert`` or ``head``.
        missing: ``[layers, columns]`` bool (pooled column excluded): cells not monitored (no such component,
            frozen, not observable). Their values are NaN and mean nothing.
        nonfinite: ``[layers, columns]`` bool: cells that ran but whose value is NaN or infinite.

    Example:
        >>> sample = Sample(step=0, callback="ActivationHeatmap", name=None, metrics={"activation_rms": np.ones((1, 2))},
        ...                 layer_labels=["0"], column_labels=["mlp", "all"], column_axis="component",
        ...                 missing=np.zeros((1, 1), bool), nonfinite=np.zeros((1, 1), bool))
        >>> float(sample.metrics["activation_rms"][0, -1])
        1.0
    """

    step: int
    callback: str
    name: str | None
    metrics: dict[str, np.ndarray]
    layer_labels: tuple[str, ...]
    column_labels: tuple[str, ...]
    column_axis: str
    missing: np.ndarray
    nonfinite: np.ndarray


SampleListener = Callable[[Sample], None]


class CollectiveContributor(Protocol):
    """Values that ride along in a sample's one collective (see :meth:`HeatmapMonitor.add_collective_contributor`)."""

    def collective_values(self, step: int) -> torch.Tensor | None:
        """This rank's values to sum over ranks at the sample of ``step`` (1-D), or ``None`` (nothing this time)."""

    def collective_result(self, step: int, summed: torch.Tensor) -> None:
        """The values of :meth:`collective_values` summed over ranks (every rank gets the same)."""


@dataclass
class _PendingSample:
    step: int
    statistics: torch.Tensor  # (statistics, slots) on the host, possibly still being copied
    counts: np.ndarray | None  # None: the counts are the last row of ``statistics``
    copied: Any  # a CUDA event, or None when the copy is already complete


class HeatmapMonitor:
    """Base class of the layer heatmap monitors: schedule, ring buffers, outputs, the sample API. No trainer.

    Subclasses (:class:`~lightning_heatmaps.core.ActivationMonitor`, ...) measure; adapters drive the events
    listed in this module's docstring. The subclass interface: :meth:`_resolve`, :meth:`_attach`, :meth:`_detach`,
    :meth:`_describe`, :meth:`_begin_sample`, :meth:`_begin_micro_batch`, :meth:`_end_micro_batch`,
    :meth:`_read_gradients`, :meth:`_collect`, :meth:`_begin_training`.
    """

    METRICS: ClassVar[dict[str, MetricDefinition]] = {}
    STATISTICS: ClassVar[tuple[str, ...]] = ()
    #: What a column is (``component``, ``expert``): the axis name of the dashboard's matrices.
    COLUMN_AXIS: ClassVar[str] = "component"
    #: Name of the latest sample's layer x column image and array (``layer_x_head`` for attention heads).
    LATEST_IMAGE: ClassVar[str] = "layer_x_component"
    #: Log one scalar per layer (the pooled column) instead of one per cell: a fixed number of tags when
    #: the columns are many (attention heads).
    POOLED_SCALARS_ONLY: ClassVar[bool] = False

    def __init__(
        self,
        metrics: str | Sequence[str],
        every_n_steps: int | None = None,
        capacity: int = 256,
        history: str = "recent",
        render_every_n_samples: int = 10,
        min_render_interval_seconds: float = 60.0,
        modules: ModuleSelection | None = None,
        first_layer_index: int = 0,
        cmap: str = "viridis",
        log_scale: bool = False,
        color_limits: tuple[float, float] | None = None,
        per_component_images: bool = False,
        name: str | None = None,
    ) -> None:
        check_output_name(name)
        names = [metrics] if isinstance(metrics, str) else list(metrics) if isinstance(metrics, Sequence) else None
        if not names or any(name not in self.METRICS for name in names) or len(set(names)) != len(names):
            raise ValueError(
                f"Invalid value for metrics={metrics!r}: must be one or more distinct names from {sorted(self.METRICS)}."
            )
        _check_int("every_n_steps", every_n_steps, 1, allow_none=True)
        _check_int("capacity", capacity, 2)
        if history not in POLICIES:
            raise ValueError(f"Invalid value for history={history!r}: must be one of {POLICIES}.")
        _check_int("render_every_n_samples", render_every_n_samples, 1)
        if not isinstance(min_render_interval_seconds, (int, float)) or not min_render_interval_seconds >= 0:
            raise ValueError(
                f"Invalid value for min_render_interval_seconds={min_render_interval_seconds!r}: must be a number >= 0."
            )
        if modules is not None and not callable(modules):
            if not isinstance(modules, dict) or not modules:
                raise TypeError(
                    f"Invalid value for modules={modules!r}: must be None, a non-empty dict of "
                    "{regex: component name}, or a callable (name, module) -> (layer, component) | None."
                )
            for pattern, component in modules.items():
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as error:
                    raise ValueError(f"Invalid value for modules: pattern {pattern!r} is not a regex ({error}).") from None
                if not isinstance(component, str) or not component:
                    raise TypeError(f"Invalid value for modules[{pattern!r}]={component!r}: must be a component name.")
        if first_layer_index not in (0, 1) or isinstance(first_layer_index, bool):
            raise ValueError(f"Invalid value for first_layer_index={first_layer_index!r}: must be 0 or 1.")
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise ValueError(f"Invalid value for cmap={cmap!r}: must be a matplotlib colour map name, e.g. 'viridis'.")
        if color_limits is not None:
            limits = tuple(color_limits)
            if len(limits) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in limits) or not limits[0] < limits[1]:
                raise ValueError(f"Invalid value for color_limits={color_limits!r}: must be (vmin, vmax) with vmin < vmax.")
            if log_scale and limits[0] <= 0:
                raise ValueError(f"Invalid value for color_limits={color_limits!r}: a log colour scale needs vmin > 0.")
            color_limits = (float(limits[0]), float(limits[1]))

        self.metrics = names
        self.every_n_steps = every_n_steps
        self.capacity = capacity
        self.history = history
        self.render_every_n_samples = render_every_n_samples
        self.min_render_interval_seconds = float(min_render_interval_seconds)
        self.modules = modules
        self.first_layer_index = first_layer_index
        self.style = {"cmap": cmap, "log_scale": bool(log_scale), "color_limits": color_limits}
        self.per_component_images = per_component_images
        self.name = name

        self.layer_map: LayerMap | None = None
        # With a name, this instance's outputs live under it (`<name>/grad_norm/...`), apart from another's.
        self._definitions = [
            self.METRICS[metric] if name is None else replace(self.METRICS[metric], name=f"{name}/{self.METRICS[metric].name}")
            for metric in names
        ]
        self._statistics = tuple(s for s in self.STATISTICS if any(s in d.statistics for d in self._definitions))
        self._buffers: dict[str, RingBuffer] = {}
        self._loaded_state: dict[str, Any] | None = None
        self._outputs: RunOutputs | None = None
        self._pending: list[_PendingSample] = []
        self._sample_step: int | None = None
        self._last_sampled_step: int | None = None
        self._samples_since_render = 0
        self._last_render_time = -math.inf
        self._warned_nonfinite: set[str] = set()
        self._active = False
        self._collecting = False  # inside a sampled micro-batch's forward, before its backward
        self._listeners: list[SampleListener] = []
        self._contributors: list[CollectiveContributor] = []
        self._context: RunContext | None = None
        self._dense_request = 0  # steps of dense capture asked for, starting at the next optimizer step
        self._dense_until = -1  # steps < this are sampled whatever every_n_steps says
        #: Samples recorded, and CPU seconds the background writer spent on them (scalars, images, files).
        self.samples_recorded = 0
        self.background_cpu_seconds = 0.0

    # --- identity and state -----------------------------------------------------------------

    @property
    def state_key_fields(self) -> dict[str, Any]:
        """The configuration that identifies this instance's state in a checkpoint (adapters build keys from it)."""
        return {"metrics": self.metrics, "every_n_steps": self.every_n_steps,
                "modules": selection_key(self.modules), "name": self.name}

    @property
    def output_names(self) -> list[str]:
        """The names this instance's tags and files live under (no other callback may share one)."""
        return self.metric_names

    @property
    def metric_names(self) -> list[str]:
        """Full metric names, as used in tags (``activation_rms``, ``grad_norm``, ...)."""
        return [definition.name for definition in self._definitions]

    # --- public sample observation (issue 18) ------------------------------------------------------

    def add_sample_listener(self, listener: SampleListener) -> None:
        """Call ``listener(sample)`` with every :class:`Sample`, on the training thread, at the step it was taken.

        Register before ``fit`` starts (e.g. in a callback's ``setup``). With a listener, samples are
        delivered in the ``on_train_batch_end`` of the sampled step: on CUDA this waits for the sample's
        device-to-host copy (a host sync on sampled steps only; without listeners it is polled). Under DDP
        and FSDP2 the listener is called on every rank with the same, global values: activation statistics
        are pooled over ranks by the sample's collective, DDP gradients (replicated) are read on every rank
        (without a listener only rank zero reads them), sharded gradients are summed over ranks.

        Example:
            >>> callback = ActivationHeatmap()  # doctest: +SKIP
            >>> callback.add_sample_listener(lambda sample: print(sample.step))  # doctest: +SKIP
        """
        if not callable(listener):
            raise TypeError(f"Invalid value for listener={listener!r}: must be callable with one Sample.")
        self._listeners.append(listener)

    def remove_sample_listener(self, listener: SampleListener) -> None:
        """Stop calling ``listener`` (no error if it was not registered)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_collective_contributor(self, contributor: CollectiveContributor) -> None:
        """Let ``contributor`` add values to this monitor's per-sample collective, when the sample has one.

        Under DDP/FSDP2 a sample whose numbers are pooled over ranks (activations; sharded gradients) runs one
        collective. At each such sample, ``contributor.collective_values(step)`` is asked for a 1-D tensor;
        its values are appended to the tensor already being reduced, summed over ranks, and handed back with
        ``contributor.collective_result(step, summed)`` before the sample is delivered. No extra collective.
        Samples without a collective (one process; replicated DDP gradients) do not call it. Every rank must
        register the same contributors and return values of the same length.

        Example:
            >>> callback = ActivationHeatmap()  # doctest: +SKIP
            >>> callback.add_collective_contributor(spike_alert)  # doctest: +SKIP
        """
        self._contributors.append(contributor)

    def remove_collective_contributor(self, contributor: CollectiveContributor) -> None:
        """Stop asking ``contributor`` (no error if it was not registered)."""
        if contributor in self._contributors:
            self._contributors.remove(contributor)

    def _with_contributions(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[tuple[CollectiveContributor, int]]]:
        """``rows`` with every contributor's values appended (the subclass then runs its one collective)."""
        taken = []
        for contributor in self._contributors:
            values = contributor.collective_values(self._last_sampled_step)
            if values is not None and values.numel():
                taken.append((contributor, values.numel()))
                rows = append_payload(rows, values)
        return rows, taken

    def _take_contributions(self, pooled: torch.Tensor, rows: int, taken: list[tuple[CollectiveContributor, int]]) -> torch.Tensor:
        """Hands each contributor its summed values back; returns the sample's own ``rows`` rows."""
        row = rows
        for contributor, length in taken:
            values, row = split_payload(pooled, row, length)
            contributor.collective_result(self._last_sampled_step, values)
        return pooled[:rows]

    def sample_history(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``(steps, values)`` of ``metric`` (a full name of :attr:`metric_names`), oldest first.

        ``values`` is ``[samples, layers, columns + 1]`` (the ring buffer's content, see ``capacity`` and
        ``history``). Empty before the first sample. Filled on rank zero, and on every rank with listeners.
        """
        if metric not in self.metric_names:
            raise ValueError(f"Invalid value for metric={metric!r}: must be one of {self.metric_names}.")
        buffer = self._buffers.get(metric)
        if buffer is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0, 0))
        return buffer.ordered()

    def sample_every_step(self, for_steps: int) -> None:
        """Sample every optimizer step for the next ``for_steps`` steps, then return to ``every_n_steps``.

        The steps counted start at the next optimizer step. A request that ends earlier than one under way
        does not shorten it. Under DDP/FSDP2 every rank must call this identically, at the same step (samples
        run collectives).
        """
        _check_int("for_steps", for_steps, 1)
        self._dense_request = max(self._dense_request, for_steps)

    def samples_step(self, step: int) -> bool:
        """Whether the optimizer step ``step`` is (or would be) sampled by the schedule, dense capture included."""
        every = self.every_n_steps or 1
        return step % every == 0 or step < self._dense_until

    def _deliver(self, sample: Sample) -> None:
        for listener in list(self._listeners):
            listener(sample)

    # --- end of public sample observation -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The history and schedule state to checkpoint (pending samples are ingested first)."""
        self._drain(block=True)
        return {
            "buffers": {name: buffer.state_dict() for name, buffer in self._buffers.items()},
            "last_sampled_step": self._last_sampled_step,
            "dense_until": self._dense_until,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (applied at :meth:`attach` if called before it)."""
        self._loaded_state = state_dict
        if self._buffers:
            self._apply_loaded_state()

    def _apply_loaded_state(self) -> None:
        state, self._loaded_state = self._loaded_state, None
        if not state:
            return
        for name, saved in state.get("buffers", {}).items():
            if name not in self._buffers:
                continue
            try:
                self._buffers[name].load_state_dict(saved)
            except ValueError as error:
                rank_zero_warn(f"{type(self).__name__}: not restoring the {name} history: {error}")
        self._last_sampled_step = state.get("last_sampled_step")
        self._dense_until = int(state.get("dense_until", -1))

    # --- events (called by an adapter) -----------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the monitor is attached (between :meth:`attach` and :meth:`close`)."""
        return self._active

    def attach(self, model: nn.Module, context: RunContext) -> None:
        """Resolve what to monitor in ``model`` (final: wrapped and sharded), open the outputs, register hooks.

        Call on every rank, once the model's parameters are final (after DDP wrapping or sharding).
        """
        if self.every_n_steps is None:
            self.every_n_steps = context.default_every_n_steps
        self._context = context
        layer_map = self._resolve(model)
        self.layer_map = layer_map
        self._slot_layer = np.array([c.layer for c in layer_map.components])
        self._slot_component = np.array([layer_map.component_names.index(c.name) for c in layer_map.components])
        self._missing = np.ones((layer_map.num_layers, len(layer_map.component_names)), dtype=bool)
        self._missing[self._slot_layer, self._slot_component] = False
        self._frozen = np.zeros_like(self._missing)  # missing because no parameter of it trains
        shape = (layer_map.num_layers, len(layer_map.component_names) + 1)
        self._buffers = {d.name: RingBuffer(self.capacity, shape, self.history) for d in self._definitions}
        if self._loaded_state is not None:
            self._apply_loaded_state()
        self._layer_tags = layer_tags(layer_map.num_layers, self.first_layer_index, layer_map.layer_labels)

        self._outputs = context.open_outputs(type(self).__name__)
        if self._outputs.active:
            layout = {
                f"heatmaps/{name}": {
                    component: [rf"^{re.escape(name)}/layer_\d+/{re.escape(component)}$"]
                    for component in [*([] if self.POOLED_SCALARS_ONLY else layer_map.component_names), ALL_COMPONENTS]
                }
                for name in self.metric_names
            }
            self._outputs.add_chart_layout(layout)
        check_tensor_placement([ref for component in layer_map.components for ref in component.params], type(self).__name__)
        self._attach(model, layer_map)
        self._matrix_contents = self._dashboard_contents(layer_map) if self._outputs.active else {}
        context.info(f"{type(self).__name__} ({', '.join(self.metric_names)}) monitors {layer_map.describe()}{self._describe()}")
        self._active = True

    def begin_training(self) -> None:
        """Training starts, after any checkpoint restore (e.g. ``weight_drift`` takes its reference weights)."""
        if self._active:
            self._begin_training()

    def begin_micro_batch(self, step: int) -> None:
        """A training micro-batch starts; ``step`` is the number of optimizer steps taken so far.

        Arms a sample when the schedule says ``step`` is sampled (the first micro-batch of that step), and
        finishes a sample whose optimizer step is over.
        """
        if self._sample_step is not None and step != self._sample_step:
            self._finish_sample()
        if self._dense_request and step != self._last_sampled_step:
            # Dense capture asked for during the previous step (e.g. by SpikeAlert): this step and the next ones.
            self._dense_until, self._dense_request = max(self._dense_until, step + self._dense_request), 0
        if self._active and self._sample_step is None and self.samples_step(step) and step != self._last_sampled_step:
            self._sample_step = step
            self._begin_sample()
        if self._sample_step is not None:
            self._begin_micro_batch()

    def before_backward(self) -> None:
        """The micro-batch's loss is about to be backpropagated: forwards from now on (activation
        checkpointing re-running them during backward) must not count twice."""
        self._collecting = False

    def end_micro_batch(self, step: int) -> None:
        """A micro-batch ended; ``step`` is the number of optimizer steps taken now (one more than at
        :meth:`begin_micro_batch` when this micro-batch ended with an optimizer step): finishes the sample then.
        Also ingests samples whose copy has landed and delivers images to training-thread loggers."""
        if self._sample_step is not None:
            self._end_micro_batch()
            if step != self._sample_step:  # the sampled optimizer step has happened
                self._finish_sample()
        if self._pending:
            self._drain(block=False)
        if self._outputs is not None:
            self._outputs.deliver()  # images drawn off-thread for loggers that are called on this thread

    def before_optimizer_step(self, loss_scale: torch.Tensor | float | None = None) -> None:
        """Gradients are accumulated and unscaled, the optimizer has not stepped (and nothing clipped them).

        ``loss_scale``: when the gradients still carry an AMP loss scale (optimizers that unscale inside
        ``step()``), the scale to divide out; ``None`` when they are unscaled. Reads gradients on a sampled step.
        """
        if self._sample_step is None or not self._active:
            return
        self._read_gradients(loss_scale)

    def skip_sample(self) -> None:
        """The sampled optimizer step did not happen (e.g. the AMP scaler skipped it): drop what was measured.

        The step is not recorded; the schedule goes on (the next micro-batch at a sampled step samples again)."""
        if self._sample_step is not None:
            self._sample_step = None
            self._collecting = False
            self._begin_sample()  # clears what was gathered

    def end_training(self) -> None:
        """Training ended normally: finish the last sample, write everything, draw the final images."""
        if self._sample_step is not None:
            self._finish_sample()
        self._drain(block=True)
        self._submit_render(force=True)
        if self._outputs is not None:
            self._outputs.flush()

    def close(self) -> None:
        """Remove hooks and close the outputs (idempotent). Call on every rank."""
        if not self._active:
            return
        self._active = False
        self._detach()
        self._sample_step = None
        if self._outputs is not None:
            self._outputs.close()
            if self._outputs.writer is not None:
                self.background_cpu_seconds += self._outputs.writer.cpu_seconds
            self._outputs = None

    def abort(self) -> None:
        """Training stops on an exception: keep what was recorded (pending samples are written), then close."""
        if self._active:
            try:
                self._drain(block=True)
                self._submit_render(force=True)
            finally:
                self.close()

    def _dashboard_contents(self, layer_map: LayerMap) -> dict[str, tuple[str, bytes]]:
        """Each metric's dashboard tag and the JSON content its matrices carry (labels, missing cells)."""
        columns = [*layer_map.component_names, ALL_COMPONENTS]
        missing = [
            (int(layer), int(column), "frozen" if self._frozen[layer, column] else "not monitored")
            for layer, column in zip(*np.nonzero(self._missing))
        ]
        return {
            definition.name: (matrix_tag(definition.name), matrix_content(
                callback=type(self).__name__, metric=definition.name, kind=f"layer_x_{self.COLUMN_AXIS}",
                row_labels=layer_map.layer_labels, column_labels=columns, column_axis=self.COLUMN_AXIS,
                log_scale=self.style["log_scale"], color_limits=self.style["color_limits"], pooled_column=True,
                missing=missing, every_n_steps=self.every_n_steps,
            ))
            for definition in self._definitions
        }

    # --- subclass interface ------------------------------------------------------------------

    def _resolve(self, model: nn.Module) -> LayerMap:
        """What this monitor measures: the model's layers and components (see :func:`resolve_layers`)."""
        return resolve_layers(model, self.modules, self.first_layer_index)

    def _attach(self, model: nn.Module, layer_map: LayerMap) -> None:
        """Prepare collection (register hooks, allocate storage); may mark more cells of ``_missing``.
        ``self._context`` is the run's :class:`RunContext`."""

    def _detach(self) -> None:
        """Undo :meth:`_attach`."""

    def _describe(self) -> str:
        """What the attach report adds for this monitor (e.g. frozen components)."""
        return ""

    def _begin_training(self) -> None:
        """Training starts, after any checkpoint restore."""

    def _begin_sample(self) -> None:
        """A sampled optimizer step starts (before its first micro-batch); also clears a dropped sample."""

    def _begin_micro_batch(self) -> None:
        """A micro-batch of the sampled step starts: forward hooks may collect (``self._collecting``)."""
        self._collecting = True

    def _end_micro_batch(self) -> None:
        """A micro-batch of the sampled step ended."""
        self._collecting = False

    def _read_gradients(self, loss_scale: torch.Tensor | float | None) -> None:
        """Read what the sampled step needs from the gradients (see :meth:`before_optimizer_step`)."""

    def _collect(self) -> tuple[torch.Tensor, np.ndarray | None] | None:
        """The sampled step's ``(statistics x slots)`` device tensor and per-slot element counts
        (``None`` when the counts were appended to the tensor as its last row)."""
        raise NotImplementedError

    # --- the host pipeline -------------------------------------------------------------------

    def _finish_sample(self) -> None:
        step, self._sample_step = self._sample_step, None
        self._last_sampled_step = step
        collected = self._collect()
        # Rank zero records; with listeners every rank does (the values are global there, see add_sample_listener).
        if collected is None or not (self._context.is_global_zero or self._listeners):
            return
        statistics, counts = collected
        if statistics.device.type == "cpu":
            self._pending.append(_PendingSample(step, statistics, counts, None))
            self._drain(block=False)
            return
        cuda = statistics.device.type == "cuda"
        host = torch.empty(statistics.shape, dtype=statistics.dtype, pin_memory=cuda)
        # The one device-to-host copy of the sample. On CUDA it is asynchronous and an event tells when
        # it has landed; elsewhere nothing could tell, so the copy completes here.
        host.copy_(statistics, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append(_PendingSample(step, host, counts, event))
        if self._listeners:
            self._drain(block=True)  # a listener sees the sample on the step it was taken: sampled steps only

    def _drain(self, block: bool) -> None:
        while self._pending:
            sample = self._pending[0]
            if sample.copied is not None:
                if not block and not sample.copied.query():
                    return
                sample.copied.synchronize()
            self._pending.pop(0)
            self._ingest(sample)

    def _ingest(self, sample: _PendingSample) -> None:
        layer_map = self.layer_map
        assert layer_map is not None
        values = sample.statistics.numpy()
        counts = sample.counts if sample.counts is not None else values[-1].round().astype(np.int64)
        statistics = {name: values[i] for i, name in enumerate(self._statistics)}
        statistics["count"] = counts
        scalars: dict[str, float] = {}
        matrices: dict[str, tuple[np.ndarray, bytes]] = {}
        components = [*layer_map.component_names, ALL_COMPONENTS]
        ran = np.zeros(self._missing.shape, dtype=bool)
        ran[self._slot_layer[counts > 0], self._slot_component[counts > 0]] = True
        tables: dict[str, np.ndarray] = {}
        for definition in self._definitions:
            table = metric_table(
                definition, statistics, self._slot_layer, self._slot_component,
                layer_map.num_layers, len(layer_map.component_names),
            )
            self._buffers[definition.name].append(sample.step, table)
            if definition.name in self._matrix_contents:
                tag, content = self._matrix_contents[definition.name]
                matrices[tag] = (table, content)
            self._check_finite(definition.name, sample.step, table, ran)
            tables[definition.name] = table
            for layer, tag in enumerate(self._layer_tags):
                for column, component in enumerate(components):
                    if column == len(components) - 1 or not self._missing[layer, column] and not self.POOLED_SCALARS_ONLY:
                        scalars[f"{definition.name}/{tag}/{component}"] = float(table[layer, column])
        if self._outputs is not None:
            self._outputs.log_scalars(scalars, sample.step)  # on the training thread, see RunOutputs
            self._outputs.log_matrices(matrices, sample.step)  # the dashboard's, at every sample
        if self._listeners:
            nonfinite = np.zeros(self._missing.shape, dtype=bool)
            for table in tables.values():
                nonfinite |= ran & ~np.isfinite(table[:, :-1])
            self._deliver(Sample(
                step=sample.step, callback=type(self).__name__, name=self.name, metrics=tables,
                layer_labels=tuple(layer_map.layer_labels), column_labels=tuple(components),
                column_axis=self.COLUMN_AXIS, missing=self._missing.copy(), nonfinite=nonfinite,
            ))
        self.samples_recorded += 1
        self._samples_since_render += 1
        self._submit_render(force=False)

    def _check_finite(self, name: str, step: int, table: np.ndarray, ran: np.ndarray) -> None:
        bad = ran & ~np.isfinite(table[:, :-1])
        if name in self._warned_nonfinite or not bad.any():
            return
        self._warned_nonfinite.add(name)
        assert self.layer_map is not None
        where = ", ".join(
            f"layer {self.layer_map.layer_labels[layer]} {self.layer_map.component_names[column]}"
            for layer, column in zip(*np.nonzero(bad))
        )
        rank_zero_warn(
            f"{type(self).__name__}: {name} is NaN or infinite at step {step} ({where[:300]}). "
            "Recorded as is and marked on the heatmap; training goes on. This warning is shown once per metric."
        )

    def _submit_render(self, force: bool) -> None:
        if self._outputs is None or not self._outputs.active or self.layer_map is None or not any(len(b) for b in self._buffers.values()):
            return
        # Not at the first sample: drawing costs tens of ms of CPU that a 2-core machine takes from
        # training, so images come every render_every_n_samples samples (rate-limited) and at the end.
        now = time.monotonic()
        due = self._samples_since_render >= self.render_every_n_samples
        if not force and not (due and now - self._last_render_time >= self.min_render_interval_seconds):
            return
        self._samples_since_render = 0
        self._last_render_time = now
        snapshots = {name: buffer.ordered() for name, buffer in self._buffers.items() if len(buffer)}
        labels, names, missing = list(self.layer_map.layer_labels), list(self.layer_map.component_names), self._missing.copy()
        outputs, style, per_component = self._outputs, dict(self.style), self.per_component_images
        column_axis, latest_name = self.COLUMN_AXIS, self.LATEST_IMAGE

        def render() -> None:
            for metric, (steps, history) in snapshots.items():
                images = metric_images(
                    metric, steps, history, layer_labels=labels, component_names=names, missing=missing,
                    per_component=per_component, column_axis=column_axis, latest_name=latest_name, **style,
                )
                for image_name, rgb, arrays in images:
                    outputs.publish_image(metric, image_name, rgb, arrays, int(steps[-1]))
            outputs.flush_background()

        outputs.submit(render, key="render")
