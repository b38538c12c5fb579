"""Output sinks: where scalars, images and arrays go.

Each sink states what it takes (``takes_images``); :func:`sinks_for_trainer` decides once, on rank
zero only, which sinks a run gets:

- a :class:`~lightning.pytorch.loggers.TensorBoardLogger` gets scalars, images and a custom-scalars layout;
- any other logger gets scalars through ``log_metrics``, and images where it takes them (W&B);
- if no logger takes images, PNG files are written under ``<log_dir>/heatmaps``;
- with ``logger=False``, only the disk sink (and a warning from the callback).

Which thread calls a sink is decided here, once (:class:`RunOutputs`), by the sink's ``thread_safe``:

- thread-safe sinks (TensorBoard's ``SummaryWriter``, PNG files) are called from the background writer;
- every other Lightning logger (CSV, W&B, MLflow, Comet, Neptune, custom ones) is called on the training
  thread only, where Lightning itself calls it, so our calls and its ``save()``/``finalize()`` never
  interleave. Scalars reach it when a sample is ingested; images are drawn off-thread and handed over,
  and the training thread passes them on at its next batch end (or at the end of training).
"""

from __future__ import annotations

import os
import re
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.compat.proto.types_pb2 import DT_FLOAT, DT_STRING

from lightning_heatmaps._worker import BackgroundWriter
from lightning_heatmaps._ranks import rank_zero_warn
from lightning_heatmaps_tensorboard.metadata import ALERT_TAG, PLUGIN_NAME, alert_content, encode_alert
from lightning_heatmaps.render import rgb_to_png

if TYPE_CHECKING:  # Lightning is imported only where its loggers are used: the core imports this module
    from lightning.pytorch.loggers import Logger


class Sink:
    """Base sink: takes scalars, ignores what it cannot take.

    ``thread_safe``: whether the background writer thread may call it. ``False`` (the default) means it
    is called on the training thread only.
    """

    takes_images = False
    takes_matrices = False
    thread_safe = False

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write scalar values at ``step``."""

    def log_image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """Write an ``(H, W, 3)`` uint8 image at ``step``."""

    def log_matrices(self, matrices: Mapping[str, tuple[np.ndarray, bytes]], step: int) -> None:
        """Write ``{tag: (matrix, content)}`` at ``step`` for the HEATMAPS dashboard (content: its JSON metadata)."""

    def log_alert(self, record: Mapping[str, Any], step: int) -> None:
        """Write one spike alert (one ``alerts.jsonl`` object) at ``step`` for the dashboard; a no-op here."""

    def add_chart_layout(self, categories: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Declare charts grouping scalar tags (``{category: {chart: [tag regex, ...]}}``)."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Write a markdown text at ``step`` (TensorBoard's TEXT dashboard)."""

    def flush(self) -> None:
        """Make everything written so far durable."""


class TensorBoardSink(Sink):
    """A TensorBoard ``SummaryWriter``: scalars, images, the dashboard's matrices and a custom-scalars layout.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> import tempfile
        >>> sink = TensorBoardSink(SummaryWriter(tempfile.mkdtemp()))
        >>> sink.log_scalars({"grad_norm/layer_0/all": 1.0}, step=0)
    """

    takes_images = True
    takes_matrices = True
    # Safe off the training thread: SummaryWriter's EventFileWriter puts every event on a queue that its
    # own thread drains, guarded by a lock (tensorboard.summary.writer.event_file_writer._AsyncWriter),
    # so our events and Lightning's TensorBoardLogger events (same writer) never corrupt the file.
    thread_safe = True
    # One layout per writer, merged over every callback that writes to it: TensorBoard shows the last
    # layout written to a run, so each write must carry all categories.
    _layouts: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
    _layout_lock = threading.Lock()

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._described: set[str] = set()
        self._alerts_written = 0
        self._alert_step: int | None = None
        self._alerts_of_step: list[bytes] = []

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        # One event holding every value of the sample: ~20x less Python work than one add_scalar each,
        # which matters because this thread shares the GIL with the training loop.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])
        self.writer.file_writer.add_summary(summary, step)

    def log_image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, global_step=step, dataformats="HWC")

    def log_matrices(self, matrices: Mapping[str, tuple[np.ndarray, bytes]], step: int) -> None:
        # One event per sample, each matrix a float32 tensor summary of the dashboard's plugin. Its metadata
        # rides with a tag's first value only, as TensorFlow's summary ops do: TensorBoard (both data
        # servers) keeps the first metadata of a time series, and the labels would double every event.
        values = []
        for tag, (matrix, content) in matrices.items():
            array = np.ascontiguousarray(matrix, dtype="<f4")
            tensor = TensorProto(
                dtype=DT_FLOAT, tensor_content=array.tobytes(),
                tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=size) for size in array.shape]),
            )
            value = Summary.Value(tag=tag, tensor=tensor)
            if tag not in self._described:
                self._described.add(tag)
                value.metadata.CopyFrom(SummaryMetadata(
                    plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content),
                    data_class=DATA_CLASS_TENSOR,
                ))
            values.append(value)
        self.writer.file_writer.add_summary(Summary(value=values), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def log_alert(self, record: Mapping[str, Any], step: int) -> None:
        """Write ``record`` under the tag ``alerts`` of the dashboard's plugin (encoding: see
        :mod:`lightning_heatmaps_tensorboard.metadata`).

        Example:
            >>> from torch.utils.tensorboard import SummaryWriter
            >>> import tempfile
            >>> sink = TensorBoardSink(SummaryWriter(tempfile.mkdtemp()))
            >>> sink.log_alert({"step": 40, "signal": "loss", "value": 9.1, "baseline": 2.3, "z": 11.5, "layers": []}, step=40)
        """
        # A data provider keeps one value per step (the latest): a second alert at the same step is written
        # with the first in one tensor, which supersedes the one written before.
        if step != self._alert_step:
            self._alert_step, self._alerts_of_step = step, []
        self._alerts_written += 1
        self._alerts_of_step.append(encode_alert(record, self._alerts_written))
        tensor = TensorProto(dtype=DT_STRING, string_val=list(self._alerts_of_step),
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=len(self._alerts_of_step))]))
        value = Summary.Value(tag=ALERT_TAG, tensor=tensor)
        # The metadata rides with every alert: alerts are rare, and a writer shared by several sinks (one per
        # callback) has no single "first" alert.
        value.metadata.CopyFrom(SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=alert_content()),
            data_class=DATA_CLASS_TENSOR,
        ))
        self.writer.file_writer.add_summary(Summary(value=[value]), step)

    def add_chart_layout(self, categories: Mapping[str, Mapping[str, list[str]]]) -> None:
        with self._layout_lock:
            layout = self._layouts.setdefault(self.writer, {})
            for category, charts in categories.items():
                layout[category] = {chart: ["Multiline", list(tags)] for chart, tags in charts.items()}
            self.writer.add_custom_scalars(dict(layout))

    def flush(self) -> None:
        self.writer.flush()


class LoggerSink(Sink):
    """Any Lightning logger: scalars through ``log_metrics``; images where the logger takes them.

    Called on the training thread only (``thread_safe = False``). ``CSVLogger`` is not thread-safe (its
    ``save()`` iterates the rows another thread appends to), and neither are most third-party loggers.
    W&B's ``Run.log`` holds no lock either, so ``WandbLogger`` is treated the same way.
    """

    def __init__(self, logger: Logger) -> None:
        from lightning.pytorch.loggers import WandbLogger

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
    thread_safe = True  # its own files, written atomically

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


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_output_name(name: str | None) -> None:
    """Validate a callback's ``name`` argument.

    Example:
        >>> check_output_name("probe/1")
        Traceback (most recent call last):
        ...
        ValueError: Invalid value for name='probe/1': must be None or a non-empty string of letters, digits, '_', '.' and '-'.
    """
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise ValueError(
            f"Invalid value for name={name!r}: must be None or a non-empty string of letters, digits, '_', '.' and '-'."
        )


def check_distinct_outputs(trainer: Any, callback: Any) -> None:
    """Refuse two callbacks whose tags and files would overwrite each other's (same metric, no distinct name)."""
    mine = set(callback.output_names)
    for other in trainer.callbacks:
        shared = mine & set(getattr(other, "output_names", ())) if other is not callback else set()
        if shared:
            raise ValueError(
                f"{type(callback).__name__} and {type(other).__name__} would write the same tags and files "
                f"({', '.join(sorted(shared))}): give each a distinct `name=` (e.g. name='attention_only')."
            )


def sinks_for_trainer(trainer: Any, image_directory: str) -> list[Sink]:
    """The sinks for this process: none off rank zero; loggers' sinks, plus PNGs if no logger takes images."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return []
    sinks: list[Sink] = []
    for logger in trainer.loggers:
        sinks.append(TensorBoardSink(logger.experiment) if isinstance(logger, TensorBoardLogger) else LoggerSink(logger))
    if not any(sink.takes_images for sink in sinks):
        sinks.append(DiskSink(image_directory))
    return sinks


class RunOutputs:
    """Where one callback's results go, and from which thread each destination is called.

    Thread-safe sinks are called from the background writer; the others on the training thread only:
    scalars when :meth:`log_scalars` is called (from a training-thread hook), images through a hand-over
    queue that :meth:`deliver` empties (the callbacks call it at each batch end and before they close).
    A failing sink is reported once and never stops training.

    Example:
        >>> import tempfile
        >>> outputs = RunOutputs(tempfile.mkdtemp(), [DiskSink(tempfile.mkdtemp())], BackgroundWriter("example"))
        >>> outputs.submit(lambda: outputs.publish_image("m", "image", np.zeros((2, 2, 3), np.uint8), {"values": np.ones(1)}, 0))
        >>> outputs.close()
        >>> sorted(os.listdir(os.path.join(outputs.directory, "m")))
        ['image.npz']
    """

    def __init__(self, directory: str, sinks: list[Sink], writer: BackgroundWriter | None) -> None:
        self.directory = directory
        self.sinks = sinks
        self.writer = writer
        self._background = [sink for sink in sinks if sink.thread_safe]
        self._training = [sink for sink in sinks if not sink.thread_safe]
        self._handover: deque[Callable[[], None]] = deque()
        self.errors = 0

    @property
    def active(self) -> bool:
        """Whether this process writes (rank zero)."""
        return self.writer is not None

    def _guarded(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as error:  # a logger error never reaches the training loop
            self.errors += 1
            if self.errors == 1:
                name = self.writer.name if self.writer is not None else "lightning_heatmaps"
                rank_zero_warn(
                    f"{name}: writing heatmaps failed ({type(error).__name__}: {error}); training goes on. "
                    f"Later failures are counted, not reported.\n{traceback.format_exc(limit=4)}"
                )

    def submit(self, job: Callable[[], None], key: Any = None) -> None:
        """Run ``job`` on the background writer (rank zero only)."""
        if self.writer is not None:
            self.writer.submit(job, key=key)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Call from the training thread: other loggers now, thread-safe sinks from the background writer."""
        if self.writer is None:
            return
        values = dict(values)
        for sink in self._training:
            self._guarded(lambda sink=sink: sink.log_scalars(values, step))
        if self._background:
            sinks = self._background
            self.writer.submit(lambda: [sink.log_scalars(values, step) for sink in sinks])

    def log_matrices(self, matrices: Mapping[str, tuple[np.ndarray, bytes]], step: int) -> None:
        """Call from the training thread: the dashboard's matrices, written by the background writer (TensorBoard)."""
        sinks = [sink for sink in self._background if sink.takes_matrices]
        if self.writer is None or not sinks:
            return
        matrices = dict(matrices)
        self.writer.submit(lambda: [sink.log_matrices(matrices, step) for sink in sinks])

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Call from the training thread: a markdown text to the thread-safe sinks that take it (TensorBoard)."""
        sinks = list(self._background)
        self.submit(lambda: [sink.log_text(tag, text, step) for sink in sinks])

    def log_alert(self, record: Mapping[str, Any], step: int) -> None:
        """Call from the training thread: one spike alert (an ``alerts.jsonl`` object) for the dashboard,
        written by the background writer (TensorBoard), like :meth:`log_matrices`."""
        sinks = list(self._background)
        if self.writer is None or not sinks:
            return
        record = dict(record)

        def write() -> None:
            for sink in sinks:
                sink.log_alert(record, step)
                sink.flush()  # alerts are rare and wanted at once: make each durable now

        self.writer.submit(write)

    def add_chart_layout(self, categories: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Declare a custom-scalars layout (TensorBoard only, from the background writer)."""
        sinks = list(self._background)
        self.submit(lambda: [sink.add_chart_layout(categories) for sink in sinks])

    def publish_image(self, metric: str, name: str, rgb: np.ndarray, arrays: Mapping[str, Any], step: int) -> None:
        """Call from the background writer: image ``heatmaps/<metric>/<name>`` to every sink that takes images
        (handed over to the training thread for the sinks that must be called there), and the matrix behind
        it saved as ``<directory>/<metric>/<name>.npz``."""
        tag = f"heatmaps/{metric}/{name}"
        for sink in self._background:
            if sink.takes_images:
                sink.log_image(tag, rgb, step)
        for sink in self._training:
            if sink.takes_images:
                self._handover.append(lambda sink=sink: sink.log_image(tag, rgb, step))
        save_arrays(os.path.join(self.directory, metric, f"{name}.npz"), **arrays)

    def flush_background(self) -> None:
        """Call from the background writer, at the end of a job: make what thread-safe sinks got durable."""
        for sink in self._background:
            sink.flush()

    def deliver(self) -> None:
        """Call from the training thread: pass images handed over by the background writer to their loggers."""
        while self._handover:
            self._guarded(self._handover.popleft())

    def flush(self) -> None:
        """Call from the training thread: wait for the background writer, then deliver what it handed over."""
        if self.writer is not None:
            self.writer.flush()
        self.deliver()

    def close(self) -> None:
        """Call from the training thread, before Lightning finalizes its loggers: finish everything, then stop."""
        if self.writer is not None:
            self.writer.close()
        self.deliver()


def open_run_outputs(trainer: Any, owner: str) -> RunOutputs:
    """A callback's :class:`RunOutputs`: sinks and a background writer on rank zero, nothing elsewhere.

    Call on every rank (the log directory is broadcast). Warns once when the Trainer has no logger.
    """
    log_dir = trainer.log_dir or trainer.default_root_dir
    directory = os.path.join(log_dir, "heatmaps")
    sinks = sinks_for_trainer(trainer, directory)
    if not trainer.is_global_zero:
        return RunOutputs(directory, sinks, None)
    if not trainer.loggers:
        rank_zero_warn(
            f"{owner}: the Trainer has no logger (logger=False), so heatmaps go to disk only: "
            f"PNG and .npz files under {directory}."
        )
    return RunOutputs(directory, sinks, BackgroundWriter(owner))
