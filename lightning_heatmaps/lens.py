"""The maths of lens heatmaps: divergences between next-token distributions, in bits, in log space.

Pure functions on tensors; the callbacks call them and the tests compare them with SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

LN2 = math.log(2.0)
DIVERGENCES = ("jsd", "kl", "top1")


def jensen_shannon_bits(log_p: Tensor, log_q: Tensor) -> Tensor:
    """JSD(P || Q) in bits (in ``[0, 1]``) over the last dimension, from log-probabilities.

    Example:
        >>> p = torch.tensor([[0.5, 0.5]]).log(); q = torch.tensor([[1.0, 0.0]]).log()
        >>> round(float(jensen_shannon_bits(p, q)[0]), 4)
        0.3113
        >>> jensen_shannon_bits(p, torch.full((1, 2), float("nan"))).isnan().item()
        True
    """
    log_p, log_q = log_p.float(), log_q.float()
    log_m = torch.logaddexp(log_p, log_q) - LN2
    # Only exact zeros of probability contribute 0 (0 log 0 = 0); a NaN anywhere makes the result NaN,
    # so a broken model never reads as a perfect match.
    kl_pm = torch.where(log_p == -math.inf, 0.0, log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = torch.where(log_q == -math.inf, 0.0, log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / LN2).clamp(0.0, 1.0)


def kl_bits(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) in bits over the last dimension (``inf`` where Q misses mass that P has).

    Example:
        >>> p = torch.tensor([[0.5, 0.5]]).log(); q = torch.tensor([[0.25, 0.75]]).log()
        >>> round(float(kl_bits(p, q)[0]), 4)
        0.2075
    """
    log_p, log_q = log_p.float(), log_q.float()
    return torch.where(log_p == -math.inf, 0.0, log_p.exp() * (log_p - log_q)).sum(-1) / LN2


def divergence(log_p: Tensor, log_q: Tensor, kind: str) -> Tensor:
    """``jsd`` or ``kl`` (bits) of Q from the reference P, or ``top1``: 1 where the argmax agrees, else 0."""
    if kind == "jsd":
        return jensen_shannon_bits(log_p, log_q)
    if kind == "kl":
        return kl_bits(log_p, log_q)
    if kind == "top1":
        agree = (log_p.argmax(-1) == log_q.argmax(-1)).float()
        broken = torch.isnan(log_p).any(-1) | torch.isnan(log_q).any(-1)
        return torch.where(broken, math.nan, agree)
    raise ValueError(f"Invalid value for divergence={kind!r}: must be one of {DIVERGENCES}.")


def logit_lens(
    layer_states: Sequence[Tensor],
    decode: Callable[[Tensor], Tensor],
    final_logits: Tensor | None = None,
    kind: str = "jsd",
    chunk_tokens: int = 256,
) -> Tensor:
    """Divergence of every layer's decoded next-token distribution from the final one: ``(tokens, layers)``.

    Args:
        layer_states: one ``(tokens, width)`` tensor per layer output (not the embeddings).
        decode: hidden state -> logits (the final norm, then the unembedding).
        final_logits: the model's own output logits ``(tokens, vocabulary)``: the reference distribution,
            and the last layer's (whose Hugging Face hidden state is already final-normed, so decoding it
            again would normalise twice). ``None``: the reference is ``decode(layer_states[-1])``.
        kind: ``jsd`` (bits), ``kl`` (bits) or ``top1`` (1 where the argmax agrees with the final one).
        chunk_tokens: tokens decoded at a time, so ``tokens x vocabulary`` never has to fit at once.

    Example:
        >>> states = [torch.randn(3, 4) for _ in range(2)]
        >>> logit_lens(states, torch.nn.Linear(4, 7)).shape
        torch.Size([3, 2])
    """
    if not layer_states:
        raise ValueError("Need at least one layer's hidden states.")
    layers = len(layer_states)
    tokens = layer_states[-1].shape[0]
    result = torch.empty(tokens, layers, dtype=torch.float32, device=layer_states[-1].device)
    for start in range(0, tokens, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, tokens))
        reference = final_logits[rows] if final_logits is not None else decode(layer_states[-1][rows])
        final = torch.log_softmax(reference.float(), dim=-1)
        for layer in range(layers):
            if layer == layers - 1:
                decoded = final
            else:
                decoded = torch.log_softmax(decode(layer_states[layer][rows]).float(), dim=-1)
            result[rows, layer] = divergence(final, decoded, kind)
    return result


def settling_depth(divergences: Tensor, threshold: float) -> Tensor:
    """Per token, the first layer (0-based) whose divergence is below ``threshold``; ``layers`` if none;
    NaN for a token with a NaN divergence (it has no settling depth).

    Example:
        >>> settling_depth(torch.tensor([[0.9, 0.4, 0.1], [0.9, 0.8, 0.0], [0.9, float("nan"), 0.0]]), 0.5).tolist()
        [1.0, 2.0, nan]
    """
    below = divergences < threshold
    layers = divergences.shape[-1]
    first = torch.where(below, torch.arange(layers, device=divergences.device), layers).min(dim=-1).values.float()
    return torch.where(torch.isnan(divergences).any(dim=-1), math.nan, first)


def deep_thinking_share(depths: Tensor, layers: int, last_fraction: float) -> float:
    """Share of tokens that settle only in the last ``last_fraction`` of the layers.

    Example:
        >>> round(deep_thinking_share(torch.tensor([1, 9, 10]), layers=10, last_fraction=0.2), 4)
        0.6667
    """
    cutoff = layers - math.ceil(last_fraction * layers)
    if torch.isnan(depths.float()).any():
        return math.nan
    return float((depths >= cutoff).float().mean())
