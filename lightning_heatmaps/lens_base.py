"""What the lens heatmap callbacks share: the schedule, evaluation on a fixed probe set, the outputs.

An evaluation runs in eval mode under ``torch.no_grad()`` and restores train mode afterwards. On a model
that is whole on every rank (one process, DDP) rank zero evaluates alone: the other ranks return at once,
so no rank waits on another. On an FSDP2 model every rank evaluates: the same probe set, the same forwards
in the same order (each all-gathers parameters from every rank), so every rank computes the same values
and rank zero writes them (the sinks exist on rank zero only). The schedule depends only on the global
step, and an evaluation that fails is skipped on every rank alike, since every rank runs the same code on
the same inputs and parameters (a failure that one rank alone meets in the middle of a forward, such as
running out of memory, leaves the others in FSDP2's all-gather until the process group's timeout). What
cannot be exact (FSDP1, tensor parallelism) is refused at fit start
(:func:`~lightning_heatmaps.distributed.check_lens_sharding`). Its result is a set of
heatmap matrices plus one summary value per layer; the summary enters a ring buffer whose layer x step
history is drawn like the core callbacks' (same buffer, renderer, sinks and background writer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_heatmaps.distributed import check_lens_sharding, check_lens_strategy, resharded_after
from lightning_heatmaps.layers import layer_tags
from lightning_heatmaps.render import figure_to_rgb, heatmap_figure, metric_images
from lightning_heatmaps.ring_buffer import POLICIES, RingBuffer
from lightning_heatmaps.sinks import RunOutputs, check_distinct_outputs, check_output_name, open_run_outputs
from lightning_heatmaps_tensorboard.metadata import matrix_content, matrix_tag


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


class LensCallback(Callback):
    """Base of the lens heatmap callbacks (see :class:`~lightning_heatmaps.LogitLensHeatmap`)."""

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
        self._last_step: int | None = None
        self._warned: set[str] = set()
        self._every_rank = False
        self.evaluations = 0

    # --- subclass interface ------------------------------------------------------------------

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Check the probe set against the model (raise ``ValueError`` on bad input); return the layer count."""
        raise NotImplementedError

    def _evaluate(self, pl_module: pl.LightningModule) -> LensResult:
        """One evaluation on the probe set (already in eval mode, under ``no_grad``)."""
        raise NotImplementedError

    # --- state ---------------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.output_name, every_n_steps=self.every_n_steps,
                                        on_validation_end=self.on_validation_end_)

    @property
    def output_name(self) -> str:
        """Where this instance's tags and files live: ``name``, or the metric's own name."""
        return self.name or self.metric

    @property
    def output_names(self) -> list[str]:
        return [self.output_name]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self._buffer.state_dict() if self._buffer is not None else None, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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

    # --- lifecycle ---------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_lens_strategy(trainer, type(self).__name__)
            check_distinct_outputs(trainer, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model` and the strategy's wrapping, like the core callbacks.
        self._every_rank = check_lens_sharding(pl_module, type(self).__name__)
        layers = self._prepare(trainer, pl_module)
        self.layer_labels = [str(i + self.first_layer_index) for i in range(layers)]
        self._layer_tags = layer_tags(layers, self.first_layer_index)
        self._buffer = RingBuffer(self.capacity, (layers, 1), self.history)
        if self._loaded_state is not None:
            self._restore()
        self._outputs = open_run_outputs(trainer, type(self).__name__)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._outputs is not None:
            self._outputs.close()  # before Lightning finalizes its loggers (teardown runs first)
            self._outputs = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl+C or an error elsewhere: what was evaluated is still written before the process goes.
        self.teardown(trainer, pl_module, "fit")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)  # the starting point (random init, or the resumed weights)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)
        if self._outputs is not None:
            self._outputs.deliver()  # images drawn off-thread for loggers that are called on this thread

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_validation_end_ and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._outputs is not None:
            self._outputs.flush()

    # --- one evaluation ------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{type(self).__name__}: {message}")

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or self._buffer is None:
            return
        self._last_step = step
        if not (self._every_rank or trainer.is_global_zero):
            return  # a whole model: rank zero evaluates alone, no collective, so no rank waits on another
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), resharded_after(pl_module):
                result = self._evaluate(pl_module)
        except Exception as error:  # an evaluation never crashes training: report, skip, go on
            self._warn_once(f"error:{type(error).__name__}", f"evaluation skipped at step {step} ({type(error).__name__}: "
                            f"{error}). Training goes on; later failures of this kind are not reported.")
            return
        finally:
            pl_module.train(was_training)
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
