"""``ProbeHeatmap``: linear-probe score per layer x token position on a fixed labelled set.

The Lightning adapter: the measurement is :class:`~lightning_heatmaps.core.ProbeMonitor`, the hooks
:class:`~lightning_heatmaps.lens_base.LensCallback`'s.
"""

from __future__ import annotations

import torch  # noqa: F401 (the example below uses it)

from lightning_heatmaps.core.probe import SCORES, Position, ProbeMonitor
from lightning_heatmaps.lens_base import LensCallback

__all__ = ["SCORES", "Position", "ProbeHeatmap"]


class ProbeHeatmap(ProbeMonitor, LensCallback):
    """Linear-probe ROC-AUC (or accuracy) per layer x token position, evaluated during training.

    On a fixed labelled set (one binary label per example) the features are each layer's output at
    each selected position (only those positions are gathered, with forward hooks), or a chosen
    sublayer's input or output. One L2-regularised logistic regression per (layer, position) is fitted
    on a seeded, stratified train split of standardised features, all probes at once on the model's
    device, and scored on the held-out split: ROC-AUC by the Mann-Whitney statistic (colour scale
    [0.5, 1]), or accuracy (Orgad et al., ICLR 2025).

    Args:
        input_ids: ``(examples, tokens)`` tensor (right-padded, with ``attention_mask``), or lists of ids.
        labels: one 0/1 label per example; both classes must appear in both splits.
        positions: named positions, ``{name: indices or callable(ids) -> index}``.
        offsets: positions counted from the end of each example (``-1`` = its last token); non-negative
            offsets count from the start.
        attention_mask: ``(examples, tokens)`` of 1 for real tokens (with a tensor ``input_ids``).
        pad_token_id: id used to pad lists of ids.
        site: ``"residual"`` (each layer's output, default), a component (``"mlp.down"``: its output)
            or a component's input (``"mlp.down.input"``).
        score: ``"auc"`` (default) or ``"accuracy"``.
        train_fraction: share of each class used to fit the probes. c: scikit-learn's ``C``.
        seed: seeds the split. batch_size: examples per forward pass.
        forward: for models that are not Hugging Face models, ``(pl_module, ids, mask) -> Any`` running
            the model (the features are taken by hooks on its repeated blocks).
        every_n_steps, on_validation_end, capacity, history, first_layer_index, cmap, max_memory_mb:
            see :class:`~lightning_heatmaps.lens_base.LensCallback`.
        name: where this instance's tags and files live, instead of the metric's name: two instances in
            one Trainer (say two labellings) need distinct names, and get distinct checkpoint state.

    Example:
        >>> ids = torch.randint(0, 50, (40, 12))
        >>> callback = ProbeHeatmap(ids, labels=(ids[:, 3] < 25).long(), positions={"fourth": [3] * 40}, offsets=[-1])
    """
