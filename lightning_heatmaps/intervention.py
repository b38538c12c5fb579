"""``InterventionHeatmap``: how much each layer's subject, attention edge and last token matter, layer x site.

The Lightning adapter: the measurement is :class:`~lightning_heatmaps.core.InterventionMonitor`, the hooks
:class:`~lightning_heatmaps.lens_base.LensCallback`'s.
"""

from __future__ import annotations

from lightning_heatmaps.core.intervention import ATTENTION_NAMES, BLOCKABLE, InterventionMonitor
from lightning_heatmaps.lens_base import LensCallback

__all__ = ["ATTENTION_NAMES", "BLOCKABLE", "InterventionHeatmap"]


class InterventionHeatmap(InterventionMonitor, LensCallback):
    """Output divergence when a layer's subject tokens, subject-to-last attention edges or last token
    are corrupted: a layer x {Subj., Attn., Last.} heatmap (Geva et al., 2023; Cheang et al., 2025).

    For each prompt (with its subject span) and each layer ``l``: *Subj.* corrupts the subject tokens'
    hidden states at the output of layer ``l``; *Last.* corrupts the last token's; *Attn.* blocks
    attention from the subject tokens to the last token in the ``window`` layers centred on ``l``.
    The cell is the JSD in bits between the clean and the intervened next-token distribution at the
    last position, averaged over prompts. All ``3 L`` interventions of a prompt run in one batch with
    the clean run. Attention edges are blocked with an explicit mask, which eager and SDPA attention
    honour; other attention implementations (flash-attention) are refused at setup.

    Args:
        prompts: texts (with ``tokenizer``) or token ids, as for :class:`~lightning_heatmaps.LogitLensHeatmap`.
        subject_spans: per prompt, ``(start, end)`` token indices of the subject (end exclusive); the
            subject must end before the last token.
        tokenizer: turns text prompts into ids.
        corruption: ``"noise"`` (default: add Gaussian noise of ``noise_scale`` times the standard
            deviation of the prompt's input embeddings, seeded, as in causal tracing), ``"zero"`` or
            ``"mean"`` (the clean run's mean state of that layer over the prompt's tokens).
        noise_scale: noise size in embedding standard deviations (default 3).
        window: how many layers' attention edges are blocked around each layer ``l`` (default 9; 0 blocks
            none): layers ``l - window // 2`` to ``l + (window - 1) // 2``, so an even window takes its extra
            layer before ``l`` (``window=2`` blocks ``l - 1`` and ``l``), clipped at the first and last layer.
        seed: seeds the noise (the same noise at every evaluation, so evaluations are comparable).
        every_n_steps, on_validation_end, capacity, history, first_layer_index, cmap, max_memory_mb:
            see :class:`~lightning_heatmaps.lens_base.LensCallback`.
        name: where this instance's tags and files live, instead of the metric's name: two instances in
            one Trainer (say two labellings) need distinct names, and get distinct checkpoint state.

    Example:
        >>> callback = InterventionHeatmap([[5, 6, 7, 8, 9]], subject_spans=[(1, 3)])
    """
