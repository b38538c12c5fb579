"""The maths of :class:`~lightning_heatmaps.AttentionHeatmap`: per-head attention statistics from q and k.

Pure functions, no hooks: given the queries and keys an attention call used, its scale, its mask (as the
model passes it), sliding window and soft-cap, :func:`attention_statistics` returns, per query head, the
largest pre-softmax logit ``scale * q.k`` over the keys each query may see (before soft-capping), and the sum
and count of the entropies (natural log) of the attention rows the model used (after mask, soft-cap and
softmax, before dropout), over the non-padding query rows. Values stay on the input's device.

Memory: the logits are formed in float32 for a chunk of query rows at a time, ``B * H * rows * Lk`` floats,
with ``rows`` chosen so that a chunk takes at most :data:`CHUNK_BYTES` (64 MiB) plus a few temporaries of the
same size (a boolean mask and the softmax): about 4 x 64 MiB at peak, whatever the sequence length. A
flex_attention ``BlockMask`` (:func:`block_mask_allowed`) is evaluated for the same chunk only: its
``mask_mod``'s boolean temporaries take a quarter of the chunk's bytes each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: Bytes of float32 logits formed at once (``batch x heads x query rows x keys``).
CHUNK_BYTES = 64 * 2**20


def allowed_keys(mask: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Which keys a query may see under ``mask``: ``True`` where allowed.

    A boolean mask is taken as given (``True`` = attend, the convention of
    :func:`torch.nn.functional.scaled_dot_product_attention`); an additive mask allows a key unless its
    value is ``-inf`` or at most half the most negative finite value of its dtype (the "minus infinity"
    transformers and PyTorch use for masked keys).

    Example:
        >>> allowed_keys(torch.tensor([0.0, float("-inf"), torch.finfo(torch.float32).min, -3.0])).tolist()
        [True, False, False, True]
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def block_mask_allowed(block_mask: Any, batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
    """Whether ``flex_attention`` lets query ``query`` see key ``key`` under a ``BlockMask``, element by element.

    The index tensors broadcast together (e.g. ``[B, 1, 1, 1]``, ``[1, H, 1, 1]``, ``[1, 1, r, 1]``,
    ``[1, 1, 1, Lk]``). As flex_attention applies it: a key in one of the mask's *full* blocks is seen, one in
    a *partial* block is seen where ``mask_mod(b, h, q_idx, kv_idx)`` is true, any other is skipped. Read from
    the public ``BlockMask`` attributes (``kv_num_blocks``/``kv_indices``, ``full_kv_num_blocks``/
    ``full_kv_indices``, ``BLOCK_SIZE``, ``mask_mod``); a size-1 batch or head dimension of the mask broadcasts.

    Example:
        >>> from torch.nn.attention.flex_attention import create_block_mask
        >>> causal = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4, 4, device="cpu")
        >>> i = torch.arange(4)
        >>> block_mask_allowed(causal, i.new_zeros(1, 1), i.new_zeros(1, 1), i[:, None], i[None, :]).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    query_block, key_block = block_mask.BLOCK_SIZE
    partial = _dense_blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = None
    if block_mask.full_kv_num_blocks is not None:
        full = _dense_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)

    def lookup(blocks: Tensor) -> Tensor:
        b = batch if blocks.shape[0] > 1 else torch.zeros_like(batch)
        h = head if blocks.shape[1] > 1 else torch.zeros_like(head)
        return blocks[b, h, query // query_block, key // key_block]

    allowed = lookup(partial) & block_mask.mask_mod(batch, head, query, key).to(torch.bool)
    return allowed if full is None else allowed | lookup(full)


def _dense_blocks(num_blocks: Tensor, indices: Tensor) -> Tensor:
    """``[B, H, query blocks, key blocks]`` boolean: the first ``num_blocks`` entries of ``indices`` per row."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None]
    dense = torch.zeros(indices.shape, dtype=torch.int32, device=indices.device)
    return dense.scatter_add_(-1, indices.long(), listed.to(torch.int32)) > 0


def _window_mask(rows: Tensor, keys: int, offset: int, causal: bool, window: int | None, device: torch.device) -> Tensor:
    """``[rows, keys]`` allowed keys of a causal and/or sliding-window mask (query ``i`` sits at ``i + offset``)."""
    position = rows[:, None] + offset
    key = torch.arange(keys, device=device)[None, :]
    allowed = torch.ones(rows.shape[0], keys, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= position
    if window is not None:
        allowed &= key > position - window
    return allowed


def attention_statistics(
    query: Tensor,
    key: Tensor,
    scale: float | None = None,
    mask: Tensor | Callable[[Tensor], Tensor] | None = None,
    *,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    bias: Tensor | None = None,
    sink: Tensor | None = None,
    query_rows: Tensor | None = None,
    query_stride: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per query head: the max pre-softmax logit, the sum of row entropies and the number of rows.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key: ``[B, Hkv, Lk, D]``; ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention repeats each
            key head ``Hq / Hkv`` times, as the models do).
        scale: the logit scale (default ``1 / sqrt(D)``).
        mask: broadcastable to ``[B, Hq, Lq, Lk]``; boolean (``True`` = attend) or additive (added to the
            logits after soft-capping, as the models do; ``-inf`` or the dtype's minimum masks a key); or a
            function of a chunk's query row indices ``[r]`` returning its boolean allowed keys, broadcastable
            to ``[B, Hq, r, Lk]`` (a flex_attention ``BlockMask`` evaluated chunk by chunk, so no
            ``Lq x Lk`` mask is ever formed).
        causal: apply a causal mask (queries aligned to the last keys), as ``is_causal`` does. Used with
            ``sliding_window`` only when ``mask`` is ``None`` (a given mask already holds both).
        sliding_window: a query sees at most this many keys (itself included), when ``mask`` is ``None``.
        softcap: ``softcap * tanh(logit / softcap)`` before the mask (Gemma 2); the max logit is taken before it.
        bias: an additive score bias broadcastable to ``[B, Hq, Lq, Lk]`` (T5's relative position bias), added
            after soft-capping like the mask: it shapes the distribution (entropy) but is not part of the
            logit ``scale * q.k`` whose max is taken.
        sink: attention-sink logits, ``[Hq]`` (gpt-oss's ``sinks``, passed as ``s_aux``) or per row,
            broadcastable to ``[B, Hq, Lq, 1]``: each row's softmax runs over its allowed keys and one extra
            entry holding its sink, which takes a share of the probability and gives no value. The entropy is that of this whole distribution (keys and sink);
            the sink is not a logit ``scale * q.k`` and never enters the max.
        query_rows: ``[B, Lq]`` boolean, ``False`` for padding queries (excluded). Rows that may see no key
            are excluded as well.
        query_stride: measure every ``query_stride``-th query row only; ``max_logit`` is then a lower bound of
            the exact value and the entropy an estimate of the mean over rows.
        chunk_bytes: float32 logits formed at once (bounds the memory, see the module's docstring).

    Returns:
        ``(max_logit, entropy_sum, rows)``, each ``[Hq]`` float32 on the query's device. ``max_logit`` is
        ``-inf`` for a head with no row; a NaN or infinite logit propagates into its head's values.

    Example:
        >>> q = torch.tensor([[[[1.0, 0.0]]]])
        >>> k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
        >>> top, entropy, rows = attention_statistics(q, k, scale=1.0)
        >>> float(top[0]), round(float(entropy[0]), 4), float(rows[0])
        (2.0, 0.3653, 1.0)
    """
    with torch.no_grad():
        batch, heads, length, dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        if heads % kv_heads:
            raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads}).")
        scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        device = query.device
        key32 = key.detach().to(torch.float32)
        if kv_heads != heads:
            key32 = key32.repeat_interleave(heads // kv_heads, dim=1)
        mask_rows = mask if callable(mask) else None
        allowed_all = None if mask_rows is not None else allowed_keys(mask)
        additive = None if mask is None or mask_rows is not None or mask.dtype == torch.bool else mask
        rows_all = torch.arange(0, length, max(1, query_stride), device=device)
        per_row = batch * heads * keys * 4
        chunk = max(1, min(len(rows_all), chunk_bytes // max(per_row, 1)))
        top = torch.full((heads,), -math.inf, device=device)
        entropy_sum = torch.zeros(heads, device=device)
        count = torch.zeros(heads, device=device)
        for start in range(0, len(rows_all), chunk):
            rows = rows_all[start : start + chunk]
            q = query.detach()[:, :, rows].to(torch.float32)
            logits = torch.matmul(q, key32.transpose(-1, -2)) * scale  # [B, H, r, Lk]
            if mask_rows is not None:
                allowed = mask_rows(rows).to(device).expand(logits.shape)
            elif allowed_all is not None:
                allowed = _take_rows(allowed_all, rows, length).expand(logits.shape)
            else:
                allowed = _window_mask(rows, keys, keys - length, causal, sliding_window, device).expand(logits.shape)
            valid = allowed.any(dim=-1)  # [B, H, r]
            if query_rows is not None:
                valid = valid & query_rows[:, None, rows].to(device)
            top = torch.maximum(top, _masked_amax(logits, allowed & valid[..., None]))
            scores = logits if softcap is None else softcap * torch.tanh(logits / softcap)
            if bias is not None:
                scores = scores + _take_rows(bias, rows, length).to(device, torch.float32)
            if additive is not None:
                scores = scores + _take_rows(additive, rows, length).to(torch.float32)
            scores = scores.masked_fill(~allowed, -math.inf)
            if sink is not None:  # one more entry per row: the head's sink
                column = sink.reshape(1, heads, 1, 1) if sink.dim() == 1 else _take_rows(sink, rows, length)
                column = column.detach().to(device, torch.float32).expand(*scores.shape[:-1], 1)
                scores = torch.cat([scores, column], dim=-1)
                allowed = torch.cat([allowed, torch.ones_like(allowed[..., :1])], dim=-1)
            log_p = torch.log_softmax(scores, dim=-1)
            entropy = -(log_p.exp() * log_p.masked_fill(~allowed, 0.0)).sum(dim=-1)  # [B, H, r]
            entropy_sum += torch.where(valid, entropy, 0.0).sum(dim=(0, 2))
            count += valid.sum(dim=(0, 2)).to(torch.float32)
        return top, entropy_sum, count


def _take_rows(mask: Tensor, rows: Tensor, length: int) -> Tensor:
    """The query rows ``rows`` of a mask broadcastable to ``[..., Lq, Lk]`` (a size-1 row dim broadcasts)."""
    mask = mask if mask.dim() >= 2 else mask[None]
    while mask.dim() < 4:
        mask = mask[None]
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


def _masked_amax(logits: Tensor, allowed: Tensor) -> Tensor:
    """Per head (dim 1) max over allowed entries (``amax`` propagates NaN), ``-inf`` where nothing is allowed."""
    return logits.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3))


def flash_allowed(
    query_length: int,
    key_length: int,
    *,
    causal: bool,
    sliding_window: int | None = None,
    padding: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    batch: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[Callable[[Tensor], Tensor], Tensor | None]:
    """The keys each query sees in a FlashAttention call, as transformers' ``flash_attention_forward`` makes it.

    FlashAttention has no mask: a padded batch is unpadded into sequences (``padding``, the 2D mask, ``1`` =
    token), a packed batch is cut into sequences at ``cu_seqlens``, and within each sequence of ``n_q`` queries and
    ``n_k`` keys, query ``i`` sees key ``j`` when ``j <= i + n_k - n_q`` (``causal``: aligned to the bottom-right
    corner) and, with a window (applied only when ``key_length > sliding_window``; window size
    ``(sliding_window - 1, sliding_window - 1)``), when ``|j - (i + n_k - n_q)| <= sliding_window - 1``. With
    padding, the query rows kept are the mask's (its last ``query_length`` columns when queries and keys differ in
    length, as transformers' unpadding does); other rows are not computed.

    Args:
        query_length, key_length: the padded lengths ``Lq``, ``Lk``.
        causal: the call's ``causal`` flag.
        sliding_window: the ``sliding_window`` argument, or ``None``.
        padding: ``[B, Lk]`` 2D mask, or ``None``.
        cu_seqlens_q, cu_seqlens_k: cumulative sequence starts over the flattened ``B * L`` tokens (packed
            sequences), or ``None``. A sequence may not span two batch rows.
        batch: ``B``.

    Returns:
        ``(rows_fn, query_rows)``: ``rows_fn(rows)`` gives the allowed keys ``[B, 1, r, Lk]`` of query rows
        ``rows`` (so no ``Lq x Lk`` mask is formed); ``query_rows`` ``[B, Lq]`` the computed query rows, or ``None``
        for all.

    Raises:
        ValueError: a packed sequence spans two batch rows.

    Example:
        >>> rows_fn, rows = flash_allowed(4, 4, causal=True, sliding_window=2, padding=torch.tensor([[0, 1, 1, 1]]))
        >>> rows_fn(torch.arange(4))[0, 0].int().tolist(), rows.int().tolist()
        ([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], [[0, 1, 1, 1]])
    """
    device = torch.device(device)

    def ranks(valid: Tensor) -> tuple[Tensor, Tensor]:  # position among the row's kept tokens, and their count
        valid = valid.to(device, torch.bool)
        return valid.long().cumsum(-1) - 1, valid.sum(-1, keepdim=True)

    def segments(cu: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:  # segment id, rank in it, its length
        cu = cu.to(device, torch.long)
        token = torch.arange(batch * length, device=device)
        segment = torch.searchsorted(cu[1:], token, right=True).clamp_max(len(cu) - 2)
        start = cu[segment]
        first = token.view(batch, length)[:, :1]  # a segment starting before its row's first token spans rows
        if bool((start.view(batch, length) < first).any()):
            raise ValueError("flash_allowed: a packed sequence (cu_seq_lens) spans two batch rows; not supported.")
        return (segment.view(batch, length), (token - start).view(batch, length),
                (cu[1:] - cu[:-1])[segment].view(batch, length))

    segment_q = segment_k = None
    query_rows = None
    if padding is not None:
        key_valid = padding.to(device, torch.bool)
        if query_length == key_length:
            query_valid = key_valid
        elif query_length == 1:
            query_valid = torch.ones(key_valid.shape[0], 1, dtype=torch.bool, device=device)
        else:
            query_valid = key_valid[:, -query_length:]
        rank_q, count_q = ranks(query_valid)
        rank_k, count_k = ranks(key_valid)
        offset = (count_k - count_q).expand(-1, query_length)  # [B, Lq]
        query_rows = query_valid
    elif cu_seqlens_q is not None and cu_seqlens_k is not None:
        key_valid = None
        segment_q, rank_q, count_q = segments(cu_seqlens_q, query_length)
        segment_k, rank_k, _ = segments(cu_seqlens_k, key_length)
        # a query's sequence has the same index among the key sequences: its key count
        count_k_of_q = (cu_seqlens_k.to(device, torch.long)[1:] - cu_seqlens_k.to(device, torch.long)[:-1])[segment_q]
        offset = count_k_of_q - count_q
    else:
        key_valid = None
        rank_q = torch.arange(query_length, device=device).expand(batch, -1)
        rank_k = torch.arange(key_length, device=device).expand(batch, -1)
        offset = torch.full((batch, query_length), key_length - query_length, device=device)
    window = sliding_window if sliding_window is not None and key_length > sliding_window else None

    def rows_fn(rows: Tensor) -> Tensor:
        rows = rows.to(device)
        aligned = rank_q[:, rows] + offset[:, rows]  # [B, r]: the key rank the query sits at
        distance = rank_k[:, None, :] - aligned[:, :, None]  # [B, r, Lk]
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if key_valid is not None:
            allowed &= key_valid[:, None, :]
        if query_rows is not None:
            allowed &= query_rows[:, rows, None]
        if segment_q is not None:
            allowed &= segment_q[:, rows, None] == segment_k[:, None, :]
        if causal:
            allowed &= distance <= 0
        if window is not None:
            allowed &= (distance >= 1 - window) & (distance <= window - 1)
        return allowed[:, None]

    return rows_fn, query_rows
