"""``ExpertHeatmap``: layer x expert heatmaps of a mixture-of-experts model (routing share and expert gradients).

The Lightning adapter: the measurement is :class:`~lightning_heatmaps.core.ExpertMonitor`, the hooks
:class:`~lightning_heatmaps.base.HeatmapCallback`'s.
"""

from __future__ import annotations

from lightning_heatmaps.base import HeatmapCallback
from lightning_heatmaps.core.expert import ExpertMonitor, resolve_experts

__all__ = ["ExpertHeatmap", "resolve_experts"]


class ExpertHeatmap(ExpertMonitor, HeatmapCallback):
    """Layer x expert heatmaps of a mixture-of-experts model, sampled like the other core callbacks.

    ``token_share``: per layer and expert, the share of the sampled step's tokens routed to that expert
    (one token routed to its top ``k`` experts counts once for each, so a layer's row sums to ``k``;
    uniform routing gives ``k / experts``). ``grad_norm``: each expert's gradient norm over all its
    parameters (gate, up, down), read before the optimizer steps. Both pool exactly over micro-batches
    and ranks. The ``all`` column is, for ``grad_norm``, the norm over every expert of the layer and, for
    ``token_share``, the mean share per expert (``k / experts`` by construction). Works for experts stored as 3-D parameters (transformers 5) and as a
    ``ModuleList`` of expert modules.

    Args:
        metrics: ``token_share`` and/or ``grad_norm`` (default both).
        every_n_steps, capacity, history, render_every_n_samples, min_render_interval_seconds,
        first_layer_index, cmap, log_scale, color_limits, per_component_images, name: as in
            :class:`~lightning_heatmaps.ActivationHeatmap`.

    Example:
        >>> import lightning
        >>> trainer = lightning.Trainer(callbacks=[ExpertHeatmap(every_n_steps=50)])
    """
