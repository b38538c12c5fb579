"""``ProbeMonitor`` (core of ``ProbeHeatmap``): linear-probe score per layer x token position on a fixed
labelled set."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_heatmaps.core.lens import LensImage, LensMonitor, LensResult, check_memory
from lightning_heatmaps.layers import find_language_model, find_layer_stack, resolve_layers
from lightning_heatmaps.probes import accuracy, fit_logistic, roc_auc, standardize

#: A named position: one index per example, or a callable from an example's token ids to its index.
Position = Union[Tensor, Sequence[int], Callable[[list], int]]
SCORES = ("auc", "accuracy")

__all__ = ["SCORES", "Position", "ProbeMonitor"]


def _pad(input_ids: Any, attention_mask: Tensor | None, pad_token_id: int) -> tuple[Tensor, Tensor]:
    if isinstance(input_ids, Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"Invalid value for input_ids: expected a (examples, tokens) tensor, got shape {tuple(input_ids.shape)}.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        return input_ids.long(), mask.long()
    rows = [list(map(int, row)) for row in input_ids]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("Invalid value for input_ids: need at least one example, each with at least one token.")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    return ids, mask


class ProbeMonitor(LensMonitor):
    """The measurement of :class:`lightning_heatmaps.ProbeHeatmap`, driven by explicit events (no trainer).

    The same arguments as :class:`lightning_heatmaps.ProbeHeatmap` (a ``forward`` callable gets the model the
    monitor is attached to: under Lightning, the ``LightningModule``).

    Example:
        >>> ids = torch.randint(0, 50, (8, 6))
        >>> monitor = ProbeMonitor(ids, labels=[0, 1] * 4, offsets=[-1])
        >>> monitor.output_name
        'probe_auc'
    """

    summary_label = "best_score"

    def __init__(
        self,
        input_ids: Any,
        labels: Any,
        positions: Mapping[str, Position] | None = None,
        offsets: Sequence[int] = (-1,),
        attention_mask: Tensor | None = None,
        pad_token_id: int = 0,
        site: str = "residual",
        score: str = "auc",
        train_fraction: float = 0.5,
        c: float = 1.0,
        seed: int = 0,
        batch_size: int = 16,
        forward: Callable[[nn.Module, Tensor, Tensor], Any] | None = None,
        every_n_steps: int | None = 100,
        on_validation_end: bool = False,
        capacity: int = 256,
        history: str = "recent",
        first_layer_index: int = 0,
        cmap: str = "viridis",
        max_memory_mb: float = 2048.0,
        name: str | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, on_validation_end=on_validation_end, capacity=capacity, history=history,
            first_layer_index=first_layer_index, cmap=cmap, max_memory_mb=max_memory_mb, name=name,
        )
        if score not in SCORES:
            raise ValueError(f"Invalid value for score={score!r}: must be one of {SCORES}.")
        if not isinstance(train_fraction, (int, float)) or not 0 < train_fraction < 1:
            raise ValueError(f"Invalid value for train_fraction={train_fraction!r}: must be in (0, 1).")
        if not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"Invalid value for c={c!r}: must be a number > 0.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid value for batch_size={batch_size!r}: must be an integer >= 1.")
        self.input_ids, self.attention_mask = _pad(input_ids, attention_mask, pad_token_id)
        examples = self.input_ids.shape[0]
        self.labels = torch.as_tensor(labels).long().flatten()
        if self.labels.numel() != examples:
            raise ValueError(f"Invalid value for labels: {self.labels.numel()} labels for {examples} examples.")
        if not set(self.labels.tolist()) <= {0, 1}:
            raise ValueError(f"Invalid value for labels: must be 0 or 1, got {sorted(set(self.labels.tolist()))[:6]}.")
        counts = [int((self.labels == k).sum()) for k in (0, 1)]
        if min(counts) < 2:
            raise ValueError(f"Invalid value for labels: need at least 2 examples of each class, got {counts[0]} of 0 and {counts[1]} of 1.")
        self.position_names, self.positions = self._positions(positions or {}, list(offsets))
        self.site, self.metric, self.score = site, f"probe_{score}", score
        self.c, self.seed, self.batch_size, self.forward = float(c), seed, batch_size, forward
        self.train_index, self.test_index = self._split(train_fraction, seed)

    def _positions(self, named: Mapping[str, Position], offsets: list[int]) -> tuple[list[str], Tensor]:
        lengths = self.attention_mask.sum(dim=1)
        columns, names = [], []
        for name, position in named.items():
            if callable(position):
                column = torch.tensor([int(position(row[: int(n)].tolist())) for row, n in zip(self.input_ids, lengths)])
            else:
                column = torch.as_tensor(position).long().flatten()
                if column.numel() != len(lengths):
                    raise ValueError(f"Invalid value for positions[{name!r}]: {column.numel()} indices for {len(lengths)} examples.")
            columns.append(column)
            names.append(str(name))
        for offset in offsets:
            columns.append(lengths + offset if offset < 0 else torch.full_like(lengths, offset))
            names.append(str(offset))
        if not columns:
            raise ValueError("Invalid value for positions/offsets: no position selected.")
        table = torch.stack(columns, dim=1)
        bad = (table < 0) | (table >= lengths[:, None])
        if bad.any():
            example, column = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(
                f"Invalid position {names[column]!r} for example {example}: index {int(table[example, column])} is outside "
                f"its {int(lengths[example])} tokens."
            )
        return names, table

    def _split(self, train_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        train, test = [], []
        for label in (0, 1):
            members = torch.nonzero(self.labels == label).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            cut = min(max(1, round(train_fraction * len(members))), len(members) - 1)
            train.append(members[:cut])
            test.append(members[cut:])
        return torch.cat(train).sort().values, torch.cat(test).sort().values

    def _prepare(self, model: nn.Module) -> int:
        try:
            self._model = find_language_model(model)
        except ValueError:
            if self.forward is None:
                raise
            self._model = model
        self._modules = self._site_modules(self._model)
        config = getattr(self._model, "config", None)
        width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)  # 1024: unknown width
        megabytes = 4 * len(self._modules) * self.input_ids.shape[0] * self.positions.shape[1] * width * 3 / 2**20
        check_memory("probe set", megabytes, self.max_memory_mb)
        return len(self._modules)

    def _site_modules(self, model: nn.Module) -> list[tuple[nn.Module, bool]]:
        """One ``(module, take_input)`` per layer where the features are read."""
        if self.site == "residual":
            stack = find_layer_stack(model)
            if stack is None:
                raise ValueError(f"Cannot find the layers of {type(model).__name__} (no repeated blocks).")
            return [(block, False) for _, block in stack[1]]
        component, take_input = (self.site[: -len(".input")], True) if self.site.endswith(".input") else (self.site, False)
        layer_map = resolve_layers(model)
        chosen = [(c.layer, c.module) for c in layer_map.components if c.name == component]
        if not chosen:
            raise ValueError(f"Invalid value for site={self.site!r}: no component {component!r}; components: {layer_map.component_names}.")
        return [(module, take_input) for _, module in sorted(chosen, key=lambda item: item[0])]

    def _features(self, model: nn.Module) -> Tensor:
        """``(layers, examples, positions, width)`` features, gathered at the selected positions only."""
        device = self._device(model)
        gathered: list[list[Tensor]] = [[] for _ in self._modules]
        current: dict[str, Tensor] = {}

        def hook_for(layer: int, take_input: bool) -> Any:
            def take(tensor: Tensor) -> None:
                rows = torch.arange(tensor.shape[0], device=tensor.device)[:, None]
                gathered[layer].append(tensor[rows, current["index"]].float())

            if take_input:
                return lambda module, args: take(args[0])
            return lambda module, args, output: take(output if isinstance(output, Tensor) else output[0])

        handles = [
            module.register_forward_pre_hook(hook_for(i, True)) if take_input else module.register_forward_hook(hook_for(i, False))
            for i, (module, take_input) in enumerate(self._modules)
        ]
        try:
            for start in range(0, self.input_ids.shape[0], self.batch_size):
                ids = self.input_ids[start : start + self.batch_size].to(device)
                mask = self.attention_mask[start : start + self.batch_size].to(device)
                current["index"] = self.positions[start : start + self.batch_size].to(device)
                if self.forward is not None:
                    self.forward(model, ids, mask)
                else:
                    self._model(input_ids=ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([torch.cat(parts) for parts in gathered])

    def _evaluate(self, model: nn.Module) -> LensResult:
        features = self._features(model)  # (layers, examples, positions, width)
        layers, _, positions, width = features.shape
        probes = features.permute(0, 2, 1, 3).reshape(layers * positions, -1, width)
        device = probes.device
        train, test = self.train_index.to(device), self.test_index.to(device)
        x_train, x_test = standardize(probes[:, train], probes[:, test])
        weights, bias = fit_logistic(x_train, self.labels.to(device)[train], c=self.c)
        scores = torch.einsum("pnd,pd->pn", x_test, weights) + bias[:, None]
        measure = roc_auc if self.score == "auc" else accuracy
        table = measure(scores, self.labels.to(device)[test]).reshape(layers, positions).cpu().numpy().astype(np.float64)
        image = LensImage(name="layer_x_position", values=table, row_labels=self.layer_labels,
                          column_labels=self.position_names, xlabel="token position", kind="layer_x_position", color_limits=(0.5, 1.0))
        scalars = {f"{self.output_name}/best": float(np.nanmax(table))}
        return LensResult([image], table.max(axis=1), scalars)
