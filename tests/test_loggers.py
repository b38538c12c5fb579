"""Real loggers, sampled every step while the model logs every step: no crash, no lost row, the same numbers.

``CSVLogger`` is not thread-safe: called from the background writer while Lightning's own ``save()`` runs,
it crashed runs (``dict contains fields not in fieldnames``). Loggers other than TensorBoard are called on
the training thread only; TensorBoard's ``SummaryWriter`` is safe from the background writer.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import threading

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, LogitLensHeatmap
from lightning_heatmaps.sinks import DiskSink, LoggerSink, TensorBoardSink

from conftest import TokenModel, make_trainer, read_events, scalar_series, tiny_llama, token_loader

STEPS = 40
PREFIXES = ("activation_rms/", "grad_norm/", "logit_lens/")


class LoggingModel(TokenModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss


def _fit(root, loggers, steps: int = STEPS):
    torch.manual_seed(0)
    callbacks = [
        ActivationHeatmap(every_n_steps=1, render_every_n_samples=5, min_render_interval_seconds=0),
        GradientHeatmap(every_n_steps=1),
        LogitLensHeatmap([[3, 4, 5, 6]], every_n_steps=4),
    ]
    trainer = make_trainer(root, callbacks, max_steps=steps, logger=loggers)
    trainer.fit(LoggingModel(tiny_llama(2)), token_loader(batches=steps))
    assert trainer.global_step == steps
    return trainer


def _csv_series(path: str) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key.startswith(PREFIXES) and value not in ("", None):
                    assert int(row["step"]) not in series.setdefault(key, {}), (key, row["step"])  # no duplicate rows
                    series[key][int(row["step"])] = float(value)
    return series


def _tensorboard_series(log_dir: str, prefixes: tuple[str, ...] = PREFIXES) -> dict[str, dict[int, float]]:
    events = read_events(log_dir)
    return {tag: scalar_series(events, tag) for tag in events.Tags()["scalars"] if tag.startswith(prefixes)}


def _wandb_history(run_file: str) -> list[dict[str, str]]:
    """History rows of an offline W&B run, read from its ``.wandb`` file (LevelDB log format of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as file:
        data = file.read()
    assert data[:4] == b":W&B"
    block, position, chunks, rows = 32768, 7, [], []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += block - position % block
            continue
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def _assert_same(actual: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    assert sorted(actual) == sorted(expected)
    for tag, values in expected.items():
        assert sorted(actual[tag]) == sorted(values), tag
        for step, value in values.items():
            assert actual[tag][step] == pytest.approx(value, rel=1e-6, nan_ok=True), (tag, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A TensorBoard + CSV run: what TensorBoard recorded, and the CSV file beside it."""
    root = tmp_path_factory.mktemp("tensorboard_and_csv")
    trainer = _fit(root, [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv", flush_logs_every_n_steps=1)])
    tensorboard = _tensorboard_series(trainer.loggers[0].log_dir)
    csv_path = os.path.join(trainer.loggers[1].log_dir, "metrics.csv")
    return tensorboard, csv_path


def test_tensorboard_and_csv_get_every_sample(reference):
    tensorboard, csv_path = reference
    assert len(tensorboard["grad_norm/layer_0/all"]) == STEPS
    assert sorted(tensorboard["logit_lens/layer_0/mean_divergence"]) == list(range(0, STEPS + 1, 4))
    _assert_same(_csv_series(csv_path), tensorboard)


def test_csv_logger_alone(tmp_path, reference):
    trainer = _fit(tmp_path, CSVLogger(tmp_path, flush_logs_every_n_steps=1))
    _assert_same(_csv_series(os.path.join(trainer.logger.log_dir, "metrics.csv")), reference[0])
    assert glob.glob(f"{trainer.logger.log_dir}/heatmaps/activation_rms/layer_x_step/step_*.png")  # no image logger: PNGs


def test_wandb_offline_gets_scalars_and_images(tmp_path, reference, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    _fit(tmp_path, WandbLogger(save_dir=str(tmp_path), offline=True))
    (run_file,) = glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    series: dict[str, dict[int, float]] = {}
    for row in _wandb_history(run_file):
        for key, value in row.items():
            if key.startswith(PREFIXES):
                series.setdefault(key, {})[int(json.loads(row["trainer/global_step"]))] = float(json.loads(value))
    _assert_same(series, reference[0])
    media = os.path.join(os.path.dirname(run_file), "files", "media", "images", "heatmaps")
    for image in ("activation_rms/layer_x_step", "grad_norm/layer_x_component", "logit_lens/prompt_0"):
        assert glob.glob(f"{media}/{image}_*.png"), image


class ThreadRecordingCSVLogger(CSVLogger):
    """A real CSVLogger that notes which thread calls it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: set[str] = set()

    def log_metrics(self, metrics, step=None):
        if any(key.startswith(PREFIXES) for key in metrics):
            self.threads.add(threading.current_thread().name)
        super().log_metrics(metrics, step)


def test_other_loggers_are_called_on_the_training_thread_only(tmp_path):
    logger = ThreadRecordingCSVLogger(tmp_path)
    _fit(tmp_path, logger, steps=6)
    assert logger.threads == {threading.current_thread().name}


def test_only_tensorboard_and_disk_are_called_off_the_training_thread(tmp_path):
    assert TensorBoardSink.thread_safe and DiskSink.thread_safe
    assert not LoggerSink(CSVLogger(tmp_path)).thread_safe


def test_summary_writer_takes_events_from_several_threads(tmp_path):
    """Why TensorBoard may be called off-thread: SummaryWriter queues events under a lock (its own thread writes)."""
    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer)

    def write(name):
        for step in range(300):
            sink.log_scalars({f"{name}/a": step, f"{name}/b": -step}, step)

    threads = [threading.Thread(target=write, args=(f"thread{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for step in range(300):
        writer.add_scalar("main", step, step)  # what Lightning's TensorBoardLogger does meanwhile
    for thread in threads:
        thread.join()
    writer.close()
    series = _tensorboard_series(str(tmp_path), prefixes=("",))
    assert series["main"] == {step: step for step in range(300)}
    for i in range(3):
        assert series[f"thread{i}/b"] == {step: -step for step in range(300)}
