"""``GradientMonitor`` (core of ``GradientHeatmap``): gradient and weight-update sizes per layer and component."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_heatmaps.core.monitor import HeatmapMonitor
from lightning_heatmaps.distributed import SlotSquares, global_shape, is_sharded_model, sum_over_ranks
from lightning_heatmaps.layers import LayerMap, ModuleSelection
from lightning_heatmaps.reductions import GRADIENT_METRICS
from lightning_heatmaps.snapshot import HostSnapshot


class GradientMonitor(HeatmapMonitor):
    """The measurement of :class:`lightning_heatmaps.GradientHeatmap`, driven by explicit events (no trainer).

    The same arguments as :class:`lightning_heatmaps.GradientHeatmap`; use it directly in a plain loop
    (:class:`lightning_heatmaps.loop.Monitor`) or through an adapter (Lightning, ``hf``, ``fabric``).

    Example:
        >>> monitor = GradientMonitor(every_n_steps=10)
        >>> monitor.every_n_steps
        10
    """

    METRICS = GRADIENT_METRICS
    STATISTICS = ("grad_sumsq", "weight_sumsq", "update_sumsq", "drift_sumsq", "initial_sumsq")

    def __init__(
        self,
        metrics: str | Sequence[str] = "grad_norm",
        every_n_steps: int | None = None,
        capacity: int = 256,
        history: str = "recent",
        render_every_n_samples: int = 10,
        min_render_interval_seconds: float = 60.0,
        modules: ModuleSelection | None = None,
        first_layer_index: int = 0,
        cmap: str = "viridis",
        log_scale: bool = True,
        color_limits: tuple[float, float] | None = None,
        per_component_images: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(
            metrics=metrics, every_n_steps=every_n_steps, capacity=capacity, history=history,
            render_every_n_samples=render_every_n_samples, min_render_interval_seconds=min_render_interval_seconds,
            modules=modules, first_layer_index=first_layer_index, cmap=cmap, log_scale=log_scale,
            color_limits=color_limits, per_component_images=per_component_images, name=name,
        )
        self._squares: SlotSquares | None = None
        self._rows: dict[str, Tensor] = {}
        self._before: HostSnapshot | None = None
        self._initial: HostSnapshot | None = None
        self._initial_sumsq: Tensor | None = None
        self._read = False
        self.frozen: list[str] = []

    def _attach(self, model: nn.Module, layer_map: LayerMap) -> None:
        # Frozen parameters (requires_grad=False) have no gradient: they are left out, and a component
        # with no trainable parameter is shown as missing (grey, NaN in npz, no scalar), never as 0.
        refs, slots, self.frozen = [], [], []
        for slot, component in enumerate(layer_map.components):
            trainable = [ref for ref in component.params if ref.param.requires_grad]
            if component.params and not trainable:
                self.frozen.append(f"{layer_map.layer_labels[component.layer]}/{component.name}")
                self._missing[self._slot_layer[slot], self._slot_component[slot]] = True
                self._frozen[self._slot_layer[slot], self._slot_component[slot]] = True
            refs += trainable
            slots += [slot] * len(trainable)
        self._counts = np.zeros(len(layer_map.components), dtype=np.int64)
        for ref, slot in zip(refs, slots):
            self._counts[slot] += ref.numel_of(global_shape(ref.param))
        # Sharded (FSDP2 / FSDP1): every rank reduces its own shard and one all-reduce adds them up.
        # Replicated (one process, DDP): gradients are the same everywhere, so rank zero reads alone
        # (no index and no copy of the initial weights elsewhere), unless sample listeners (SpikeAlert)
        # need the same values on every rank: then every rank reads its identical replica, with no collective.
        reads = bool(refs) and (self._context.is_global_zero or is_sharded_model(refs) or bool(self._listeners))
        self._squares = SlotSquares(refs, slots, len(layer_map.components)) if reads else None

    def _describe(self) -> str:
        if not self.frozen:
            return ""
        return f" Frozen (no gradient, shown as missing): {', '.join(self.frozen[:16])}{', ...' if len(self.frozen) > 16 else ''}."

    def _begin_training(self) -> None:
        # After any checkpoint restore: the reference weights of weight_drift are those this fit starts from.
        if self._squares is not None and "drift_sumsq" in self._statistics:
            weights = self._squares.local(lambda param: param.detach())
            self._initial_sumsq = self._squares.sums(weights)
            self._initial = HostSnapshot(weights)

    def _detach(self) -> None:
        self._initial = self._before = None
        self._rows = {}

    def _begin_sample(self) -> None:
        self._read = False
        self._rows = {}
        self._before = None

    def _read_gradients(self, loss_scale: Tensor | float | None) -> None:
        squares = self._squares
        if self._read or squares is None:
            return
        self._read = True
        weights = squares.local(lambda param: param.detach())
        grad_sumsq = squares.sums(squares.local(lambda param: param.grad))
        if loss_scale is not None:
            # The optimizer unscales inside step(): the gradients seen here still carry the loss scale.
            grad_sumsq = grad_sumsq / torch.as_tensor(loss_scale).to(grad_sumsq).square()
        self._rows["grad_sumsq"] = grad_sumsq
        if "weight_sumsq" in self._statistics:
            self._rows["weight_sumsq"] = squares.sums(weights)
        if "update_sumsq" in self._statistics:
            self._before = HostSnapshot(weights)  # host copies of the local shards, see snapshot.py

    def _collect(self) -> tuple[Tensor, np.ndarray] | None:
        if not self._read:
            return None
        squares = self._squares
        assert squares is not None
        weights = squares.local(lambda param: param.detach())
        # W - W_ref one parameter at a time, each reference streamed back from the host: the device holds
        # one parameter's difference at a time, never a copy of the model.
        if self._before is not None:
            before, self._before = self._before, None
            self._rows["update_sumsq"] = squares.streamed_sums(
                lambda index: before.change(index, weights[index], release=True))
        if self._initial is not None:
            initial = self._initial
            self._rows["drift_sumsq"] = squares.streamed_sums(lambda index: initial.change(index, weights[index]))
            self._rows["initial_sumsq"] = self._initial_sumsq
        rows, self._rows = self._rows, {}
        statistics = torch.stack([rows[name] for name in self._statistics])
        if squares.sharded:
            carried, taken = self._with_contributions(statistics)  # other consumers' values ride along
            statistics = self._take_contributions(sum_over_ranks(carried), len(statistics), taken)  # the one collective
        return statistics, self._counts
