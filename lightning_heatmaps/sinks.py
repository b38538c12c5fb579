"""Output sinks: where scalars, images and arrays go.

Each sink states what it takes (``takes_images``); :func:`sinks_for_trainer` decides once, on rank
zero only, which sinks a run gets:

- a :class:`~lightning.pytorch.loggers.TensorBoardLogger` gets scalars, images and a custom-scalars layout;
- any other logger gets scalars through ``log_metrics``, and images where it takes them (W&B);
- if no logger takes images, PNG files are written under ``<log_dir>/heatmaps``;
- with ``logger=False``, only the disk sink (and a warning from the callback).

Sinks are called from the background writer thread only.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from tensorboard.compat.proto.summary_pb2 import Summary

from lightning_heatmaps._worker import BackgroundWriter
from lightning_heatmaps.render import rgb_to_png


class Sink:
    """Base sink: takes scalars, ignores what it cannot take."""

    takes_images = False

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write scalar values at ``step``."""

    def log_image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """Write an ``(H, W, 3)`` uint8 image at ``step``."""

    def add_chart_layout(self, categories: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Declare charts grouping scalar tags (``{category: {chart: [tag regex, ...]}}``)."""

    def flush(self) -> None:
        """Make everything written so far durable."""


class TensorBoardSink(Sink):
    """A TensorBoard ``SummaryWriter``: scalars, images and a custom-scalars layout.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> import tempfile
        >>> sink = TensorBoardSink(SummaryWriter(tempfile.mkdtemp()))
        >>> sink.log_scalars({"grad_norm/layer_0/all": 1.0}, step=0)
    """

    takes_images = True
    # One layout per writer, merged over every callback that writes to it: TensorBoard shows the last
    # layout written to a run, so each write must carry all categories.
    _layouts: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
    _layout_lock = threading.Lock()

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        # One event holding every value of the sample: ~20x less Python work than one add_scalar each,
        # which matters because this thread shares the GIL with the training loop.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])
        self.writer.file_writer.add_summary(summary, step)

    def log_image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, global_step=step, dataformats="HWC")

    def add_chart_layout(self, categories: Mapping[str, Mapping[str, list[str]]]) -> None:
        with self._layout_lock:
            layout = self._layouts.setdefault(self.writer, {})
            for category, charts in categories.items():
                layout[category] = {chart: ["Multiline", list(tags)] for chart, tags in charts.items()}
            self.writer.add_custom_scalars(dict(layout))

    def flush(self) -> None:
        self.writer.flush()


class LoggerSink(Sink):
    """Any Lightning logger: scalars through ``log_metrics``; images where the logger takes them."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.takes_images = isinstance(logger, WandbLogger)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics(dict(values), step=step)

    def log_image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        if self.takes_images:
            self.logger.log_image(key=tag, images=[rgb], step=step)


class DiskSink(Sink):
    """PNG files: ``<directory>/<tag>/step_<step>.png`` (tags' ``heatmaps/`` prefix dropped)."""

    takes_images = True

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def log_image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        relative = re.sub(r"^heatmaps/", "", tag)
        path = os.path.join(self.directory, *relative.split("/"), f"step_{step:09d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as file:
            file.write(rgb_to_png(rgb))
        os.replace(path + ".tmp", path)


def save_arrays(path: str, **arrays: Any) -> None:
    """Write ``arrays`` to ``path`` as ``.npz``, atomically (a reader never sees half a file).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "m.npz")
        >>> save_arrays(path, values=np.ones(2))
        >>> np.load(path)["values"].tolist()
        [1.0, 1.0]
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def publish_image(sinks: list[Sink], directory: str, metric: str, name: str, rgb: np.ndarray,
                  arrays: Mapping[str, Any], step: int) -> None:
    """Send image ``heatmaps/<metric>/<name>`` to every sink that takes images, and save the matrix behind
    it as ``<directory>/<metric>/<name>.npz``."""
    for sink in sinks:
        if sink.takes_images:
            sink.log_image(f"heatmaps/{metric}/{name}", rgb, step)
    save_arrays(os.path.join(directory, metric, f"{name}.npz"), **arrays)


def sinks_for_trainer(trainer: Any, image_directory: str) -> list[Sink]:
    """The sinks for this process: none off rank zero; loggers' sinks, plus PNGs if no logger takes images."""
    if not trainer.is_global_zero:
        return []
    sinks: list[Sink] = []
    for logger in trainer.loggers:
        sinks.append(TensorBoardSink(logger.experiment) if isinstance(logger, TensorBoardLogger) else LoggerSink(logger))
    if not any(sink.takes_images for sink in sinks):
        sinks.append(DiskSink(image_directory))
    return sinks


def open_run_outputs(trainer: Any, owner: str) -> tuple[str, list[Sink], BackgroundWriter | None]:
    """``(directory, sinks, writer)`` for a callback's run: the writer exists on rank zero only.

    Call on every rank (the log directory is broadcast). Warns once when the Trainer has no logger.
    """
    log_dir = trainer.log_dir or trainer.default_root_dir
    directory = os.path.join(log_dir, "heatmaps")
    sinks = sinks_for_trainer(trainer, directory)
    if not trainer.is_global_zero:
        return directory, sinks, None
    if not trainer.loggers:
        rank_zero_warn(
            f"{owner}: the Trainer has no logger (logger=False), so heatmaps go to disk only: "
            f"PNG and .npz files under {directory}."
        )
    return directory, sinks, BackgroundWriter(owner)
