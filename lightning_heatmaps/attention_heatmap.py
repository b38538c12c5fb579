"""``AttentionHeatmap``: layer x head max attention logit and entropy, and the output logits' log Z and max.

The Lightning adapter: the measurement is :class:`~lightning_heatmaps.core.attention.AttentionMonitor`, the hooks
:class:`~lightning_heatmaps.base.HeatmapCallback`'s (plus the attention implementations checked at ``setup``).
"""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override

from lightning_heatmaps.attention_sites import check_attention_implementations
from lightning_heatmaps.base import HeatmapCallback
from lightning_heatmaps.core.attention import AttentionMonitor, output_logit_statistics

__all__ = ["AttentionHeatmap", "output_logit_statistics"]


class AttentionHeatmap(AttentionMonitor, HeatmapCallback):
    """Layer x head heatmaps of the largest attention logit and of the attention entropy, sampled like the others.

    ``max_logit``: per layer and head, the largest pre-softmax score ``scale * q.k`` of the sampled step's
    training forward, over batch rows, non-padding queries and the keys each query may see (causal,
    sliding-window and padding masks as the model applies them), with the model's own scale, before
    soft-capping. ``entropy``: the mean over non-padding query rows of the entropy (natural log) of the
    attention distribution the model used (after mask, soft-cap and softmax, before dropout). A layer's
    ``all`` column is the max over heads (``max_logit``) and the row-weighted mean over heads (``entropy``).
    Encoder-decoder models get one row per self attention and one per cross attention (``dec_xattn.0``).

    Also logged per sample, for language models: ``<prefix>output_logits/log_z_mean`` (mean ``logsumexp`` of
    the LM head's logits over non-padding positions, what z-loss controls) and ``<prefix>output_logits/max_abs``.

    Seen through: Hugging Face models with ``attn_implementation`` ``eager``, ``sdpa``, ``flex_attention``,
    ``flash_attention_2`` or ``flash_attention_3`` (a wrapped attention function in transformers'
    ``AttentionInterface``, set only during sampled forwards; a flex ``BlockMask`` is read element by element;
    FlashAttention's unpadding and packing are rebuilt from its arguments), ``nn.MultiheadAttention`` (a forward pre-hook recomputing q
    and k), and other models calling ``torch.nn.functional.scaled_dot_product_attention`` from a stack of
    repeated blocks. Other implementations (hub kernels, custom functions) are refused at setup. Nothing
    is installed on unsampled steps.

    Cost of a sampled step: q and k are multiplied once more, in float32 under ``no_grad``, a chunk of query
    rows at a time (at most ``chunk_bytes`` of logits, default 64 MiB, and about four times that at peak).

    Args:
        metrics: ``max_logit`` and/or ``entropy`` (default both).
        query_stride: measure every ``query_stride``-th query row only (default 1: all rows, exact).
            ``max_logit`` is then a lower bound of the exact value, ``entropy`` an estimate of the mean.
        num_heads: heads per attention call, for plain SDPA models where no module says it.
        output_logits: also log the output-logit scalars (default ``True``; needs ``get_output_embeddings``).
        chunk_bytes: float32 logits formed at once (memory bound).
        every_n_steps, capacity, history, render_every_n_samples, min_render_interval_seconds,
        first_layer_index, cmap, log_scale, color_limits, per_component_images, name: as in
            :class:`~lightning_heatmaps.ActivationHeatmap`.

    Example:
        >>> import lightning
        >>> trainer = lightning.Trainer(callbacks=[AttentionHeatmap(every_n_steps=50)])
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_attention_implementations(pl_module, type(self).__name__)
