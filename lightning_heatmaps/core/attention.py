"""``AttentionMonitor`` (core of ``AttentionHeatmap``): layer x head max attention logit and entropy, and the
output logits' log Z and max. Imports neither Lightning nor transformers (the attention sites import
transformers lazily, only for Hugging Face models)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_heatmaps.attention import CHUNK_BYTES, attention_statistics
from lightning_heatmaps.attention_sites import (AttentionSites, AttentionTaps, check_attention_implementations,
                                               check_attention_sharding, find_attention_sites)
from lightning_heatmaps._ranks import rank_zero_warn
from lightning_heatmaps.core.monitor import HeatmapMonitor, _check_int, _PendingSample
from lightning_heatmaps.distributed import distributed_world, pool_over_ranks
from lightning_heatmaps.layers import Component, LayerMap
from lightning_heatmaps.reductions import ATTENTION_METRICS


def output_logit_statistics(logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum of log Z, positions, max |logit|)`` of language-model logits ``[..., vocabulary]``, in float32.

    ``log Z = logsumexp(logits)`` per position; ``positions`` (boolean, the logits' leading shape) keeps the
    non-padding ones. All three are 0-d tensors on the logits' device.

    Example:
        >>> [round(float(v), 4) for v in output_logit_statistics(torch.zeros(2, 3, 4))]
        [8.3178, 6.0, 0.0]
    """
    with torch.no_grad():
        logits = logits.detach().to(torch.float32)
        log_z = torch.logsumexp(logits, dim=-1)
        keep = torch.ones_like(log_z, dtype=torch.bool) if positions is None else positions.to(log_z.device).bool()
        top = torch.where(keep[..., None], logits.abs(), 0.0).amax() if logits.numel() else logits.new_zeros(())
        nan = (torch.isnan(logits) & keep[..., None]).any()
        return torch.where(keep, log_z, 0.0).sum(), keep.sum().to(torch.float32), torch.where(nan, math.nan, top)


class AttentionMonitor(HeatmapMonitor):
    """The measurement of :class:`lightning_heatmaps.AttentionHeatmap`, driven by explicit events (no trainer).

    The same arguments as :class:`lightning_heatmaps.AttentionHeatmap`, whose docstring says what is measured,
    where attention is seen and what a sampled step costs; use it directly in a plain loop
    (:class:`lightning_heatmaps.loop.Monitor`) or through an adapter (Lightning, ``hf``, ``fabric``).

    Example:
        >>> monitor = AttentionMonitor(every_n_steps=50)
        >>> monitor.metric_names
        ['attention_max_logit', 'attention_entropy']
    """

    METRICS = ATTENTION_METRICS
    STATISTICS = ("max_logit", "entropy_sum")
    COLUMN_AXIS = "head"
    LATEST_IMAGE = "layer_x_head"
    POOLED_SCALARS_ONLY = True

    def __init__(
        self,
        metrics: str | Sequence[str] = ("max_logit", "entropy"),
        every_n_steps: int | None = None,
        query_stride: int = 1,
        num_heads: int | None = None,
        output_logits: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
        capacity: int = 256,
        history: str = "recent",
        render_every_n_samples: int = 10,
        min_render_interval_seconds: float = 60.0,
        first_layer_index: int = 0,
        cmap: str = "viridis",
        log_scale: bool = False,
        color_limits: tuple[float, float] | None = None,
        per_component_images: bool = False,
        name: str | None = None,
    ) -> None:
        _check_int("query_stride", query_stride, 1)
        _check_int("num_heads", num_heads, 1, allow_none=True)
        _check_int("chunk_bytes", chunk_bytes, 1)
        super().__init__(
            metrics=metrics, every_n_steps=every_n_steps, capacity=capacity, history=history,
            render_every_n_samples=render_every_n_samples, min_render_interval_seconds=min_render_interval_seconds,
            modules=None, first_layer_index=first_layer_index, cmap=cmap, log_scale=log_scale,
            color_limits=color_limits, per_component_images=per_component_images, name=name,
        )
        self.query_stride = query_stride
        self.num_heads = num_heads
        self.output_logits = bool(output_logits)
        self.chunk_bytes = chunk_bytes
        self.sites: AttentionSites | None = None
        self._taps: AttentionTaps | None = None
        self._handles: list[Any] = []
        self._stats: Tensor | None = None  # (max, entropy sum, rows) x (slots + 1): the last column is the output logits'
        self._positions: Tensor | None = None
        prefix = f"{name}/" if name else ""
        self._logit_tags = (f"{prefix}output_logits/log_z_mean", f"{prefix}output_logits/max_abs")

    def _resolve(self, model: nn.Module) -> LayerMap:
        check_attention_implementations(model, type(self).__name__)  # again: configure_model may have built it
        self.sites = sites = find_attention_sites(model, self.num_heads, self.first_layer_index)
        check_attention_sharding(sites, model, type(self).__name__)
        modules = {row: module for module, row in sites.modules.items()}
        components = [
            Component(row, str(head), type(modules[row]).__name__, modules[row], (), None)
            for row, heads in enumerate(sites.heads) for head in range(heads)
        ]
        names = [str(head) for head in range(max(sites.heads))]
        return LayerMap(components, sites.row_labels, names, f"attention ({sites.kind})")

    def _attach(self, model: nn.Module, layer_map: LayerMap) -> None:
        assert self.sites is not None
        self._first_slot = np.cumsum([0, *self.sites.heads[:-1]]).tolist()
        self._slots = len(layer_map.components)
        self._device = self._context.device or next(iter(model.parameters()), torch.empty(0)).device
        self._taps = AttentionTaps(self.sites, self._record)
        self._checked_rows = False
        self._lm_head: nn.Module | None = None
        if self.output_logits and self.sites.models:
            self._lm_head = self.sites.models[0].get_output_embeddings()
        self._model = self.sites.models[0] if self.sites.models else None

    def _describe(self) -> str:
        assert self.sites is not None
        rows = "all query rows" if self.query_stride == 1 else f"every {self.query_stride}th query row"
        return f" The columns are heads; attention seen via {self.sites.kind}, {rows}."

    def _detach(self) -> None:
        self._remove_taps()
        self._collecting = False

    def _begin_sample(self) -> None:
        self._seen_rows: set[int] = set()
        stats = torch.zeros(3, self._slots + 1, device=self._device)
        stats[0] = -math.inf
        self._stats = stats

    def _begin_micro_batch(self) -> None:
        super()._begin_micro_batch()
        assert self._taps is not None
        self._taps.install()
        if self._model is not None and self._lm_head is not None:
            self._handles = [
                self._model.register_forward_pre_hook(self._positions_hook, with_kwargs=True),
                self._lm_head.register_forward_hook(self._logits_hook),
            ]

    def before_backward(self) -> None:
        super().before_backward()
        self._remove_taps()  # a forward recomputed during backward (activation checkpointing) is not seen

    def _end_micro_batch(self) -> None:
        super()._end_micro_batch()
        self._remove_taps()

    def _remove_taps(self) -> None:
        if self._taps is not None and self._taps.installed:
            self._taps.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- what the taps and hooks record ---------------------------------------------------------------

    def _record(self, row: int, query: Tensor, key: Tensor, scale: float | None, mask: Tensor | None, causal: bool,
                sliding_window: int | None, softcap: float | None, query_rows: Tensor | None,
                bias: Tensor | None = None, sink: Tensor | None = None) -> None:
        if not self._collecting or self._stats is None:
            return
        self._seen_rows.add(row)
        top, entropy, rows = attention_statistics(
            query, key, scale, mask, causal=causal, sliding_window=sliding_window, softcap=softcap, bias=bias,
            sink=sink, query_rows=query_rows, query_stride=self.query_stride, chunk_bytes=self.chunk_bytes,
        )
        first = self._first_slot[row]
        cells = slice(first, first + top.shape[0])
        stats = self._stats
        stats[0, cells] = torch.maximum(stats[0, cells], top.to(stats.device))
        stats[1, cells] += entropy.to(stats.device)
        stats[2, cells] += rows.to(stats.device)

    def _positions_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        config = getattr(module, "config", None)
        name = "decoder_attention_mask" if getattr(config, "is_encoder_decoder", False) else "attention_mask"
        mask = kwargs.get(name)
        self._positions = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _logits_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._collecting or self._stats is None or not isinstance(output, Tensor):
            return
        positions = self._positions if self._positions is not None and self._positions.shape == output.shape[:-1] else None
        log_z, count, top = output_logit_statistics(output, positions)
        stats = self._stats
        stats[0, -1] = torch.maximum(stats[0, -1], top)
        stats[1, -1] += log_z
        stats[2, -1] += count

    # --- the sample -----------------------------------------------------------------------------------

    def _collect(self) -> tuple[Tensor, np.ndarray | None] | None:
        self._collecting = False
        self._remove_taps()
        stats, self._stats = self._stats, None
        if stats is None:
            return None
        self._check_rows_seen()
        if distributed_world() > 1:
            carried, taken = self._with_contributions(stats)  # other consumers' values ride along, summed
            # the sample's one collective: max of maxima, sums of the rest
            stats = self._take_contributions(pool_over_ranks(carried, [0]), len(stats), taken)
        return stats, None

    def _check_rows_seen(self) -> None:
        """At the first sample: an error if no attention call was seen at all, a warning naming rows never seen."""
        if self._checked_rows or self.sites is None:
            return
        self._checked_rows = True
        if not self._seen_rows:
            looked_for = {
                "transformers": "calls of the attention function registered in transformers' AttentionInterface "
                                "(models whose attention does not go through it, e.g. BLOOM or MPT, are not seen)",
                "multihead": "forwards of nn.MultiheadAttention",
                "sdpa": "calls of torch.nn.functional.scaled_dot_product_attention inside the blocks",
            }[self.sites.kind]
            raise RuntimeError(
                f"{type(self).__name__} saw no attention in the training forward of step {self._last_sampled_step}: it "
                f"looked for {looked_for} (rows: {', '.join(self.sites.row_labels[:8])})."
            )
        unseen = [label for row, label in enumerate(self.sites.row_labels) if row not in self._seen_rows]
        if unseen:
            rank_zero_warn(
                f"{type(self).__name__}: no attention call was seen for rows {', '.join(unseen[:12])} in the first "
                "sampled step; their cells stay empty (NaN)."
            )

    def _ingest(self, sample: _PendingSample) -> None:
        values = sample.statistics.numpy()
        log_z, top, positions = float(values[1, -1]), float(values[0, -1]), float(values[2, -1])
        # The rows the chosen metrics need, in the order of ``self._statistics``, then the rows counted.
        rows = [self.STATISTICS.index(statistic) for statistic in self._statistics] + [2]
        super()._ingest(replace(sample, statistics=torch.from_numpy(np.ascontiguousarray(values[rows, :-1]))))
        if self._outputs is not None and self._lm_head is not None and positions > 0:
            self._outputs.log_scalars({self._logit_tags[0]: log_z / positions, self._logit_tags[1]: top}, sample.step)
