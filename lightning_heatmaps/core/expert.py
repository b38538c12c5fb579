"""``ExpertMonitor`` (core of ``ExpertHeatmap``): layer x expert heatmaps of a mixture-of-experts model (routing share and expert gradients)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_heatmaps.core.monitor import HeatmapMonitor
from lightning_heatmaps.distributed import SlotSquares, distributed_world, global_shape, sum_over_ranks
from lightning_heatmaps.layers import Component, FusedPart, LayerMap, ParamRef, find_config, resolve_layers
from lightning_heatmaps.reductions import EXPERT_METRICS


def resolve_experts(model: nn.Module, first_layer_index: int = 0) -> tuple[LayerMap, list[nn.Module], list[Any]]:
    """Layers with experts, as a :class:`LayerMap` whose components are the experts (``0``, ``1``, ...).

    Returns ``(layer map, one router module per layer, each layer's top-k)``.
    Each expert component holds that expert's slice of every expert parameter (3-D ``[experts, ...]``
    parameters, transformers 5) or the parameters of its module (a ``ModuleList`` of experts).

    Raises:
        ValueError: the model has no mixture-of-experts layer.
    """
    blocks = resolve_layers(model, first_layer_index=first_layer_index)
    labels: list[str] = []
    components: list[Component] = []
    routers: list[nn.Module] = []
    top_k: list[int] = []
    config = find_config(model)
    for layer, label in enumerate(blocks.layer_labels):
        in_layer = [c for c in blocks.components if c.layer == layer]
        router = next((c for c in in_layer if c.name == "mlp.router"), None)
        experts = [c for c in in_layer if c.name.startswith("mlp.experts.")]
        if router is None or not experts:
            continue
        index = len(labels)
        labels.append(label)
        routers.append(router.module)
        fused = [c for c in experts if c.activation is None]
        if fused:  # one container, 3-D parameters [experts, ...]
            container = fused[0].module
            count = next(p.shape[0] for p in container.parameters(recurse=False) if p.dim() == 3)
            for expert in range(count):
                refs = tuple(ParamRef(f"{ref.name}[{expert}]", ref.module, ref.attribute, 0, FusedPart((1,) * count, expert))
                             for ref in {(r.module, r.attribute): r for c in fused for r in c.params}.values())
                components.append(Component(index, str(expert), fused[0].module_name, container, refs, None))
        else:  # a ModuleList of expert modules: group the parameters by the expert number in their names
            by_expert: dict[int, list[ParamRef]] = {}
            for component in experts:
                for ref in component.params:
                    found = re.search(r"(?:^|\.)experts\.(\d+)\.", ref.name)
                    if found:
                        by_expert.setdefault(int(found.group(1)), []).append(ref)
            for expert, refs in sorted(by_expert.items()):
                components.append(Component(index, str(expert), refs[0].name, refs[0].module, tuple(refs), None))
        block_top_k = getattr(router.module, "top_k", None) or getattr(config, "num_experts_per_tok", None) or 2
        top_k.append(int(block_top_k))
    if not components:
        raise ValueError(f"ExpertHeatmap found no mixture-of-experts layer (a router and experts) in {type(model).__name__}.")
    names = sorted({c.name for c in components}, key=int)
    return LayerMap(components, labels, names, blocks.architecture), routers, top_k


class ExpertMonitor(HeatmapMonitor):
    """The measurement of :class:`lightning_heatmaps.ExpertHeatmap`, driven by explicit events (no trainer).

    The same arguments as :class:`lightning_heatmaps.ExpertHeatmap`; use it directly in a plain loop
    (:class:`lightning_heatmaps.loop.Monitor`) or through an adapter (Lightning, ``hf``, ``fabric``).

    Example:
        >>> monitor = ExpertMonitor(every_n_steps=10)
        >>> monitor.every_n_steps
        10
    """

    METRICS = EXPERT_METRICS
    STATISTICS = ("routed", "tokens", "grad_sumsq")
    COLUMN_AXIS = "expert"

    def __init__(
        self,
        metrics: str | Sequence[str] = ("token_share", "grad_norm"),
        every_n_steps: int | None = None,
        capacity: int = 256,
        history: str = "recent",
        render_every_n_samples: int = 10,
        min_render_interval_seconds: float = 60.0,
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
            modules=None, first_layer_index=first_layer_index, cmap=cmap, log_scale=log_scale,
            color_limits=color_limits, per_component_images=per_component_images, name=name,
        )
        self._handles: list[Any] = []
        self._squares: SlotSquares  # planned at fit start
        self._routed: list[tuple[int, Tensor, Tensor]] = []
        self._read = False
        self._grad_sumsq: Tensor | None = None

    def _resolve(self, model: nn.Module) -> LayerMap:
        layer_map, self._routers, self._top_k = resolve_experts(model, self.first_layer_index)
        return layer_map

    def _attach(self, model: nn.Module, layer_map: LayerMap) -> None:
        self._experts = len(layer_map.component_names)
        self._slot_of = {(c.layer, int(c.name)): slot for slot, c in enumerate(layer_map.components)}
        self._counts = np.array([sum(ref.numel_of(global_shape(ref.param)) for ref in c.params) for c in layer_map.components])
        self._world = distributed_world()
        # Every rank reads its share and one all-reduce adds them up (the routing counts need it anyway): a
        # replicated (DDP) value counts 1/world on each rank, a sharded (FSDP) one is each rank's own shard.
        slots = [slot for slot, component in enumerate(layer_map.components) for _ in component.params]
        refs = [ref for component in layer_map.components for ref in component.params]
        self._squares = SlotSquares(refs, slots, len(layer_map.components), replicated_weight=1.0 / self._world)
        self._handles = [router.register_forward_hook(self._router_hook(layer)) for layer, router in enumerate(self._routers)]

    def _router_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._collecting:
                return
            if isinstance(output, tuple) and len(output) >= 3 and isinstance(output[2], Tensor):
                chosen = output[2]  # transformers 5 routers return (logits, weights, indices)
            else:
                logits = output[0] if isinstance(output, tuple) else output
                chosen = torch.topk(logits.detach(), self._top_k[layer], dim=-1).indices
            chosen = chosen.detach().reshape(-1, chosen.shape[-1])
            counts = torch.bincount(chosen.flatten(), minlength=self._experts)[: self._experts].to(torch.float32)
            tokens = torch.full((self._experts,), float(chosen.shape[0]), device=counts.device)
            self._routed.append((layer, counts, tokens))

        return hook

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._collecting = False

    def _begin_sample(self) -> None:
        self._routed, self._read, self._grad_sumsq = [], False, None

    def _read_gradients(self, loss_scale: Tensor | float | None) -> None:
        if self._read or "grad_sumsq" not in self._statistics:
            return
        self._read = True
        self._grad_sumsq = self._squares.sums(self._squares.local(lambda param: param.grad))

    def _collect(self) -> tuple[Tensor, np.ndarray] | None:
        self._collecting = False
        slots, device = len(self._counts), self._squares.device
        routed = torch.zeros(slots, device=device)
        tokens = torch.zeros(slots, device=device)
        for layer, counts, layer_tokens in self._routed:
            first = self._slot_of[(layer, 0)]
            routed[first : first + self._experts] += counts.to(device)
            tokens[first : first + self._experts] += layer_tokens.to(device)
        rows = {"routed": routed, "tokens": tokens,
                "grad_sumsq": self._grad_sumsq if self._grad_sumsq is not None else torch.zeros(slots, device=device)}
        statistics = torch.stack([rows[name] for name in self._statistics])
        if self._world > 1:
            carried, taken = self._with_contributions(statistics)  # other consumers' values ride along
            statistics = self._take_contributions(sum_over_ranks(carried), len(statistics), taken)  # the one collective
        return statistics, self._counts.copy()
