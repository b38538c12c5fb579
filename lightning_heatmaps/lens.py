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
    """
    log_p, log_q = log_p.float(), log_q.float()
    log_m = torch.logaddexp(log_p, log_q) - LN2
    kl_pm = torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_m), 0.0).sum(-1)
    kl_qm = torch.where(log_q > -math.inf, log_q.exp() * (log_q - log_m), 0.0).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / LN2).clamp(0.0, 1.0)


def kl_bits(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) in bits over the last dimension (``inf`` where Q misses mass that P has).

    Example:
        >>> p = torch.tensor([[0.5, 0.5]]).log(); q = torch.tensor([[0.25, 0.75]]).log()
        >>> round(float(kl_bits(p, q)[0]), 4)
        0.2075
    """
    log_p, log_q = log_p.float(), log_q.float()
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1) / LN2


def divergence(log_p: Tensor, log_q: Tensor, kind: str) -> Tensor:
    """``jsd`` or ``kl`` (bits) of Q from the reference P, or ``top1``: 1 where the argmax agrees, else 0."""
    if kind == "jsd":
        return jensen_shannon_bits(log_p, log_q)
    if kind == "kl":
        return kl_bits(log_p, log_q)
    if kind == "top1":
        return (log_p.argmax(-1) == log_q.argmax(-1)).float()
    raise ValueError(f"Invalid value for divergence={kind!r}: must be one of {DIVERGENCES}.")


def logit_lens(
    hidden_states: Sequence[Tensor],
    final_norm: Callable[[Tensor], Tensor],
    unembed: Callable[[Tensor], Tensor],
    kind: str = "jsd",
    chunk_tokens: int = 256,
) -> Tensor:
    """Divergence of every layer's decoded distribution from the final layer's, ``(tokens, layers)``.

    Args:
        hidden_states: Hugging Face ``output_hidden_states`` of one sequence: ``L + 1`` tensors of
            ``(tokens, width)``; index 0 is the embeddings (not a layer), the last is already final-normed.
        final_norm: the model's final norm, applied to every intermediate layer (not to the last).
        unembed: hidden state -> logits.
        kind: ``jsd`` (bits), ``kl`` (bits) or ``top1`` (agreement with the final layer's argmax).
        chunk_tokens: tokens decoded at a time, so ``tokens x vocabulary`` never has to fit at once.

    Example:
        >>> states = [torch.randn(3, 4) for _ in range(3)]
        >>> logit_lens(states, lambda h: h, torch.nn.Linear(4, 7)).shape
        torch.Size([3, 2])
    """
    if len(hidden_states) < 2:
        raise ValueError(f"Need the embeddings and at least one layer in hidden_states, got {len(hidden_states)} tensors.")
    layers = len(hidden_states) - 1
    tokens = hidden_states[-1].shape[0]
    result = torch.empty(tokens, layers, dtype=torch.float32, device=hidden_states[-1].device)
    for start in range(0, tokens, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, tokens))
        final = torch.log_softmax(unembed(hidden_states[-1][rows]).float(), dim=-1)
        for layer in range(1, layers + 1):
            state = hidden_states[layer][rows]
            normed = state if layer == layers else final_norm(state)
            decoded = torch.log_softmax(unembed(normed).float(), dim=-1)
            result[rows, layer - 1] = divergence(final, decoded, kind)
    return result


def settling_depth(divergences: Tensor, threshold: float) -> Tensor:
    """Per token, the first layer (0-based) whose divergence is below ``threshold``; ``layers`` if none.

    Example:
        >>> settling_depth(torch.tensor([[0.9, 0.4, 0.1], [0.9, 0.8, 0.0]]), 0.5).tolist()
        [1, 2]
    """
    below = divergences < threshold
    layers = divergences.shape[-1]
    first = torch.where(below, torch.arange(layers, device=divergences.device), layers)
    return first.min(dim=-1).values


def deep_thinking_share(depths: Tensor, layers: int, last_fraction: float) -> float:
    """Share of tokens that settle only in the last ``last_fraction`` of the layers.

    Example:
        >>> deep_thinking_share(torch.tensor([1, 9, 10]), layers=10, last_fraction=0.2)
        0.6666666666666666
    """
    cutoff = layers - math.ceil(last_fraction * layers)
    return float((depths >= cutoff).float().mean())
