"""``GradientHeatmap``: gradient and weight-update sizes per layer and component.

The Lightning adapter: the measurement is :class:`~lightning_heatmaps.core.GradientMonitor`, the hooks
:class:`~lightning_heatmaps.base.HeatmapCallback`'s.
"""

from __future__ import annotations

from lightning_heatmaps.base import HeatmapCallback
from lightning_heatmaps.core.gradient import GradientMonitor

__all__ = ["GradientHeatmap"]


class GradientHeatmap(GradientMonitor, HeatmapCallback):
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
