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
from lightning_heatmaps.distributed import (
    LocalSlice, distributed_world, global_shape, is_sharded_model, local_tensor, plan_slices, sum_over_ranks,
)
from lightning_heatmaps.layers import LayerMap, ModuleSelection, ParamRef
from lightning_heatmaps.reductions import GRADIENT_METRICS, squared_norms


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
            of the sampled optimizer step; copies the monitored weights on sampled steps) and
            ``weight_drift`` (``|W - W0| / |W0|`` against the weights when this ``fit`` started; keeps
            a copy of the monitored weights for the whole run).
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
        self._refs: list[ParamRef] = []
        self._slices: list[LocalSlice] = []
        self._ref_param: list[int] = []
        self._rows: dict[str, Tensor] = {}
        self._before: list[Tensor] | None = None
        self._initial: list[Tensor] | None = None
        self._initial_sumsq: Tensor | None = None
        self._ref_slot: Tensor | None = None
        self._ref_weight: Tensor | None = None
        self._sharded = False
        self._reads = False
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
            refs += trainable
            slots += [slot] * len(trainable)
        self._refs = refs
        self._counts = np.zeros(len(layer_map.components), dtype=np.int64)
        for ref, slot in zip(refs, slots):
            self._counts[slot] += ref.numel_of(global_shape(ref.param))
        keys: dict[tuple[int, str], int] = {}
        self._ref_param = [keys.setdefault((id(ref.module), ref.attribute), len(keys)) for ref in refs]
        self._param_refs = list({index: ref for ref, index in zip(refs, self._ref_param)}.values())
        # Sharded (FSDP2 / FSDP1): every rank reduces its own shard and one all-reduce adds them up.
        # Replicated (one process, DDP): gradients are the same everywhere, so rank zero reads alone.
        self._sharded = is_sharded_model(refs)
        self._reads = bool(refs) and (self._sharded or trainer.is_global_zero)
        if not self._reads:
            return
        self._slices = plan_slices(refs, distributed_world()) if self._sharded else [LocalSlice("view", ref) for ref in refs]
        device = local_tensor(refs[0].param).device
        self._ref_slot = torch.tensor(slots, device=device)
        weights = [piece.weight for piece in self._slices]
        self._ref_weight = None if all(w == 1.0 for w in weights) else torch.tensor(weights, device=device)

    @override
    def _describe(self) -> str:
        if not self.frozen:
            return ""
        return f" Frozen (no gradient, shown as missing): {', '.join(self.frozen[:16])}{', ...' if len(self.frozen) > 16 else ''}."

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After any checkpoint restore: the reference weights of weight_drift are those this fit starts from.
        if self._active and self._reads and "drift_sumsq" in self._statistics:
            self._initial = [local_tensor(param.detach()).clone() for param in self._current_params()]
            self._initial_sumsq = self._slot_sums(self._initial)

    @override
    def _detach(self) -> None:
        self._initial = self._before = None
        self._rows = {}

    def _current_params(self) -> list[Tensor]:
        """The monitored parameters as their modules hold them now (one per distinct parameter)."""
        return [ref.param for ref in self._param_refs]

    def _slot_sums(self, per_param: list[Tensor]) -> Tensor:
        """Per-slot sums of squares of this rank's share of each ref's slice of per-parameter local tensors."""
        assert self._ref_slot is not None
        per_ref = squared_norms([piece.take(per_param[index]) for piece, index in zip(self._slices, self._ref_param)])
        if self._ref_weight is not None:
            per_ref = per_ref * self._ref_weight
        sums = torch.zeros(len(self._counts), dtype=per_ref.dtype, device=per_ref.device)
        return sums.index_add_(0, self._ref_slot, per_ref)

    @override
    def _begin_sample(self, trainer: pl.Trainer) -> None:
        self._read = False
        self._rows = {}

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._sample_step is None or self._read or not self._active or not self._reads:
            return
        self._read = True
        params = self._current_params()
        weights = [local_tensor(param.detach()) for param in params]
        grads = [local_tensor(param.grad) if param.grad is not None else torch.zeros_like(weight)
                 for param, weight in zip(params, weights)]
        grad_sumsq = self._slot_sums(grads)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # The optimizer unscales inside step(): the gradients seen here still carry the loss scale.
            grad_sumsq = grad_sumsq / scaler._get_scale_async().to(grad_sumsq).square()
        self._rows["grad_sumsq"] = grad_sumsq
        if "weight_sumsq" in self._statistics:
            self._rows["weight_sumsq"] = self._slot_sums(weights)
        if "update_sumsq" in self._statistics:
            self._before = torch._foreach_mul(weights, 1.0)  # copies of the local shards, one grouped op

    @override
    def _collect(self, trainer: pl.Trainer) -> tuple[Tensor, np.ndarray] | None:
        if not self._read:
            return None
        weights = [local_tensor(param.detach()) for param in self._current_params()]
        if self._before is not None:
            self._rows["update_sumsq"] = self._slot_sums(torch._foreach_sub(weights, self._before))
            self._before = None
        if self._initial is not None:
            self._rows["drift_sumsq"] = self._slot_sums(torch._foreach_sub(weights, self._initial))
            self._rows["initial_sumsq"] = self._initial_sumsq
        rows, self._rows = self._rows, {}
        statistics = torch.stack([rows[name] for name in self._statistics])
        if self._sharded:
            statistics = sum_over_ranks(statistics)  # the sample's one collective; every rank joins
        return statistics, self._counts
