"""The Lightning adapter every heatmap callback shares: Lightning's hooks, translated into the core's events.

The schedule, the host pipeline, the outputs and the public sample API live in
:class:`~lightning_heatmaps.core.monitor.HeatmapMonitor`, which knows no trainer; this module only maps
``setup``/``on_fit_start``/``on_train_batch_start``/... onto its events and builds the run's
:class:`~lightning_heatmaps.core.context.RunContext` from the ``Trainer``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_heatmaps.core.context import RunContext
from lightning_heatmaps.core.monitor import CollectiveContributor, HeatmapMonitor, Sample, SampleListener, _check_int, _PendingSample
from lightning_heatmaps.distributed import check_strategy, register_fsdp1_shards
from lightning_heatmaps.sinks import check_distinct_outputs, open_run_outputs

__all__ = [
    "CollectiveContributor", "FitLifecycle", "HeatmapCallback", "Sample", "SampleListener", "_PendingSample", "_check_int", "lightning_context",
    "lightning_loss_scale",
]


def lightning_context(trainer: pl.Trainer) -> RunContext:
    """The :class:`RunContext` of a Lightning ``Trainer``: its loggers (rank zero) and ``log_every_n_steps``."""
    return RunContext(
        is_global_zero=trainer.is_global_zero,
        open_outputs=lambda owner: open_run_outputs(trainer, owner),
        default_every_n_steps=trainer.log_every_n_steps,
        trainer="Lightning",
        device=trainer.strategy.root_device,
        info=rank_zero_info,
    )


def lightning_loss_scale(precision_plugin: Any, optimizer: Any) -> torch.Tensor | None:
    """The AMP loss scale still in the gradients at ``on_before_optimizer_step``, or ``None`` when unscaled.

    Lightning unscales before that hook, except for optimizers that unscale inside ``step()`` (fused Adam).
    """
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        return scaler._get_scale_async()
    return None


class FitLifecycle(Callback):
    """The end of a fit, shared by the Lightning adapters: a core monitor's (heatmap or lens) ``end_training``,
    ``close`` and ``abort`` at Lightning's ``on_train_end``, ``teardown`` and ``on_exception``."""

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_training()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.close()  # before Lightning finalizes its loggers (teardown runs first)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl+C or an error elsewhere: what was measured is still written before the process goes.
        self.abort()


class HeatmapCallback(HeatmapMonitor, FitLifecycle):
    """Base class of the layer heatmap callbacks; see :class:`~lightning_heatmaps.ActivationHeatmap`.

    A Lightning callback is a core monitor (a subclass of :class:`~lightning_heatmaps.core.HeatmapMonitor`)
    plus the hooks below and :class:`FitLifecycle`'s, each a one-line translation into a monitor event.
    """

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_fields)

    @override
    def state_dict(self) -> dict[str, Any]:
        return HeatmapMonitor.state_dict(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        HeatmapMonitor.load_state_dict(self, state_dict)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.every_n_steps is None:
            self.every_n_steps = trainer.log_every_n_steps
        check_strategy(trainer, type(self).__name__)
        check_distinct_outputs(trainer, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in `setup`: Lightning calls `configure_model` and then wraps or shards the model
        # (DDP, fully_shard, FSDP) after the callbacks' `setup`, and parameters are only final now.
        register_fsdp1_shards(pl_module)
        self.attach(pl_module, lightning_context(trainer))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.begin_training()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.begin_micro_batch(trainer.global_step)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.before_backward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.before_optimizer_step(lightning_loss_scale(trainer.precision_plugin, optimizer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.end_micro_batch(trainer.global_step)

