"""``ActivationHeatmap``: what each layer's components output, layer x step and layer x component.

The Lightning adapter: the measurement is :class:`~lightning_heatmaps.core.ActivationMonitor`, the hooks
:class:`~lightning_heatmaps.base.HeatmapCallback`'s.
"""

from __future__ import annotations

from lightning_heatmaps.base import HeatmapCallback
from lightning_heatmaps.core.activation import ActivationMonitor

__all__ = ["ActivationHeatmap"]


class ActivationHeatmap(ActivationMonitor, HeatmapCallback):
    """Heatmaps of a reduction of every component's output during sampled training steps.

    With DDP or FSDP, every rank computes its statistics and they are pooled over ranks on sampled
    steps with one collective (sums of squares, sums and element counts added, maxima taken), so the
    values are those of the global batch; only rank zero writes.

    A sample is taken for the optimizer step that starts when ``trainer.global_step % every_n_steps
    == 0`` and logged at that step. Only training forwards count; with gradient accumulation the
    micro-batches of the sampled step are pooled exactly; forwards re-run by activation
    checkpointing (during backward) are not counted. Forward hooks are registered once at setup,
    return at once on steps that are not sampled, and are removed at teardown.

    Args:
        metrics: one or more of ``rms`` (default, tag ``activation_rms``), ``l2``, ``mean_abs``,
            ``max_abs``, ``zero_fraction`` (fraction of exact zeros).
        every_n_steps: sample period in optimizer steps (default: the Trainer's ``log_every_n_steps``).
        capacity: samples kept in the layer x step history.
        history: ``"recent"`` (the last ``capacity`` samples) or ``"whole_run"`` (the whole run,
            thinned evenly to fit ``capacity``).
        render_every_n_samples: images are drawn every this many samples (and at the end of training)...
        min_render_interval_seconds: ...but not more often than this (drawing costs tens of ms of CPU).
        modules: ``None`` (automatic), ``{regex: component}`` or a callable
            ``(name, module) -> (layer, component) | None``; see :func:`~lightning_heatmaps.resolve_layers`.
        first_layer_index: number of the first layer in labels and tags (0 or 1).
        cmap: matplotlib colour map. log_scale: logarithmic colour scale.
        color_limits: fixed ``(vmin, vmax)`` so colours are comparable over time.
        per_component_images: also draw one layer x step image per component.
        name: puts this instance's outputs under ``<name>/`` (tags ``<name>/activation_rms/...``, images
            ``heatmaps/<name>/activation_rms/...``): needed to tell apart two instances with a common metric,
            e.g. with different ``modules``. Letters, digits, ``_``, ``.`` and ``-``.

    Example:
        >>> import lightning
        >>> trainer = lightning.Trainer(callbacks=[ActivationHeatmap(every_n_steps=50)])
    """
