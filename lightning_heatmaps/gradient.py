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
from lightning_heatmaps.layers import LayerMap, ModuleSelection, ParamRef, iter_unique_params
from lightning_heatmaps.reductions import GRADIENT_METRICS, squared_norms


class GradientHeatmap(HeatmapCallback):
    """Heatmaps of gradient and update sizes of every component, read before the optimizer steps.

    Gradients are read in ``on_before_optimizer_step``: after gradient accumulation and after AMP
    unscaling (for optimizers that unscale inside ``step()``, e.g. fused Adam, the loss scale is
    divided out on the device). Fused projections (GPT-2's ``c_attn``, GPT-NeoX's
    ``query_key_value``, ``nn.MultiheadAttention``'s ``in_proj_weight``) are split into q, k and v.
    With several optimizers, gradients are read when the first of them steps.

    Args:
        metrics: one or more of ``grad_norm`` (default; L2 over weight and bias), ``grad_rms``,
            ``grad_to_weight`` (``|g| / |w|``), ``update_ratio`` (``|W_after - W_before| / |W_before|``
            of the sampled optimizer step; copies the monitored weights on sampled steps) and
            ``weight_drift`` (``|W - W0| / |W0|`` against the weights when this ``fit`` started; keeps
            a copy of the monitored weights for the whole run).
        every_n_steps, capacity, history, render_every_n_samples, min_render_interval_seconds, modules,
        first_layer_index, cmap, color_limits, per_component_images: as in
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
    ) -> None:
        super().__init__(
            metrics, every_n_steps, capacity, history, render_every_n_samples, min_render_interval_seconds,
            modules, first_layer_index, cmap, log_scale, color_limits, per_component_images,
        )
        self._refs: list[ParamRef] = []
        self._params: list[torch.nn.Parameter] = []
        self._rows: dict[str, Tensor] = {}
        self._before: list[Tensor] | None = None
        self._initial: list[Tensor] | None = None
        self._ref_slot: Tensor | None = None
        self._read = False

    @override
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer_map: LayerMap) -> None:
        self._refs = [ref for component in layer_map.components for ref in component.params]
        self._slots_of_refs = [slot for slot, component in enumerate(layer_map.components) for _ in component.params]
        self._counts = np.array([sum(ref.numel for ref in c.params) for c in layer_map.components], dtype=np.int64)
        self._params = list(iter_unique_params(layer_map))
        position = {id(param): index for index, param in enumerate(self._params)}
        self._ref_param = [position[id(ref.param)] for ref in self._refs]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or not trainer.is_global_zero:
            return  # only rank zero reads gradients: no index, and no copy of the initial weights, elsewhere
        device = self._params[0].device  # the model is on its device by now
        self._ref_slot = torch.tensor(self._slots_of_refs, device=device)
        if "drift_sumsq" in self._statistics:
            self._initial = [param.detach().clone() for param in self._params]
            self._initial_sumsq = self._slot_sums(self._views(self._initial))

    @override
    def _detach(self) -> None:
        self._initial = self._before = None
        self._rows = {}

    def _views(self, tensors: list[Tensor]) -> Tensor:
        """Squared norms, one per ref, of the refs' slices of per-parameter ``tensors``."""
        return squared_norms([ref.view(tensors[index]) for ref, index in zip(self._refs, self._ref_param)])

    def _slot_sums(self, per_ref: Tensor) -> Tensor:
        assert self._ref_slot is not None
        sums = torch.zeros(len(self._counts), dtype=per_ref.dtype, device=per_ref.device)
        return sums.index_add_(0, self._ref_slot, per_ref)

    @override
    def _begin_sample(self, trainer: pl.Trainer) -> None:
        self._read = False
        self._rows = {}

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._sample_step is None or self._read or not self._active or not trainer.is_global_zero:
            return  # gradients are identical on every rank after DDP's all-reduce: rank zero reads them
        self._read = True
        weights = [param.detach() for param in self._params]
        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in self._params]
        grad_sumsq = self._slot_sums(self._views(grads))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # The optimizer unscales inside step(): the gradients seen here still carry the loss scale.
            grad_sumsq = grad_sumsq / scaler._get_scale_async().to(grad_sumsq).square()
        self._rows["grad_sumsq"] = grad_sumsq
        if "weight_sumsq" in self._statistics:
            self._rows["weight_sumsq"] = self._slot_sums(self._views(weights))
        if "update_sumsq" in self._statistics:
            self._before = torch._foreach_mul(weights, 1.0)  # copies, one grouped op

    @override
    def _collect(self, trainer: pl.Trainer) -> tuple[Tensor, np.ndarray] | None:
        if not self._read:
            return None
        weights = [param.detach() for param in self._params]
        if self._before is not None:
            self._rows["update_sumsq"] = self._slot_sums(self._views(torch._foreach_sub(weights, self._before)))
            self._before = None
        if self._initial is not None:
            self._rows["drift_sumsq"] = self._slot_sums(self._views(torch._foreach_sub(weights, self._initial)))
            self._rows["initial_sumsq"] = self._initial_sumsq
        rows, self._rows = self._rows, {}
        return torch.stack([rows[name] for name in self._statistics]), self._counts
