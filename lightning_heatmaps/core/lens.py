"""The core every lens heatmap shares, whatever trainer drives it: the schedule, the evaluation, the outputs.

:class:`LensMonitor` knows no trainer (it imports neither Lightning nor transformers). An adapter (the
Lightning :class:`~lightning_heatmaps.lens_base.LensCallback`, or a plain loop's
:class:`~lightning_heatmaps.loop.Monitor`) translates its framework's hooks into the monitor's events::

    attach(model, context, every_rank)     # once, when the (wrapped/sharded) model is final
    begin_training(step)                   # the starting point (random init, or the resumed weights)
    after each training batch:
        end_micro_batch(step)              # step: optimizer steps taken now (Lightning's global_step)
    after each validation run:
        validation_end(step)               # evaluates only with on_validation_end=True
    end_training()
    close()                                # or abort() on an exception

An evaluation runs in eval mode under ``torch.no_grad()`` and restores train mode afterwards. On a model
that is whole on every rank (one process, DDP) rank zero evaluates alone: the other ranks return at once,
so no rank waits on another. On an FSDP2 model every rank evaluates: the same probe set, the same forwards
in the same order (each all-gathers parameters from every rank), so every rank computes the same values
and rank zero writes them (the sinks exist on rank zero only). Which of the two is a fact the adapter
passes to :meth:`LensMonitor.attach` (``every_rank``, from
:func:`~lightning_heatmaps.distributed.check_lens_sharding`, which also refuses what cannot be exact: FSDP1,
tensor parallelism). The schedule depends only on the global step, and an evaluation that fails is skipped
on every rank alike, since every rank runs the same code on the same inputs and parameters (a failure that
one rank alone meets in the middle of a forward, such as running out of memory, leaves the others in
FSDP2's all-gather until the process group's timeout). Its result is a set of heatmap matrices plus one
summary value per layer; the summary enters a ring buffer whose layer x step history is drawn like the core
monitors' (same buffer, renderer, sinks and background writer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_heatmaps._ranks import rank_zero_warn
from lightning_heatmaps.core.context import RunContext
from lightning_heatmaps.distributed import check_lens_sharding, resharded_after
from lightning_heatmaps.layers import layer_tags
from lightning_heatmaps.render import figure_to_rgb, heatmap_figure, metric_images
from lightning_heatmaps.ring_buffer import POLICIES, RingBuffer
from lightning_heatmaps.sinks import RunOutputs, check_output_name
from lightning_heatmaps_tensorboard.metadata import matrix_content, matrix_tag

__all__ = [
    "LensImage", "LensMonitor", "LensResult", "as_token_lists", "check_memory", "mean_or_nan", "model_device",
    "token_strings",
]


@dataclass
class LensImage:
    """One heatmap of an evaluation: ``values`` with its labels, drawn as ``heatmaps/<metric>/<name>`` and
    written for the dashboard as ``matrices/<metric>/<name>`` (what it is: ``kind``, e.g. ``layer_x_token``)."""

    name: str
    values: np.ndarray
    row_labels: list[str]
    column_labels: list[str]
    xlabel: str
    kind: str
    ylabel: str = "layer"
    color_limits: tuple[float, float] | None = None
    arrays: dict[str, Any] = field(default_factory=dict)


@dataclass
class LensResult:
    """An evaluation's images, its per-layer summary (for the layer x step history) and scalars."""

    images: list[LensImage]
    layer_summary: np.ndarray
    scalars: dict[str, float]


def model_device(model: nn.Module, context: RunContext | None = None) -> torch.device:
    """Where ``model`` computes: its own ``device`` (a LightningModule's, a Hugging Face model's), else the
    context's, else its first parameter's (CPU for a model without parameters).

    Example:
        >>> model_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if context is not None and context.device is not None:
        return torch.device(context.device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class LensMonitor:
    """Base of the lens monitors: schedule, evaluation on a fixed probe set, history and outputs. No trainer.

    Subclasses (:class:`~lightning_heatmaps.core.LogitLensMonitor`, :class:`~lightning_heatmaps.core.ProbeMonitor`,
    :class:`~lightning_heatmaps.core.InterventionMonitor`) measure, through :meth:`_prepare` and :meth:`_evaluate`;
    adapters drive the events listed in this module's docstring.

    Args:
        every_n_steps: evaluate when the optimizer step count is a multiple of this (``None``: only at validation
            end).
        on_validation_end: also evaluate at the end of each validation run during training.
        capacity: evaluations kept in the layer x step history. history: ``"recent"`` or ``"whole_run"``.
        first_layer_index: number of the first layer in labels and tags (0 or 1).
        cmap: matplotlib colour map.
        max_memory_mb: refuse (at attach) a probe set whose evaluation would need more memory than this.
        name: where this instance's tags and files live, instead of the metric's name.

    Example:
        >>> monitor = LensMonitor(every_n_steps=10)
        >>> monitor.samples_step(20), monitor.samples_step(25)
        (True, False)
    """

    metric = "lens"
    summary_label = "value"

    def __init__(
        self,
        every_n_steps: int | None = 100,
        on_validation_end: bool = False,
        capacity: int = 256,
        history: str = "recent",
        first_layer_index: int = 0,
        cmap: str = "viridis",
        max_memory_mb: float = 2048.0,
        name: str | None = None,
    ) -> None:
        check_output_name(name)
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"Invalid value for every_n_steps={every_n_steps!r}: must be None or an integer >= 1.")
        if every_n_steps is None and not on_validation_end:
            raise ValueError("Invalid schedule: every_n_steps=None and on_validation_end=False would never evaluate.")
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"Invalid value for capacity={capacity!r}: must be an integer >= 2.")
        if history not in POLICIES:
            raise ValueError(f"Invalid value for history={history!r}: must be one of {POLICIES}.")
        if first_layer_index not in (0, 1) or isinstance(first_layer_index, bool):
            raise ValueError(f"Invalid value for first_layer_index={first_layer_index!r}: must be 0 or 1.")
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise ValueError(f"Invalid value for cmap={cmap!r}: must be a matplotlib colour map name, e.g. 'viridis'.")
        if not isinstance(max_memory_mb, (int, float)) or not max_memory_mb > 0:
            raise ValueError(f"Invalid value for max_memory_mb={max_memory_mb!r}: must be a number > 0.")
        self.every_n_steps = every_n_steps
        # Trailing underscore: ``on_validation_end`` is the Lightning adapter's hook of that name.
        self.on_validation_end_ = on_validation_end
        self.capacity = capacity
        self.history = history
        self.first_layer_index = first_layer_index
        self.cmap = cmap
        self.max_memory_mb = float(max_memory_mb)
        self.name = name
        self._buffer: RingBuffer | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._outputs: RunOutputs | None = None
        self._context: RunContext | None = None
        self._attached_model: nn.Module | None = None
        self._last_step: int | None = None
        self._warned: set[str] = set()
        self._every_rank = False
        #: Evaluations run (on this rank).
        self.evaluations = 0

    # --- subclass interface ------------------------------------------------------------------

    def _prepare(self, model: nn.Module) -> int:
        """Check the probe set against ``model`` (raise ``ValueError`` on bad input); return the layer count."""
        raise NotImplementedError

    def _evaluate(self, model: nn.Module) -> LensResult:
        """One evaluation of ``model`` on the probe set (already in eval mode, under ``no_grad``)."""
        raise NotImplementedError

    def _device(self, model: nn.Module) -> torch.device:
        """Where the probe tensors go: see :func:`model_device`."""
        return model_device(model, self._context)

    # --- identity and state ----------------------------------------------------------------------

    @property
    def state_key_fields(self) -> dict[str, Any]:
        """The configuration that identifies this instance's state in a checkpoint (adapters build keys from it)."""
        return {"name": self.output_name, "every_n_steps": self.every_n_steps, "on_validation_end": self.on_validation_end_}

    @property
    def output_name(self) -> str:
        """Where this instance's tags and files live: ``name``, or the metric's own name."""
        return self.name or self.metric

    @property
    def output_names(self) -> list[str]:
        """The names this instance's tags and files live under (no other callback or monitor may share one)."""
        return [self.output_name]

    def state_dict(self) -> dict[str, Any]:
        """The history and the last evaluated step, to checkpoint."""
        return {"buffer": self._buffer.state_dict() if self._buffer is not None else None, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (applied at :meth:`attach` if called before it)."""
        self._loaded_state = state_dict
        if self._buffer is not None:
            self._restore()

    def _restore(self) -> None:
        state, self._loaded_state = self._loaded_state, None
        if state and state.get("buffer") is not None and self._buffer is not None:
            try:
                self._buffer.load_state_dict(state["buffer"])
            except ValueError as error:
                rank_zero_warn(f"{type(self).__name__}: not restoring the history: {error}")
            self._last_step = state.get("last_step")

    def samples_step(self, step: int) -> bool:
        """Whether the optimizer step count ``step`` is evaluated by the ``every_n_steps`` schedule."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def sample_history(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``(steps, values)`` of the per-layer summary, oldest first: ``values`` is ``[evaluations,
        layers, 1]``. Empty before the first evaluation; filled on the ranks that evaluate."""
        if self._buffer is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0, 1))
        return self._buffer.ordered()

    # --- events (called by an adapter) -----------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the monitor is attached and its outputs open (between :meth:`attach` and :meth:`close`)."""
        return self._outputs is not None

    def attach(self, model: nn.Module, context: RunContext, every_rank: bool | None = None) -> None:
        """Check the probe set against ``model`` (final: wrapped or sharded), allocate the history, open the outputs.

        Call on every rank. ``every_rank``: whether every rank takes part in each evaluation (the model is
        sharded, FSDP2) or rank zero evaluates alone (a whole model); ``None`` asks
        :func:`~lightning_heatmaps.distributed.check_lens_sharding`, which also refuses layouts that cannot be
        exact. ``model`` is what the measurement reads (under Lightning: the ``LightningModule``).
        """
        self._every_rank = check_lens_sharding(model, type(self).__name__) if every_rank is None else bool(every_rank)
        self._context = context
        self._attached_model = model
        layers = self._prepare(model)
        self.layer_labels = [str(i + self.first_layer_index) for i in range(layers)]
        self._layer_tags = layer_tags(layers, self.first_layer_index)
        self._buffer = RingBuffer(self.capacity, (layers, 1), self.history)
        if self._loaded_state is not None:
            self._restore()
        self._outputs = context.open_outputs(type(self).__name__)

    def begin_training(self, step: int) -> None:
        """Training starts at optimizer step count ``step`` (after any restore): evaluates the starting point
        (random init, or the resumed weights) when the schedule says so."""
        if self.samples_step(step):
            self.run(step)

    def end_micro_batch(self, step: int) -> None:
        """A training batch ended; ``step`` is the optimizer step count now. Evaluates when the schedule says so
        (once per step, however many micro-batches it has), and hands drawn images to training-thread loggers."""
        if self.samples_step(step):
            self.run(step)
        if self._outputs is not None:
            self._outputs.deliver()  # images drawn off-thread for loggers that are called on this thread

    def validation_end(self, step: int) -> None:
        """A validation run during training ended at optimizer step count ``step``: evaluates with
        ``on_validation_end=True`` (the adapter leaves out sanity checks and validation outside training)."""
        if self.on_validation_end_:
            self.run(step)

    def end_training(self) -> None:
        """Training ended normally: write everything submitted so far."""
        if self._outputs is not None:
            self._outputs.flush()

    def close(self) -> None:
        """Close the outputs (idempotent). Call on every rank."""
        if self._outputs is not None:
            self._outputs.close()
            self._outputs = None

    def abort(self) -> None:
        """Training stops on an exception: what was evaluated is still written, then the outputs close."""
        self.close()

    # --- one evaluation ------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{type(self).__name__}: {message}")

    def run(self, step: int) -> None:
        """Evaluate the attached model now and record it at ``step`` (once per step; a failure is reported
        once and skipped, never raised). Every rank calls it; on a whole model only rank zero evaluates."""
        if step == self._last_step or self._buffer is None:
            return
        self._last_step = step
        assert self._context is not None and self._attached_model is not None
        if not (self._every_rank or self._context.is_global_zero):
            return  # a whole model: rank zero evaluates alone, no collective, so no rank waits on another
        model = self._attached_model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), resharded_after(model):
                result = self._evaluate(model)
        except Exception as error:  # an evaluation never crashes training: report, skip, go on
            self._warn_once(f"error:{type(error).__name__}", f"evaluation skipped at step {step} ({type(error).__name__}: "
                            f"{error}). Training goes on; later failures of this kind are not reported.")
            return
        finally:
            model.train(was_training)
        self.evaluations += 1
        summary = np.asarray(result.layer_summary, dtype=np.float64).reshape(-1, 1)
        if not np.isfinite(summary).all():
            self._warn_once("nonfinite", f"non-finite values at step {step}; recorded as they are and marked on the images.")
        self._buffer.append(step, summary)
        self._publish(step, result)

    def _publish(self, step: int, result: LensResult) -> None:
        outputs = self._outputs
        if outputs is None or not outputs.active:
            return
        assert self._buffer is not None
        steps, history = self._buffer.ordered()
        metric, labels, cmap = self.output_name, list(self.layer_labels), self.cmap
        scalars = dict(result.scalars)
        for tag, value in zip(self._layer_tags, result.layer_summary):
            scalars[f"{metric}/{tag}/{self.summary_label}"] = float(value)
        outputs.log_scalars(scalars, step)  # on the training thread, see RunOutputs
        outputs.log_matrices({
            matrix_tag(metric, image.name): (image.values, matrix_content(
                callback=type(self).__name__, metric=metric, kind=image.kind, row_labels=image.row_labels,
                column_labels=image.column_labels, row_axis=image.ylabel, column_axis=image.xlabel,
                color_limits=image.color_limits, every_n_steps=self.every_n_steps,
            ))
            for image in result.images
        }, step)

        def write() -> None:
            for image in result.images:
                figure = heatmap_figure(
                    image.values, row_labels=image.row_labels, column_labels=image.column_labels, xlabel=image.xlabel,
                    ylabel=image.ylabel, cmap=cmap, color_limits=image.color_limits, colorbar_label=self.metric,
                    title=f"{metric}: {image.name} (step {step})",
                )
                arrays = {"values": image.values, "row_labels": np.asarray(image.row_labels),
                          "column_labels": np.asarray(image.column_labels), "step": np.asarray(step),
                          "metric": np.asarray(metric), **image.arrays}
                outputs.publish_image(metric, image.name, figure_to_rgb(figure), arrays, step)
            for name, rgb, arrays in metric_images(metric, steps, history, layer_labels=labels, component_names=[],
                                                   missing=np.zeros((len(labels), 0), dtype=bool), cmap=cmap):
                outputs.publish_image(metric, name, rgb, arrays, step)
            outputs.flush_background()

        outputs.submit(write)


def check_memory(what: str, megabytes: float, limit: float) -> None:
    """Refuse, with the numbers, a probe set whose evaluation would need more than ``limit`` MB."""
    if megabytes > limit:
        raise ValueError(
            f"The {what} needs about {megabytes:.0f} MB per evaluation, more than max_memory_mb={limit:g}: "
            "use fewer or shorter probes (or raise max_memory_mb)."
        )


def as_token_lists(prompts: Any, tokenizer: Any, argument: str) -> list[list[int]]:
    """Token id lists from strings (with a tokenizer), id tensors or lists of ints."""
    items: Sequence[Any] = [prompts] if isinstance(prompts, (str, torch.Tensor)) and (not isinstance(prompts, torch.Tensor) or prompts.dim() == 1) else prompts
    result = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(f"Invalid value for {argument}: text prompts need a `tokenizer` (a Hugging Face tokenizer or a callable str -> ids).")
            encoded = tokenizer(item)
            ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        else:
            ids = item.tolist() if isinstance(item, torch.Tensor) else list(item)
        if len(ids) == 0:
            raise ValueError(f"Invalid value for {argument}: prompt {len(result)} has no tokens.")
        result.append([int(i) for i in ids])
    if not result:
        raise ValueError(f"Invalid value for {argument}: no prompts.")
    return result


def token_strings(ids: list[int], tokenizer: Any) -> list[str]:
    """Readable labels for token ids."""
    if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        return [tokenizer.decode([i]) for i in ids]
    return [str(i) for i in ids]


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
