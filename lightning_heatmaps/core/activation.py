"""``ActivationMonitor`` (core of ``ActivationHeatmap``): what each layer's components output, layer x step and layer x component."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_heatmaps.core.monitor import HeatmapMonitor
from lightning_heatmaps.distributed import distributed_world, pool_over_ranks
from lightning_heatmaps.layers import Component, LayerMap, ModuleSelection
from lightning_heatmaps.reductions import ACTIVATION_METRICS, activation_partials, pool_partials


class ActivationMonitor(HeatmapMonitor):
    """The measurement of :class:`lightning_heatmaps.ActivationHeatmap`, driven by explicit events (no trainer).

    The same arguments as :class:`lightning_heatmaps.ActivationHeatmap`; use it directly in a plain loop
    (:class:`lightning_heatmaps.loop.Monitor`) or through an adapter (Lightning, ``hf``, ``fabric``).

    Example:
        >>> monitor = ActivationMonitor(every_n_steps=10)
        >>> monitor.every_n_steps
        10
    """

    METRICS = ACTIVATION_METRICS
    STATISTICS = ("sumsq", "sumabs", "maxabs", "nonzero")

    def __init__(
        self,
        metrics: str | Sequence[str] = "rms",
        every_n_steps: int | None = None,
        capacity: int = 256,
        history: str = "recent",
        render_every_n_samples: int = 10,
        min_render_interval_seconds: float = 60.0,
        modules: ModuleSelection | None = None,
        first_layer_index: int = 0,
        cmap: str = "viridis",
        log_scale: bool = False,
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
        self._handles: list[Any] = []
        self.unobservable: list[str] = []
        self._calls: list[list[list[Tensor]]] = []
        self._counts = np.zeros(0, dtype=np.int64)

    def _attach(self, model: nn.Module, layer_map: LayerMap) -> None:
        by_module: dict[int, tuple[torch.nn.Module, list[tuple[int, Component]]]] = {}
        self.unobservable = []
        for slot, component in enumerate(layer_map.components):
            if component.activation is None:  # e.g. experts fused into one 3-D parameter: no output to hook
                self.unobservable.append(f"{layer_map.layer_labels[component.layer]}/{component.name}")
                self._missing[self._slot_layer[slot], self._slot_component[slot]] = True
                continue
            for module in component.hooked_modules:
                by_module.setdefault(id(module), (module, []))[1].append((slot, component))
        self._handles = [
            module.register_forward_hook(self._hook_for(entries), with_kwargs=True)
            for module, entries in by_module.values()
        ]
        self._calls = [[] for _ in layer_map.components]
        self._counts = np.zeros(len(layer_map.components), dtype=np.int64)

    def _describe(self) -> str:
        if not self.unobservable:
            return ""
        shown = ", ".join(self.unobservable[:12]) + (", ..." if len(self.unobservable) > 12 else "")
        return f" No hookable output (shown as missing): {shown}."

    def _hook_for(self, entries: list[tuple[int, Component]]) -> Any:
        statistics = self._statistics

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._collecting:
                return
            for slot, component in entries:
                activation = component.activation(args, kwargs, output)
                if activation is None:
                    continue
                activation = activation.detach()
                self._calls[slot].append(activation_partials(activation, statistics))
                self._counts[slot] += activation.numel()

        return hook

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._collecting = False

    def _begin_sample(self) -> None:
        self._calls = [[] for _ in self._calls]
        self._counts[:] = 0

    def _collect(self) -> tuple[Tensor, np.ndarray | None] | None:
        self._collecting = False
        calls = max((len(slot_calls) for slot_calls in self._calls), default=0)
        if calls == 0:
            return None
        example = next(slot_calls[0] for slot_calls in self._calls if slot_calls)
        rows = []
        for index, statistic in enumerate(self._statistics):
            zero = None
            flat: list[Tensor] = []
            for slot_calls in self._calls:
                flat += [call[index] for call in slot_calls]
                if len(slot_calls) < calls:  # a module that ran fewer times: pad with a neutral zero
                    zero = torch.zeros((), dtype=example[index].dtype, device=example[index].device) if zero is None else zero
                    flat += [zero] * (calls - len(slot_calls))
            rows.append(pool_partials(torch.stack(flat).view(len(self._calls), calls), statistic))
        self._calls = [[] for _ in self._calls]
        statistics, counts = torch.stack(rows), self._counts.copy()
        if distributed_world() > 1:
            # Every rank joins: the statistics and element counts of all ranks, summed (max for maxabs)
            # with one collective, are those of the global batch. Counts ride along as the last row.
            counts_row = torch.as_tensor(counts, dtype=statistics.dtype).to(statistics.device)
            maxed = [i for i, name in enumerate(self._statistics) if name == "maxabs"]
            rows = torch.cat([statistics, counts_row[None]])
            carried, taken = self._with_contributions(rows)  # other consumers' values ride along, summed
            return self._take_contributions(pool_over_ranks(carried, maxed), len(rows), taken), None
        return statistics, counts
