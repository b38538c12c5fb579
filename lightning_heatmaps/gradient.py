"""``GradientHeatmap``: gradient and weight-update sizes per layer and component."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_heatmaps.base import HeatmapCallback
from lightning_heatmaps.distributed import SlotSquares, global_shape, is_sharded_model, sum_over_ranks
from lightning_heatmaps.layers import LayerMap, ModuleSelection
from lightning_heatmaps.reductions import GRADIENT_METRICS
from lightning_heatmaps.snapshot import HostSnapshot


class GradientHeatmap(HeatmapCallback):
    """Heatmaps of gradient and update sizes of every component, read before the optimizer steps.

    Gradients are read in ``on_before_optimizer_step``: after gradient accumulation and after AMP
    unscaling (for optimizers that unscale inside ``step()``, e.g. fused Adam, the loss scale is
    divided out on the device). Sharded models (FSDP2 ``fully_shard``, FSDP1 with ``use_orig_params``)
    are read shard by shard on every rank and added up with one all-reduce per sample; frozen parameters
    are left out, and a component with none trainable is shown as missing. Fused projections (GPT-2's ``c_attn``, GPT-NeoX's
    ``query_key_value``, ``nn.MultiheadAttention``'s ``in_proj_weight``) are split into q, k and v.
    With several optimizers, gradients are read when the first of them steps.

    Args:
        metrics: one or more of ``grad_norm`` (default; L2 over weight and bias), ``grad_rms``,
            ``grad_to_weight`` (``|g| / |w|``), ``update_ratio`` (``|W_after - W_before| / |W_before|``
            of the sampled optimizer step; copies the monitored weights to host memory on sampled steps) and
            ``weight_drift`` (``|W - W0| / |W0|`` against the weights when this ``fit`` started; keeps
            a host copy of the monitored weights for the whole run). The copies live in host memory (pinned
            under CUDA) and are compared one parameter at a time, so the accelerator holds at most one
            parameter's difference extra (see the README's Memory table); under sharding each rank keeps
            its own shards only.
        every_n_steps, capacity, history, render_every_n_samples, min_render_interval_seconds, modules,
        first_layer_index, cmap, color_limits, per_component_images, name: as in
            :class:`~lightning_heatmaps.ActivationHeatmap`.
        log_scale: logarithmic colour scale, on by default: gradient sizes span orders of magnitude
            over a run, and a linear scale lets the first steps wash out the rest.

    Example:
        >>> import lightning
        >>> trainer = lightning.Trainer(callbacks=[GradientHeatmap(metrics=["grad_norm", "update_ratio"])])
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
            metrics, every_n_steps, capacity, history, render_every_n_samples, min_render_interval_seconds,
            modules, first_layer_index, cmap, log_scale, color_limits, per_component_images, name,
        )
        self._squares: SlotSquares | None = None
        self._rows: dict[str, Tensor] = {}
        self._before: HostSnapshot | None = None
        self._initial: HostSnapshot | None = None
        self._initial_sumsq: Tensor | None = None
        self._read = False
        self.frozen: list[str] = []

    @override
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer_map: LayerMap) -> None:
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
        reads = bool(refs) and (trainer.is_global_zero or is_sharded_model(refs) or bool(self._listeners))
        self._squares = SlotSquares(refs, slots, len(layer_map.components)) if reads else None

    @override
    def _describe(self) -> str:
        if not self.frozen:
            return ""
        return f" Frozen (no gradient, shown as missing): {', '.join(self.frozen[:16])}{', ...' if len(self.frozen) > 16 else ''}."

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After any checkpoint restore: the reference weights of weight_drift are those this fit starts from.
        if self._active and self._squares is not None and "drift_sumsq" in self._statistics:
            weights = self._squares.local(lambda param: param.detach())
            self._initial_sumsq = self._squares.sums(weights)
            self._initial = HostSnapshot(weights)

    @override
    def _detach(self) -> None:
        self._initial = self._before = None
        self._rows = {}

    @override
    def _begin_sample(self, trainer: pl.Trainer) -> None:
        self._read = False
        self._rows = {}

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        squares = self._squares
        if self._sample_step is None or self._read or not self._active or squares is None:
            return
        self._read = True
        weights = squares.local(lambda param: param.detach())
        grad_sumsq = squares.sums(squares.local(lambda param: param.grad))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # The optimizer unscales inside step(): the gradients seen here still carry the loss scale.
            grad_sumsq = grad_sumsq / scaler._get_scale_async().to(grad_sumsq).square()
        self._rows["grad_sumsq"] = grad_sumsq
        if "weight_sumsq" in self._statistics:
            self._rows["weight_sumsq"] = squares.sums(weights)
        if "update_sumsq" in self._statistics:
            self._before = HostSnapshot(weights)  # host copies of the local shards, see snapshot.py

    @override
    def _collect(self, trainer: pl.Trainer) -> tuple[Tensor, np.ndarray] | None:
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
