"""Heatmaps in a plain PyTorch training loop: a :class:`Monitor` and three calls in the loop.

Example loop (gradient accumulation, AMP and clipping optional)::

    monitor = Monitor(model, [ActivationMonitor(), GradientMonitor()], log_dir="runs/exp", every_n_steps=50)
    for batch in loader:
        with monitor.step():                       # one optimizer step
            loss = model(batch).loss
            monitor.backward(loss)                 # instead of loss.backward()
            monitor.before_optimizer_step()        # gradients final: after unscale_, before clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    monitor.close()

Lens monitors (:class:`~lightning_heatmaps.core.LogitLensMonitor`, ``ProbeMonitor``, ``InterventionMonitor``) go in
the same list: they evaluate the model on their probe set at the start (step ``start_step``) and after each
:meth:`Monitor.step` whose new step count is a multiple of their ``every_n_steps``, as the Lightning lens callbacks do
after ``on_train_batch_end``; call :meth:`Monitor.validation_end` after your own validation for those built with
``on_validation_end=True``.

Imports neither Lightning nor transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_heatmaps.core.context import RunContext
from lightning_heatmaps.core.lens import LensMonitor
from lightning_heatmaps.core.monitor import HeatmapMonitor, _check_int

__all__ = ["Monitor"]


class Monitor:
    """Drives core monitors from a hand-written loop; writes a TensorBoard run under ``log_dir`` (rank zero).

    Each :meth:`step` is one optimizer step; steps are numbered from ``start_step`` (0), like Lightning's
    ``global_step``, and a sample is taken when ``step % every_n_steps == 0``. Under DDP (``torch.distributed``
    initialised, the model wrapped before the ``Monitor`` is built) every rank builds its ``Monitor`` and makes the
    same calls: samples run one collective each, and only rank zero writes.

    Args:
        model: the model, final (wrapped in DDP or sharded already).
        monitors: core monitors (:class:`~lightning_heatmaps.core.ActivationMonitor`, ``GradientMonitor``,
            ``ExpertMonitor``, ``AttentionMonitor``, and the lens monitors ``LogitLensMonitor``, ``ProbeMonitor``,
            ``InterventionMonitor``), each built with the same arguments as its Lightning callback.
        log_dir: the TensorBoard run directory (heatmap files under ``<log_dir>/heatmaps``).
        writer: a ``SummaryWriter`` of yours already writing into ``log_dir``, reused (one writer per directory).
        every_n_steps: the sample period of monitors built with ``every_n_steps=None`` (default 50).
        start_step: the number of optimizer steps already taken (when resuming).

    Example:
        >>> import tempfile
        >>> from lightning_heatmaps.core import GradientMonitor
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> monitor = Monitor(model, [GradientMonitor(every_n_steps=1)], log_dir=tempfile.mkdtemp())
        >>> with monitor.step():
        ...     monitor.backward(model(torch.ones(2, 4)).sum())
        ...     monitor.before_optimizer_step()
        >>> monitor.close()
        >>> monitor.monitors[0].samples_recorded
        1
    """

    def __init__(
        self,
        model: nn.Module,
        monitors: Sequence[HeatmapMonitor | LensMonitor],
        log_dir: str,
        writer: Any = None,
        every_n_steps: int = 50,
        start_step: int = 0,
    ) -> None:
        monitors = list(monitors)
        if not monitors or not all(isinstance(monitor, (HeatmapMonitor, LensMonitor)) for monitor in monitors):
            raise ValueError(
                f"Invalid value for monitors={monitors!r}: must be one or more core monitors "
                "(lightning_heatmaps.core.ActivationMonitor, GradientMonitor, ExpertMonitor, AttentionMonitor, "
                "LogitLensMonitor, ProbeMonitor, InterventionMonitor)."
            )
        seen: dict[str, HeatmapMonitor | LensMonitor] = {}
        for monitor in monitors:
            for name in monitor.output_names:
                if name in seen:
                    raise ValueError(
                        f"{type(monitor).__name__} and {type(seen[name]).__name__} would write the same tags and files "
                        f"({name}): give each a distinct `name=`."
                    )
                seen[name] = monitor
        if not isinstance(log_dir, str) or not log_dir:
            raise ValueError(f"Invalid value for log_dir={log_dir!r}: must be a non-empty directory path.")
        _check_int("every_n_steps", every_n_steps, 1)
        _check_int("start_step", start_step, 0)
        self.monitors = monitors
        self._heatmaps = [monitor for monitor in monitors if isinstance(monitor, HeatmapMonitor)]
        self._lenses = [monitor for monitor in monitors if isinstance(monitor, LensMonitor)]
        self.global_step = start_step
        self.context = RunContext.for_directory(log_dir, writer=writer, default_every_n_steps=every_n_steps)
        self._in_step = False
        for monitor in monitors:
            monitor.attach(model, self.context)  # a lens monitor asks check_lens_sharding who evaluates
        for monitor in self._heatmaps:
            monitor.begin_training()
        for lens in self._lenses:
            lens.begin_training(self.global_step)

    @contextmanager
    def step(self) -> Iterator[Monitor]:
        """One optimizer step: its forward(s), :meth:`backward` call(s) and ``optimizer.step()``.

        On leaving, the step counts and a sample taken at it is finished. If the block raises, the step does not
        count and its sample is dropped.
        """
        if self._in_step:
            raise RuntimeError("Monitor.step() blocks do not nest: one block is one optimizer step.")
        self._in_step = True
        for monitor in self._heatmaps:
            monitor.begin_micro_batch(self.global_step)
        try:
            yield self
        except BaseException:
            for monitor in self._heatmaps:
                monitor.skip_sample()
            raise
        finally:
            self._in_step = False
        self.global_step += 1
        for monitor in self._heatmaps:
            monitor.end_micro_batch(self.global_step)
        for lens in self._lenses:  # after the optimizer step, outside any sampled forward
            lens.end_micro_batch(self.global_step)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``, telling the monitors: forwards re-run during backward (activation
        checkpointing) do not count, and the next forward in this step is the next micro-batch's."""
        for monitor in self._heatmaps:
            monitor.before_backward()
        loss.backward(**kwargs)
        for monitor in self._heatmaps:
            monitor.begin_micro_batch(self.global_step)  # the next micro-batch of this step, if any

    def before_optimizer_step(self, loss_scale: torch.Tensor | float | None = None) -> None:
        """Read gradients (sampled steps only): call once they are final, after ``scaler.unscale_(optimizer)``
        and before clipping. ``loss_scale``: the scale still in the gradients, if you did not unscale."""
        for monitor in self._heatmaps:
            monitor.before_backward()  # no forward between here and the optimizer step is a training forward
            monitor.before_optimizer_step(loss_scale)

    def skip(self) -> None:
        """The optimizer step of this block did not happen (e.g. ``GradScaler`` skipped it): no sample for it."""
        for monitor in self._heatmaps:
            monitor.skip_sample()

    def validation_end(self) -> None:
        """Your validation ended: lens monitors built with ``on_validation_end=True`` evaluate at the current step
        (once per step). Call on every rank, outside a :meth:`step` block."""
        if self._in_step:
            raise RuntimeError("Monitor.validation_end() is called between steps, not inside a step() block.")
        for lens in self._lenses:
            lens.validation_end(self.global_step)

    def state_dict(self) -> dict[str, Any]:
        """The monitors' histories and the step count, for your checkpoint."""
        return {"global_step": self.global_step, "monitors": [monitor.state_dict() for monitor in self.monitors]}

    def close(self) -> None:
        """Finish the last sample, write everything, remove hooks and close the writer. Call on every rank."""
        try:
            for monitor in self.monitors:
                monitor.end_training()
        finally:
            for monitor in self.monitors:
                monitor.close()
            self.context.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
