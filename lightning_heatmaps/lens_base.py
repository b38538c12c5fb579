"""The Lightning adapter every lens heatmap callback shares: Lightning's hooks, translated into the core's events.

The schedule, the evaluation on a fixed probe set, the history and the outputs live in
:class:`~lightning_heatmaps.core.lens.LensMonitor`, which knows no trainer; this module only maps
``setup``/``on_fit_start``/``on_train_start``/``on_train_batch_end``/... onto its events, builds the run's
:class:`~lightning_heatmaps.core.context.RunContext` from the ``Trainer`` and passes the strategy's facts
(:func:`~lightning_heatmaps.distributed.check_lens_strategy`, :func:`~lightning_heatmaps.distributed.check_lens_sharding`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_heatmaps.base import FitLifecycle, lightning_context
from lightning_heatmaps.core.lens import (
    LensImage, LensMonitor, LensResult, as_token_lists, check_memory, mean_or_nan, token_strings,
)
from lightning_heatmaps.distributed import check_lens_sharding, check_lens_strategy
from lightning_heatmaps.sinks import check_distinct_outputs

__all__ = ["LensCallback", "LensImage", "LensResult", "as_token_lists", "check_memory", "mean_or_nan", "token_strings"]


class LensCallback(LensMonitor, FitLifecycle):
    """Base of the lens heatmap callbacks (see :class:`~lightning_heatmaps.LogitLensHeatmap`).

    A Lightning callback is a core lens monitor (a subclass of :class:`~lightning_heatmaps.core.LensMonitor`)
    plus the hooks below and :class:`~lightning_heatmaps.base.FitLifecycle`'s, each a one-line translation into a
    monitor event. Its arguments (``every_n_steps``, ``on_validation_end``, ``capacity``, ``history``,
    ``first_layer_index``, ``cmap``, ``max_memory_mb``, ``name``) are :class:`~lightning_heatmaps.core.lens.LensMonitor`'s.
    """

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_fields)

    @override
    def state_dict(self) -> dict[str, Any]:
        return LensMonitor.state_dict(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        LensMonitor.load_state_dict(self, state_dict)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_lens_strategy(trainer, type(self).__name__)
            check_distinct_outputs(trainer, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model` and the strategy's wrapping, like the core callbacks.
        every_rank = check_lens_sharding(pl_module, type(self).__name__)
        self.attach(pl_module, lightning_context(trainer), every_rank=every_rank)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.begin_training(trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.end_micro_batch(trainer.global_step)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.validation_end(trainer.global_step)
