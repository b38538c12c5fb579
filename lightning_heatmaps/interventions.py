"""Causal interventions on hidden states and attention edges: the pure parts.

Rows of one batch carry different interventions of the same prompt (row 0 is the clean run); these
functions build the attention masks and the corrupted states for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

CORRUPTIONS = ("noise", "zero", "mean")
SITES = ("Subj.", "Attn.", "Last.")


def causal_mask_with_blocked_edges(
    batch: int, tokens: int, blocked_rows: Tensor, sources: Tensor, target: int, existing: Tensor | None,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """A ``(batch, 1, tokens, tokens)`` attention mask: causal (or ``existing``), with the edges from every
    ``sources`` position to the ``target`` position removed in the rows where ``blocked_rows`` is true.

    A boolean ``existing`` mask (True = may attend) gives a boolean mask; otherwise the mask is additive
    (0 or the dtype's minimum), as eager and SDPA attention both accept.

    Example:
        >>> mask = causal_mask_with_blocked_edges(2, 3, torch.tensor([False, True]), torch.tensor([0]), 2, None,
        ...                                       torch.float32, torch.device("cpu"))
        >>> (mask[:, 0, 2] == 0).tolist()  # may position 2 attend to 0, 1, 2?
        [[True, True, True], [False, True, True]]
    """
    if existing is None:
        allowed = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()[None, None].expand(batch, 1, tokens, tokens)
        boolean = False
    elif existing.dtype == torch.bool:
        allowed, boolean = existing[..., -tokens:, -tokens:].expand(batch, 1, tokens, tokens), True
    else:
        allowed, boolean = (existing[..., -tokens:, -tokens:] == 0).expand(batch, 1, tokens, tokens), False
    allowed = allowed.clone()
    rows = torch.nonzero(blocked_rows.to(device)).flatten()
    allowed[rows[:, None], 0, target, sources.to(device)[None, :]] = False
    if boolean:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def corrupt(states: Tensor, how: str, noise: Tensor | None = None, mean: Tensor | None = None) -> Tensor:
    """Corrupted copies of ``states`` (``(..., width)``): plus ``noise``, zeros, or the ``mean`` state.

    Example:
        >>> corrupt(torch.ones(2, 3), "zero").sum().item()
        0.0
    """
    if how == "noise":
        assert noise is not None
        return states + noise.to(states)
    if how == "zero":
        return torch.zeros_like(states)
    if how == "mean":
        assert mean is not None
        return mean.to(states).expand_as(states).clone()
    raise ValueError(f"Invalid value for corruption={how!r}: must be one of {CORRUPTIONS}.")
