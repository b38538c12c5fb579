"""Heatmaps under Lightning Fabric: ``ActivationHeatmap``, ``GradientHeatmap``, ``ExpertHeatmap`` and
``AttentionHeatmap`` as Fabric callbacks, with the same arguments as the Lightning callbacks.

Fabric runs no loop of its own, so the loop says where a micro-batch starts and where the gradients are final;
Fabric itself calls ``on_after_setup`` (in ``fabric.setup``) and ``on_after_optimizer_step`` (in the optimizer's
``step()``). The lines a Fabric loop adds (marked)::

    fabric = L.Fabric(callbacks=[ActivationHeatmap(), GradientHeatmap()],          # 1
                      loggers=TensorBoardLogger("runs"))
    model, optimizer = fabric.setup(model, optimizer)   # attaches (on_after_setup)
    for batch in loader:
        fabric.call("on_train_batch_start")                                          # 2: a micro-batch starts
        loss = model(batch)
        fabric.backward(loss)
        fabric.call("on_before_optimizer_step")                                      # 3: before clipping
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()                                # on_after_optimizer_step: the step counts
        optimizer.zero_grad()
    fabric.call("on_train_end")                                                      # 4: write everything

How these map onto the core (:class:`~lightning_heatmaps.core.HeatmapMonitor`):

- **Steps.** Optimizer steps are counted from 0 (``start_step`` when resuming) by ``on_after_optimizer_step``,
  like Lightning's ``global_step``: a sample is logged at the count before its step, and taken when that count is
  a multiple of ``every_n_steps`` (default 50). With gradient accumulation call ``on_train_batch_start`` at every
  micro-batch: the micro-batches of the sampled step are pooled exactly. One optimizer per Fabric.
- **Gradients** are read in ``on_before_optimizer_step``: after ``fabric.backward`` (and accumulation), before
  ``fabric.clip_gradients``. With a fp16 ``GradScaler`` (``precision="16-mixed"``) the gradients still carry the
  loss scale there, and it is divided out; a step the scaler skips is not a sample.
- **Activation checkpointing:** also call ``fabric.call("on_before_backward")`` just before ``fabric.backward``, so
  forwards re-run during backward are not counted twice (otherwise collection stops at ``on_before_optimizer_step``).
- **Outputs.** Rank zero writes through Fabric's loggers: into the run of its ``TensorBoardLogger`` (its own
  ``SummaryWriter``, never a second one) with ``.npz`` files under ``<log_dir>/heatmaps``; without a logger,
  PNG and ``.npz`` files under ``./heatmaps``. All ranks measure and join the samples' collectives.
- **Strategies:** one device and DDP. DeepSpeed, FSDP and model parallelism are refused at ``on_after_setup``.
- **Checkpoints:** a callback has ``state_dict()``/``load_state_dict()`` (history and step count): put it in the
  state passed to ``fabric.save`` / ``fabric.load``.
"""

from __future__ import annotations

import os
from typing import Any

from lightning_heatmaps._ranks import rank_zero_warn
from lightning_heatmaps.core.activation import ActivationMonitor
from lightning_heatmaps.core.attention import AttentionMonitor
from lightning_heatmaps.core.context import RunContext
from lightning_heatmaps.core.expert import ExpertMonitor
from lightning_heatmaps.core.gradient import GradientMonitor
from lightning_heatmaps.core.monitor import HeatmapMonitor, _check_int

__all__ = ["ActivationHeatmap", "AttentionHeatmap", "ExpertHeatmap", "GradientHeatmap", "fabric_context"]

_SUPPORTED = "supported under Fabric: one device (SingleDeviceStrategy) and DDP (DDPStrategy)"


def fabric_context(fabric: Any, default_every_n_steps: int = 50) -> RunContext:
    """The :class:`RunContext` of a ``lightning.fabric.Fabric``: its loggers on rank zero.

    The first ``TensorBoardLogger`` gives the run directory (``.npz`` files under ``<log_dir>/heatmaps``) and
    its ``SummaryWriter`` is written through; other loggers get the scalars.
    """
    from lightning.fabric.loggers import TensorBoardLogger

    from lightning_heatmaps._worker import BackgroundWriter
    from lightning_heatmaps.sinks import DiskSink, LoggerSink, RunOutputs, TensorBoardSink

    loggers = list(fabric.loggers)
    board = next((logger for logger in loggers if isinstance(logger, TensorBoardLogger)), None)
    with_dir = board or next((logger for logger in loggers if getattr(logger, "log_dir", None)), None)
    log_dir = with_dir.log_dir if with_dir is not None else os.getcwd()
    directory = os.path.join(log_dir, "heatmaps")
    is_zero = fabric.is_global_zero

    def open_outputs(owner: str) -> RunOutputs:
        if not is_zero:
            return RunOutputs(directory, [], None)
        sinks = [TensorBoardSink(logger.experiment) if isinstance(logger, TensorBoardLogger) else LoggerSink(logger)
                 for logger in loggers]
        if not loggers:
            rank_zero_warn(f"{owner}: the Fabric has no logger, so heatmaps go to disk only: PNG and .npz files "
                           f"under {directory}.")
        if not any(sink.takes_images for sink in sinks):
            sinks.append(DiskSink(directory))
        return RunOutputs(directory, sinks, BackgroundWriter(owner))

    return RunContext(is_global_zero=is_zero, open_outputs=open_outputs, default_every_n_steps=default_every_n_steps,
                      trainer="Fabric", device=fabric.device)


def _check_fabric_strategy(fabric: Any, owner: str) -> None:
    names = {cls.__name__ for cls in type(fabric.strategy).__mro__}
    if "DeepSpeedStrategy" in names:
        raise ValueError(f"{owner} does not support DeepSpeedStrategy: ZeRO keeps gradients partitioned outside "
                         f"`param.grad`; {_SUPPORTED}.")
    if not names & {"SingleDeviceStrategy", "DDPStrategy"}:
        raise ValueError(f"{owner} does not support {type(fabric.strategy).__name__}; {_SUPPORTED}.")


class _FabricAdapter(HeatmapMonitor):
    """Translates a Fabric loop's hook calls into the core monitor's events (see the module docstring).

    Subclasses take the core monitor's arguments plus ``start_step`` (optimizer steps already taken).
    """

    def __init__(self, *args: Any, start_step: int = 0, **kwargs: Any) -> None:
        _check_int("start_step", start_step, 0)
        super().__init__(*args, **kwargs)
        self.global_step = start_step
        self._fabric: Any = None
        self._in_micro_batch = False
        self._optimizer: Any = None
        self._scale_before: float | None = None

    # --- hooks Fabric calls itself ------------------------------------------------------------

    def on_after_setup(self, fabric: Any, module: Any) -> None:
        """``fabric.setup(model, ...)`` ran: attach to the (wrapped) model. With ``fabric.setup_module`` call
        ``fabric.call("on_after_setup", fabric=fabric, module=model)`` yourself."""
        if self.active:
            raise RuntimeError(f"{type(self).__name__} (lightning_heatmaps.fabric) is attached already: one model "
                               "per callback (set up one model, or give each model its own callbacks).")
        _check_fabric_strategy(fabric, type(self).__name__)
        self._fabric = fabric
        # The user's module (what `_FabricModule.module` returns): DDP's wrapper shares its parameters and runs its
        # forward, so the hooks see every training forward, and the reports name the model's own modules.
        self.attach(getattr(module, "module", module), fabric_context(fabric))
        self.begin_training()

    def on_after_optimizer_step(self, strategy: Any = None, optimizer: Any = None) -> None:
        """The optimizer stepped: the step counts (a sample of it is finished)."""
        if not self.active:
            return
        if self._optimizer is None:
            self._optimizer = optimizer
        elif optimizer is not self._optimizer:
            raise RuntimeError(f"{type(self).__name__} (lightning_heatmaps.fabric) counts the steps of one optimizer; "
                               "this Fabric steps a second one.")
        skipped = False
        if self._scale_before is not None:  # a sampled step under a GradScaler
            scale, self._scale_before = self._scale_before, None
            skipped = self._scaler().get_scale() < scale  # update() lowers the scale when step() skipped
        self.global_step += 1  # a skipped step counts, as in Lightning's global_step, but is not a sample
        self._in_micro_batch = False
        if skipped:
            self.skip_sample()
        self.end_micro_batch(self.global_step)

    # --- hooks the loop calls with fabric.call ------------------------------------------------

    def on_train_batch_start(self) -> None:
        """A training micro-batch starts (its forward follows)."""
        if not self.active:
            raise RuntimeError(f"{type(self).__name__} (lightning_heatmaps.fabric) is not attached: call "
                               "fabric.setup(model, optimizer) (or fabric.call('on_after_setup', fabric=fabric, "
                               "module=model)) before the loop.")
        if self._in_micro_batch:
            self.end_micro_batch(self.global_step)  # the previous micro-batch of this step (accumulation)
        self._in_micro_batch = True
        self.begin_micro_batch(self.global_step)

    def on_before_backward(self) -> None:
        """Optional (needed with activation checkpointing): ``fabric.backward`` follows."""
        self.before_backward()

    def on_before_optimizer_step(self) -> None:
        """Gradients are accumulated, not yet clipped: read them (sampled steps only)."""
        self.before_backward()  # no training forward between here and the optimizer step
        if self._sample_step is None:
            return
        scaler = self._scaler()
        loss_scale = None
        if scaler is not None and scaler.is_enabled():
            loss_scale = self._scale_before = scaler.get_scale()  # a host sync, on sampled steps only
        self.before_optimizer_step(loss_scale)

    def on_train_end(self) -> None:
        """Training ended: finish the last sample, write everything, remove hooks. Call on every rank."""
        if not self.active:
            return
        try:
            if self._in_micro_batch:
                self._in_micro_batch = False
                self.end_micro_batch(self.global_step)
            self.end_training()
        finally:
            self.close()

    def on_exception(self, exception: BaseException | None = None) -> None:
        """Training stops on an exception (``fabric.call("on_exception")`` in your ``except``): keep what was
        recorded, then close."""
        self.abort()

    def _scaler(self) -> Any:
        precision = getattr(self._fabric.strategy, "precision", None) if self._fabric is not None else None
        return getattr(precision, "scaler", None)

    # --- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The histories and the step count (pass the callback in ``fabric.save``'s state)."""
        return {**super().state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (before or after ``fabric.setup``)."""
        state = dict(state_dict)
        self.global_step = int(state.pop("global_step", self.global_step))
        super().load_state_dict(state)


class ActivationHeatmap(_FabricAdapter, ActivationMonitor):
    """:class:`lightning_heatmaps.ActivationHeatmap` for Lightning Fabric (same arguments, plus ``start_step``).

    Example:
        >>> callback = ActivationHeatmap(every_n_steps=10)  # Fabric(callbacks=[callback])
    """


class GradientHeatmap(_FabricAdapter, GradientMonitor):
    """:class:`lightning_heatmaps.GradientHeatmap` for Lightning Fabric (same arguments, plus ``start_step``);
    gradients are read at ``fabric.call("on_before_optimizer_step")``, before clipping.

    Example:
        >>> callback = GradientHeatmap(metrics=["grad_norm", "update_ratio"])  # Fabric(callbacks=[callback])
    """


class ExpertHeatmap(_FabricAdapter, ExpertMonitor):
    """:class:`lightning_heatmaps.ExpertHeatmap` for Lightning Fabric (same arguments, plus ``start_step``).

    Example:
        >>> callback = ExpertHeatmap(every_n_steps=10)  # Fabric(callbacks=[callback])
    """


class AttentionHeatmap(_FabricAdapter, AttentionMonitor):
    """:class:`lightning_heatmaps.AttentionHeatmap` for Lightning Fabric (same arguments, plus ``start_step``).

    Example:
        >>> callback = AttentionHeatmap(every_n_steps=10)  # Fabric(callbacks=[callback])
    """

    def on_after_setup(self, fabric: Any, module: Any) -> None:
        from lightning_heatmaps.attention_sites import check_attention_implementations

        check_attention_implementations(module, type(self).__name__)
        super().on_after_setup(fabric, module)

