"""``LogitLensMonitor`` (core of ``LogitLensHeatmap``): how far each layer's decoded prediction is from the
final one, token x layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_heatmaps.core.lens import LensImage, LensMonitor, LensResult, as_token_lists, check_memory, token_strings
from lightning_heatmaps.distributed import fsdp2_units_of, gathered
from lightning_heatmaps.layers import find_decoder, find_language_model, find_layer_stack
from lightning_heatmaps.lens import DIVERGENCES, deep_thinking_share, logit_lens, settling_depth

__all__ = ["LogitLensMonitor"]


class LogitLensMonitor(LensMonitor):
    """The measurement of :class:`lightning_heatmaps.LogitLensHeatmap`, driven by explicit events (no trainer).

    The same arguments as :class:`lightning_heatmaps.LogitLensHeatmap` (a ``hidden_states`` callable gets the
    model the monitor is attached to: under Lightning, the ``LightningModule``).

    Example:
        >>> monitor = LogitLensMonitor([[1, 2, 3, 4]], every_n_steps=100)
        >>> monitor.output_name
        'logit_lens'
    """

    metric = "logit_lens"
    summary_label = "mean_divergence"

    def __init__(
        self,
        prompts: Any,
        tokenizer: Any = None,
        token_labels: Sequence[Sequence[str]] | None = None,
        divergence: str = "jsd",
        settle_threshold: float = 0.5,
        deep_fraction: float = 0.15,
        hidden_states: Callable[[nn.Module, Tensor], Sequence[Tensor]] | None = None,
        decoder: Callable[[Tensor], Tensor] | None = None,
        chunk_tokens: int = 256,
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
        if divergence not in DIVERGENCES:
            raise ValueError(f"Invalid value for divergence={divergence!r}: must be one of {DIVERGENCES}.")
        if not isinstance(settle_threshold, (int, float)) or not 0 < settle_threshold <= 1:
            raise ValueError(f"Invalid value for settle_threshold={settle_threshold!r}: must be in (0, 1].")
        if not isinstance(deep_fraction, (int, float)) or not 0 < deep_fraction < 1:
            raise ValueError(f"Invalid value for deep_fraction={deep_fraction!r}: must be in (0, 1).")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"Invalid value for chunk_tokens={chunk_tokens!r}: must be an integer >= 1.")
        if hidden_states is not None and decoder is None:
            raise ValueError("Invalid arguments: `hidden_states` needs a `decoder` (hidden state -> logits) too.")
        self.prompt_ids = as_token_lists(prompts, tokenizer, "prompts")
        if token_labels is not None:
            if len(token_labels) != len(self.prompt_ids) or any(len(l) != len(i) for l, i in zip(token_labels, self.prompt_ids)):
                raise ValueError("Invalid value for token_labels: need one label per token of every prompt.")
            self.token_labels = [list(map(str, labels)) for labels in token_labels]
        else:
            self.token_labels = [token_strings(ids, tokenizer) for ids in self.prompt_ids]
        self.divergence = divergence
        self.settle_threshold = float(settle_threshold)
        self.deep_fraction = float(deep_fraction)
        self.hidden_states_fn = hidden_states
        self.decoder = decoder
        self.chunk_tokens = chunk_tokens

    def _prepare(self, model: nn.Module) -> int:
        decoder_modules = [self.decoder]
        if self.hidden_states_fn is not None:
            self._language_model = None
            self._decode = self.decoder
            with torch.no_grad():
                probe = torch.tensor([self.prompt_ids[0][:1]], device=self._device(model))
                layers = len(self.hidden_states_fn(model, probe))
            vocabulary, width = None, None
        else:
            language_model = find_language_model(model)
            self._language_model = language_model
            if self.decoder is not None:
                self._decode = self.decoder
            else:
                final_norm, unembed = find_decoder(language_model)
                self._decode = lambda state: unembed(final_norm(state))
                decoder_modules = [final_norm, unembed]
            config = language_model.config
            stack = find_layer_stack(language_model)
            if stack is None:
                raise ValueError(f"Cannot find the layers of {type(language_model).__name__} (no repeated blocks).")
            self._blocks = [block for _, block in stack[1]]
            layers = len(self._blocks)
            vocabulary = int(language_model.get_output_embeddings().weight.shape[0])
            width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
            limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            longest = max(len(ids) for ids in self.prompt_ids)
            if limit is not None and longest > limit:
                raise ValueError(f"Invalid value for prompts: a prompt has {longest} tokens, more than the model's {limit} positions.")
            bad = [i for ids in self.prompt_ids for i in ids if not 0 <= i < vocabulary]
            if bad:
                raise ValueError(f"Invalid value for prompts: token ids {bad[:5]} are outside the vocabulary (size {vocabulary}).")
        if layers < 1:
            raise ValueError(f"Cannot find the number of layers of {type(model).__name__}.")
        # Under FSDP2 the decoder is applied outside any forward: its units are gathered around each decode.
        self._decoder_units = fsdp2_units_of(model, decoder_modules)
        if vocabulary is not None and width is not None:
            longest = max(len(ids) for ids in self.prompt_ids)
            megabytes = 4 * (min(self.chunk_tokens, longest) * vocabulary * 6 + (layers + 1) * longest * width) / 2**20
            check_memory("logit lens", megabytes, self.max_memory_mb)
        return layers

    def _layer_states(self, model: nn.Module, ids: Tensor) -> tuple[list[Tensor], Tensor | None]:
        if self.hidden_states_fn is not None:
            return [state[0] for state in self.hidden_states_fn(model, ids)], None
        # Each layer's output, read by hooks on the layer stack (the same tensors as Hugging Face's
        # hidden_states[1:], without asking the model to keep them all). The last layer's distribution,
        # and the reference, is the model's own output: its final norm is applied once.
        states: list[Tensor] = []
        handles = [block.register_forward_hook(lambda m, a, out: states.append((out if isinstance(out, Tensor) else out[0])[0]))
                   for block in self._blocks]
        try:
            logits = self._language_model(input_ids=ids).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        return states, logits

    def _evaluate(self, model: nn.Module) -> LensResult:
        images, per_layer, depths = [], [], []
        layers = len(self.layer_labels)
        for index, (ids, labels) in enumerate(zip(self.prompt_ids, self.token_labels)):
            tensor = torch.tensor([ids], device=self._device(model))
            states, final_logits = self._layer_states(model, tensor)
            if len(states) != layers:
                raise ValueError(f"Got hidden states for {len(states)} layers, expected {layers}.")
            with gathered(self._decoder_units):
                values = logit_lens(states, self._decode, final_logits, self.divergence, self.chunk_tokens)
            distance = 1.0 - values if self.divergence == "top1" else values
            depth = settling_depth(distance, self.settle_threshold)
            matrix = values.T.cpu().numpy().astype(np.float64)  # (layers, tokens)
            depths.append(depth.cpu())
            per_layer.append(matrix.mean(axis=1))
            images.append(LensImage(
                name=f"prompt_{index}", values=matrix, row_labels=self.layer_labels, column_labels=labels,
                xlabel="token", kind="layer_x_token", color_limits=(0.0, 1.0) if self.divergence != "kl" else None,
                arrays={"settling_depth": depth.cpu().numpy(), "token_ids": np.asarray(ids)},
            ))
        all_depths = torch.cat(depths)
        scalars = {
            f"{self.output_name}/deep_thinking_share": deep_thinking_share(all_depths, layers, self.deep_fraction),
            f"{self.output_name}/mean_settling_depth": float(all_depths.float().mean()) + self.first_layer_index,
        }
        return LensResult(images, np.mean(per_layer, axis=0), scalars)
