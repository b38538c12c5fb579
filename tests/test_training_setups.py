"""Real training setups: mixed precision, torch.compile, manual optimisation, interrupts, long runs, no syncs."""

import gc
import math
import os
import signal
import sys
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.overrides import TorchFunctionMode

import lightning_heatmaps
from lightning_heatmaps import ActivationHeatmap, GradientHeatmap

from conftest import (
    ReferenceGradients, TokenModel, make_trainer, read_events, scalar_series, tiny_llama, token_loader,
)


class Blocks(L.LightningModule):
    """Four residual MLP blocks on random vectors (fast enough for thousands of steps)."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(4))
        self.fused = fused

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x

    def training_step(self, batch, batch_idx):
        return (self(batch) - 1).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=self.fused or None)


def _vectors(count=64):
    return torch.utils.data.DataLoader(torch.randn(count, 16, generator=torch.Generator().manual_seed(0)), batch_size=8)


def _fit_blocks(path, model, callbacks, **kwargs):
    trainer = make_trainer(path, callbacks, max_steps=3, **kwargs)
    trainer.fit(model, _vectors())
    events = read_events(trainer.logger.log_dir)
    return {t: scalar_series(events, t) for t in events.Tags()["scalars"] if "/layer_" in t}


@pytest.mark.parametrize(
    ("name", "precision", "fused"),
    [
        ("bf16-mixed", "bf16-mixed", False),
        ("16-mixed with GradScaler", MixedPrecision("16-mixed", "cpu"), False),
        ("16-mixed, fused AdamW unscaling inside step()", MixedPrecision("16-mixed", "cpu"), True),
    ],
)
def test_mixed_precision_gradients_are_unscaled(tmp_path, name, precision, fused):
    torch.manual_seed(0)
    reference = _fit_blocks(tmp_path / "fp32", Blocks(), [GradientHeatmap(every_n_steps=1)])
    torch.manual_seed(0)
    kwargs = {"precision": precision} if isinstance(precision, str) else {"plugins": [precision]}
    mixed = _fit_blocks(tmp_path / "mixed", Blocks(fused=fused), [GradientHeatmap(every_n_steps=1)], **kwargs)
    if not isinstance(precision, str):
        assert precision.scaler is not None and precision.scaler.get_scale() > 1000  # a real loss scale was in play
    assert reference.keys() == mixed.keys() and len(reference) == 4 * 3
    for tag in reference:
        # bf16/fp16 rounding, never a factor of the loss scale (65536).
        assert mixed[tag][0] == pytest.approx(reference[tag][0], rel=0.05), (name, tag)


@pytest.mark.parametrize("what", ["blocks", "whole LightningModule"])
def test_torch_compile_matches_eager(tmp_path, what):
    torch.manual_seed(0)
    eager = _fit_blocks(tmp_path / "eager", Blocks(), [ActivationHeatmap(every_n_steps=1), GradientHeatmap(every_n_steps=1)])
    torch.manual_seed(0)
    compiled_model = Blocks()
    if what == "blocks":
        for index, block in enumerate(compiled_model.blocks):
            compiled_model.blocks[index] = torch.compile(block, backend="aot_eager")
    else:
        compiled_model = torch.compile(compiled_model, backend="aot_eager")
    compiled = _fit_blocks(tmp_path / "compiled", compiled_model,
                           [ActivationHeatmap(every_n_steps=1), GradientHeatmap(every_n_steps=1)])
    assert len(eager) == 2 * 4 * 3
    assert compiled.keys() == eager.keys()
    for tag in eager:
        assert compiled[tag] == pytest.approx(eager[tag], rel=1e-4), tag


class TwoOptimizers(L.LightningModule):
    """Manual optimisation: one optimizer for the first two blocks, one for the rest, stepped in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(4))

    def training_step(self, batch, batch_idx):
        x = batch
        for block in self.blocks:
            x = x + block(x)
        loss = (x - 1).square().mean()
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.blocks[:2].parameters(), lr=0.1), torch.optim.SGD(self.blocks[2:].parameters(), lr=0.1))


def test_manual_optimisation_with_two_optimizers(tmp_path):
    targets = {f"{layer}/{c}": [(f"blocks.{layer}.{c}.weight", lambda t: t), (f"blocks.{layer}.{c}.bias", lambda t: t)]
               for layer in range(4) for c in ("0", "2")}
    reference = ReferenceGradients(2, targets)
    callback = GradientHeatmap(every_n_steps=2, metrics=["grad_norm", "update_ratio"])
    trainer = make_trainer(tmp_path, [callback, reference], max_steps=8)
    trainer.fit(TwoOptimizers(), _vectors())
    events = read_events(trainer.logger.log_dir)
    # Each training step makes two optimizer steps: global_step goes 0, 2, 4, 6; every one is sampled.
    assert sorted(scalar_series(events, "grad_norm/layer_3/2")) == [0, 2, 4, 6]
    for key in targets:
        layer, component = key.split("/")
        for step in (0, 2, 4, 6):
            # Gradients of both optimizers are read before the first one steps...
            assert scalar_series(events, f"grad_norm/layer_{layer}/{component}")[step] == pytest.approx(
                math.sqrt(reference.grad_sq[step][key]), rel=1e-5)


class Interrupting(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            raise KeyboardInterrupt


def test_keyboard_interrupt_keeps_and_flushes_what_was_recorded(tmp_path):
    from lightning_heatmaps import LogitLensHeatmap

    callback = ActivationHeatmap(every_n_steps=1)
    lens = LogitLensHeatmap([[3, 4, 5]], every_n_steps=2)
    trainer = make_trainer(tmp_path, [callback, lens, Interrupting()], max_steps=20)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits with status 1
            trainer.fit(TokenModel(tiny_llama(2)), token_loader(batches=20))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert trainer.interrupted
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "activation_rms", "layer_x_step.npz"))
    assert saved["steps"].tolist() == [0, 1, 2, 3, 4]
    events = read_events(trainer.logger.log_dir)
    assert events.Images("heatmaps/activation_rms/layer_x_step")[-1].step == 4
    assert not any(h for h in callback._handles)  # hooks removed
    lens_history = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "logit_lens", "layer_x_step.npz"))
    assert lens_history["steps"].tolist() == [0, 2, 4]


class BrokenLogger(Logger):
    """A real logger whose every write fails (a full disk, a dropped connection...)."""

    name, version, calls = "broken", 0, 0

    def log_metrics(self, metrics, step=None):
        BrokenLogger.calls += 1
        raise OSError("no space left on device")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_sink_errors_are_reported_once_and_training_goes_on(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [GradientHeatmap(every_n_steps=1)], max_steps=6, logger=BrokenLogger())
        trainer.fit(Blocks(), _vectors())
    assert trainer.global_step == 6 and BrokenLogger.calls >= 6
    failures = [w for w in caught if "writing heatmaps failed" in str(w.message)]
    assert len(failures) == 1 and "no space left on device" in str(failures[0].message)


def _rss_mb():
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) / 1024 for line in file if line.startswith("VmRSS:"))


class MemoryProbe(Callback):
    def __init__(self):
        self.rss = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Every 250 steps from 1500: a single reading can land on a render's transient allocations,
        # so the test compares the lowest readings of two windows (what stays, not what passes).
        if trainer.global_step >= 1500 and trainer.global_step % 250 == 0:
            gc.collect()
            self.rss[trainer.global_step] = _rss_mb()

    def floor(self, first, last):
        return min(value for step, value in self.rss.items() if first <= step <= last)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_long_run_keeps_memory_flat(tmp_path):
    callbacks = [ActivationHeatmap(every_n_steps=1, capacity=64, min_render_interval_seconds=3),
                 GradientHeatmap(every_n_steps=1, capacity=64, min_render_interval_seconds=3)]
    probe = MemoryProbe()
    data = torch.utils.data.DataLoader(torch.randn(256, 16), batch_size=8)
    trainer = make_trainer(tmp_path, [*callbacks, probe], max_steps=5001, log_every_n_steps=1000)
    trainer.fit(Blocks(), data)
    assert all(len(buffer) == 64 for c in callbacks for buffer in c._buffers.values())
    assert probe.floor(4500, 5000) - probe.floor(1500, 2000) < 25, probe.rss  # MB; no growth with the number of samples
    events = read_events(trainer.logger.log_dir)
    assert len(scalar_series(events, "grad_norm/layer_3/all")) == 5001
    assert len(events.Tags()["scalars"]) == 2 * 4 * 3  # fixed by the model, not by the run's length
    print(f"RSS floor over steps 1500-2000: {probe.floor(1500, 2000):.1f} MB, 4500-5000: {probe.floor(4500, 5000):.1f} MB")


class HostReads(TorchFunctionMode):
    """Counts torch calls made from this package's code, by step (a real torch mechanism, no mock)."""

    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.package = os.path.dirname(lightning_heatmaps.__file__)
        self.step = None
        self.ops, self.reads = {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        for _ in range(12):
            if frame is None:
                break
            if frame.f_code.co_filename.startswith(self.package):
                name = getattr(func, "__name__", str(func))
                self.ops.setdefault(self.step, []).append(name)
                if name in self.READS:
                    self.reads.setdefault(self.step, []).append(name)
                break
            frame = frame.f_back
        return func(*args, **(kwargs or {}))


class StepMarker(Callback):
    def __init__(self, mode):
        self.mode = mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode.step = trainer.global_step


def test_no_work_and_no_host_reads_on_steps_that_are_not_sampled(tmp_path):
    mode = HostReads()
    callbacks = [StepMarker(mode), ActivationHeatmap(every_n_steps=4), GradientHeatmap(every_n_steps=4, metrics=["grad_norm", "update_ratio"])]
    trainer = make_trainer(tmp_path, callbacks, max_steps=12)
    with mode:
        trainer.fit(TokenModel(tiny_llama(2)), token_loader(batches=12))
    sampled = {0, 4, 8}
    unsampled_ops = {step: ops for step, ops in mode.ops.items() if step not in sampled and step is not None}
    assert unsampled_ops == {}  # not a single torch call from the callbacks on unsampled steps
    for step in sampled:
        assert mode.ops[step]  # ...while sampled steps do their work
        reads = mode.reads.get(step, [])
        assert [r for r in reads if r != "numpy"] == []  # no blocking reads
        assert reads.count("numpy") <= 2  # one host copy per callback per sample
