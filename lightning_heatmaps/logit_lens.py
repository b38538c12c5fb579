"""``LogitLensHeatmap``: how far each layer's decoded prediction is from the final one, token x layer.

The Lightning adapter: the measurement is :class:`~lightning_heatmaps.core.LogitLensMonitor`, the hooks
:class:`~lightning_heatmaps.lens_base.LensCallback`'s.
"""

from __future__ import annotations

from lightning_heatmaps.core.logit_lens import LogitLensMonitor
from lightning_heatmaps.lens_base import LensCallback

__all__ = ["LogitLensHeatmap"]


class LogitLensHeatmap(LogitLensMonitor, LensCallback):
    """Logit-lens divergence per token x layer for fixed probe texts, evaluated during training.

    For token ``t`` and layer ``l``: ``p_{t,l} = softmax(unembed(final_norm(h_{t,l})))`` and the cell is
    ``JSD(p_{t,L} || p_{t,l})`` in bits (in ``[0, 1]``), computed in fp32 in log space, chunked over
    tokens. The reference ``p_{t,L}`` is the model's own output distribution (Hugging Face's last
    hidden state is already final-normed and is not normalised twice). Per token, the *settling depth*
    is the first layer whose divergence is below ``settle_threshold``; tokens that settle only in the
    last ``deep_fraction`` of the layers are *deep-thinking* tokens (Chen et al., 2026).

    Args:
        prompts: one text, a list of texts (needs ``tokenizer``), or token ids (a 1-D tensor, a list of
            them, or lists of ints).
        tokenizer: a Hugging Face tokenizer or a callable ``str -> ids``; also labels the tokens.
        token_labels: labels per prompt instead of the tokenizer's.
        divergence: ``jsd`` (default), ``kl`` (both in bits) or ``top1`` (agreement with the final argmax).
        settle_threshold: divergence under which a token counts as settled (default 0.5).
        deep_fraction: the last fraction of layers that makes a token "deep-thinking" (default 0.15).
        hidden_states: for models that are not Hugging Face causal LMs, a callable
            ``(pl_module, ids[1, T]) -> [layer outputs, each (1, T, width)]``; the reference is then
            ``decoder(last layer output)``.
        decoder: a callable from a hidden state to logits (final norm and unembedding), replacing the
            automatically found ``final_norm`` and ``get_output_embeddings()``. Under FSDP2, a decoder that
            uses the model's parameters must be an ``nn.Module`` of the model (its units are gathered
            around each decode); a plain function reading sharded parameters fails (DTensor mixed with tensors),
            and its evaluations are skipped with a warning.
        chunk_tokens: tokens decoded at a time (bounds the ``tokens x vocabulary`` memory).
        every_n_steps, on_validation_end, capacity, history, first_layer_index, cmap, max_memory_mb:
            see :class:`~lightning_heatmaps.lens_base.LensCallback`.
        name: where this instance's tags and files live, instead of the metric's name: two instances in
            one Trainer (say two labellings) need distinct names, and get distinct checkpoint state.

    Example:
        >>> callback = LogitLensHeatmap([[1, 2, 3, 4]], every_n_steps=100)
    """
