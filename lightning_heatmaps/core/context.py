"""What a monitor needs to know about the run it measures, whatever trainer drives it.

A :class:`RunContext` is built by an adapter (Lightning, Hugging Face ``Trainer``, Fabric, a plain loop)
from its framework's objects, once, when training starts. The core reads nothing else about the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_heatmaps._ranks import process_rank, rank_zero_info, rank_zero_warn

__all__ = ["RunContext", "process_rank", "rank_zero_info", "rank_zero_warn"]


@dataclass
class RunContext:
    """The run a monitor is attached to, as its adapter describes it.

    Attributes:
        is_global_zero: whether this process writes (rank zero). Every rank measures and joins collectives.
        open_outputs: ``open_outputs(owner)`` -> the :class:`~lightning_heatmaps.sinks.RunOutputs` one monitor
            writes through (on ranks other than zero: one that writes nothing).
        default_every_n_steps: the sample period of monitors built with ``every_n_steps=None``.
        trainer: the name of the driving trainer, for messages (``Lightning``, ``Trainer``, ``Fabric``, ``loop``).
        extra: adapter-specific facts (e.g. the writer :meth:`for_directory` opened).
        info: how a one-line report reaches the user (default: the ``lightning_heatmaps`` logger on rank zero;
            the Lightning adapter passes Lightning's ``rank_zero_info``, so the report appears where Lightning's do).
        device: the device this rank computes on (where a monitor allocates its sample tensors); ``None``:
            the device of the model's first parameter.

    Example:
        >>> import tempfile
        >>> context = RunContext.for_directory(tempfile.mkdtemp())
        >>> context.is_global_zero
        True
    """

    is_global_zero: bool
    open_outputs: Callable[[str], Any]
    default_every_n_steps: int = 50
    trainer: str = "loop"
    extra: dict[str, Any] = field(default_factory=dict)
    device: Any = None
    info: Callable[[str], None] = rank_zero_info

    @classmethod
    def for_directory(
        cls, log_dir: str, writer: Any = None, default_every_n_steps: int = 50, trainer: str = "loop",
        files_dir: str | None = None,
    ) -> RunContext:
        """A context writing into the TensorBoard run ``log_dir`` on rank zero.

        ``writer``: a ``torch.utils.tensorboard.SummaryWriter`` already writing into ``log_dir`` (reused, so a
        directory never gets two writers); ``None`` opens one, shared by every monitor of this context and closed by
        :meth:`close`. ``.npz`` files go under ``files_dir`` (default ``<log_dir>/heatmaps``).
        """
        from lightning_heatmaps._worker import BackgroundWriter
        from lightning_heatmaps.sinks import RunOutputs, TensorBoardSink

        is_zero = process_rank() == 0
        directory = files_dir or os.path.join(log_dir, "heatmaps")
        holder: dict[str, Any] = {"writer": writer, "owned": False}

        def open_outputs(owner: str) -> RunOutputs:
            if not is_zero:
                return RunOutputs(directory, [], None)
            if holder["writer"] is None:
                from torch.utils.tensorboard import SummaryWriter

                holder["writer"], holder["owned"] = SummaryWriter(log_dir), True
            return RunOutputs(directory, [TensorBoardSink(holder["writer"])], BackgroundWriter(owner))

        return cls(is_zero, open_outputs, default_every_n_steps, trainer, {"writer_holder": holder, "log_dir": log_dir})

    def close(self) -> None:
        """Close the ``SummaryWriter`` :meth:`for_directory` opened (call after the monitors' ``close``)."""
        holder = self.extra.get("writer_holder")
        if holder and holder["owned"] and holder["writer"] is not None:
            holder["writer"].close()
            holder["writer"], holder["owned"] = None, False
