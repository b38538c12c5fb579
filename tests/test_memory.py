"""Memory of update_ratio and weight_drift: reference copies off the accelerator, compared one parameter at a time.

What is honestly testable without a GPU: that the streamed comparison gives the very numbers of a whole-model
subtraction (bit for bit), that the callback's values still equal an independent reference, and, with torch's
own profiler counting torch's CPU allocations, that comparing with the references after the optimizer step
allocates at most one parameter's worth (a whole-model difference allocated the model's worth). The last
test checks the accelerator-side bound itself and runs only where CUDA exists.
"""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_heatmaps import GradientHeatmap
from lightning_heatmaps.distributed import SlotSquares
from lightning_heatmaps.layers import resolve_layers
from lightning_heatmaps.snapshot import HostSnapshot

from conftest import ReferenceGradients, make_trainer, read_events, scalar_series, tiny_gpt2, tiny_llama

WIDTH, LAYERS = 128, 6
NAMES = ("q", "k", "v", "o")
MODULES = {rf"blocks\.(?P<layer>\d+)\.{name}$": f"attn.{name}" for name in NAMES}
PARAM_BYTES = WIDTH * WIDTH * 4  # every monitored parameter: one 128 x 128 fp32 weight (64 KiB)


class Blocks(L.LightningModule):
    """LAYERS blocks of four equal bias-free projections: the model is 24 times its largest parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(WIDTH, WIDTH, bias=False) for name in NAMES}) for _ in range(LAYERS)
        )

    def training_step(self, batch, batch_idx):
        x = batch
        for block in self.blocks:
            x = torch.tanh(block["o"](block["q"](x) * torch.sigmoid(block["k"](x)) + block["v"](x)))
        return x.square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def vectors(batches=8):
    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(torch.randn(batches * 4, WIDTH, generator=generator), batch_size=4)


def squares_of(model):
    layer_map = resolve_layers(model)
    refs = [ref for component in layer_map.components for ref in component.params]
    slots = [slot for slot, component in enumerate(layer_map.components) for _ in component.params]
    return SlotSquares(refs, slots, len(layer_map.components))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-fused-qkv"])
def test_streamed_change_equals_whole_model_difference_bit_for_bit(build):
    model = build(2)
    squares = squares_of(model)
    weights = squares.local(lambda param: param.detach())
    copies = [weight.clone() for weight in weights]
    once, kept = HostSnapshot(weights), HostSnapshot(weights)
    model(input_ids=torch.randint(0, 48, (2, 8)), labels=torch.randint(0, 48, (2, 8))).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    expected = squares.sums(torch._foreach_sub(weights, copies))  # what a whole device-side copy gave
    assert expected.min() > 0
    streamed = squares.streamed_sums(lambda index: once.change(index, weights[index], release=True))
    assert torch.equal(streamed, expected)
    assert once.nbytes == 0  # every host copy released as it was compared
    for _ in range(2):  # a kept snapshot (weight_drift) compares again and again, unchanged
        assert torch.equal(squares.streamed_sums(lambda index: kept.change(index, weights[index])), expected)
    assert kept.nbytes == sum(weight.numel() * weight.element_size() for weight in weights)


def test_change_refuses_a_released_or_mismatched_tensor():
    snapshot = HostSnapshot([torch.zeros(3)])
    with pytest.raises(ValueError, match=r"current \(shape \(2,\), torch.float32\): must match snapshot 0 \(shape \(3,\)"):
        snapshot.change(0, torch.zeros(2))
    with pytest.raises(ValueError, match=r"current \(shape \(3,\), torch.float64\): must match snapshot 0"):
        snapshot.change(0, torch.zeros(3, dtype=torch.float64))
    snapshot.change(0, torch.ones(3), release=True)
    with pytest.raises(ValueError, match=r"index=0: that snapshot was released"):
        snapshot.change(0, torch.ones(3))


def test_update_ratio_and_weight_drift_equal_an_independent_reference(tmp_path):
    targets = {f"{layer}/attn.{name}": [(f"blocks.{layer}.{name}.weight", lambda t: t)] for layer in (0, 5) for name in NAMES}
    targets["3/all"] = [(f"blocks.3.{name}.weight", lambda t: t) for name in NAMES]
    reference = ReferenceGradients(1, targets)
    heatmap = GradientHeatmap(metrics=["update_ratio", "weight_drift"], every_n_steps=1, modules=MODULES)
    trainer = make_trainer(tmp_path, [heatmap, reference], max_steps=4)
    trainer.fit(Blocks(), vectors())
    events = read_events(trainer.logger.log_dir)
    for key in targets:
        layer, component = key.split("/")
        for step in range(4):
            weight = reference.weight_sq[step][key]
            update = scalar_series(events, f"update_ratio/layer_{layer}/{component}")[step]
            drift = scalar_series(events, f"weight_drift/layer_{layer}/{component}")[step]
            assert update == pytest.approx(math.sqrt(reference.update_sq[step][key] / weight), rel=1e-5), (key, step)
            assert drift == pytest.approx(math.sqrt(reference.drift_sq[step][key] / reference.initial_sq[key]), rel=1e-5)
            assert drift > 0 and update > 0


class AllocationWindow(Callback):
    """Peak bytes that torch allocates on the CPU (above the window's start) in the callbacks listed between
    a ``start`` and a ``stop`` window, during ``on_train_batch_end`` (where a sample is collected).

    Measured with torch's profiler (``profile_memory``): each event carries the bytes it allocated (+) or freed (-).
    """

    def __init__(self, role: str, shared: dict) -> None:
        self.role, self.shared = role, shared

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.role == "start":
            self.shared["profiler"] = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.shared["profiler"].start()
            return
        profiler = self.shared.pop("profiler")
        profiler.stop()
        running, peak = 0, 0
        for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
            running += event.self_cpu_memory_usage
            peak = max(peak, running)
        self.shared.setdefault("peaks", []).append(peak)


def test_comparing_with_the_references_allocates_one_parameter_at_a_time(tmp_path):
    shared = {}
    heatmap = GradientHeatmap(metrics=["update_ratio", "weight_drift"], every_n_steps=1, modules=MODULES,
                              render_every_n_samples=1000)
    trainer = make_trainer(tmp_path, [AllocationWindow("start", shared), heatmap, AllocationWindow("stop", shared)],
                           max_steps=4)
    trainer.fit(Blocks(), vectors())
    monitored = LAYERS * len(NAMES) * PARAM_BYTES
    assert len(shared["peaks"]) == 4  # one window per sampled step
    # update_ratio's difference is written into its released host copy (no allocation on the CPU); weight_drift's
    # needs one parameter's tensor at a time. A whole-model difference allocates `monitored` bytes (24 parameters).
    # The 16 KiB is for the sample's small statistics tensors.
    for peak in shared["peaks"]:
        assert 0 < peak <= PARAM_BYTES + 16 * 1024 < monitored / 8, shared["peaks"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the accelerator-side bound needs CUDA")
def test_cuda_memory_above_training_is_at_most_one_parameter(tmp_path):
    peaks = {}

    class CudaWindow(Callback):
        def __init__(self, role):
            self.role = role

        def _window(self, hook):
            if self.role == "start":
                torch.cuda.synchronize()
                peaks["start"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                torch.cuda.synchronize()
                peaks.setdefault(hook, []).append(torch.cuda.max_memory_allocated() - peaks["start"])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._window("snapshot")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._window("compare")

    heatmap = GradientHeatmap(metrics=["update_ratio", "weight_drift"], every_n_steps=1, modules=MODULES)
    trainer = make_trainer(tmp_path, [CudaWindow("start"), heatmap, CudaWindow("stop")], max_steps=4,
                           accelerator="cuda")
    trainer.fit(Blocks(), vectors())
    assert max(peaks["snapshot"]) <= 16 * 1024, peaks  # the copies go to pinned host memory
    assert max(peaks["compare"][1:]) <= PARAM_BYTES + 16 * 1024, peaks
