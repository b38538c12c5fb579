"""``LogitLensHeatmap``: how far each layer's decoded prediction is from the final one, token x layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_heatmaps.distributed import fsdp2_units_of, gathered
from lightning_heatmaps.layers import find_decoder, find_language_model, find_layer_stack
from lightning_heatmaps.lens import DIVERGENCES, deep_thinking_share, logit_lens, settling_depth
from lightning_heatmaps.lens_base import LensCallback, LensImage, LensResult, as_token_lists, check_memory, token_strings


class LogitLensHeatmap(LensCallback):
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
        hidden_states: Callable[[pl.LightningModule, Tensor], Sequence[Tensor]] | None = None,
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
        super().__init__(every_n_steps, on_validation_end, capacity, history, first_layer_index, cmap, max_memory_mb, name)
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

    @override
    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        decoder_modules = [self.decoder]
        if self.hidden_states_fn is not None:
            self._language_model = None
            self._decode = self.decoder
            with torch.no_grad():
                probe = torch.tensor([self.prompt_ids[0][:1]], device=pl_module.device)
                layers = len(self.hidden_states_fn(pl_module, probe))
            vocabulary, width = None, None
        else:
            language_model = find_language_model(pl_module)
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
            raise ValueError(f"Cannot find the number of layers of {type(pl_module).__name__}.")
        # Under FSDP2 the decoder is applied outside any forward: its units are gathered around each decode.
        self._decoder_units = fsdp2_units_of(pl_module, decoder_modules)
        if vocabulary is not None and width is not None:
            longest = max(len(ids) for ids in self.prompt_ids)
            megabytes = 4 * (min(self.chunk_tokens, longest) * vocabulary * 6 + (layers + 1) * longest * width) / 2**20
            check_memory("logit lens", megabytes, self.max_memory_mb)
        return layers

    def _layer_states(self, pl_module: pl.LightningModule, ids: Tensor) -> tuple[list[Tensor], Tensor | None]:
        if self.hidden_states_fn is not None:
            return [state[0] for state in self.hidden_states_fn(pl_module, ids)], None
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

    @override
    def _evaluate(self, pl_module: pl.LightningModule) -> LensResult:
        images, per_layer, depths = [], [], []
        layers = len(self.layer_labels)
        for index, (ids, labels) in enumerate(zip(self.prompt_ids, self.token_labels)):
            tensor = torch.tensor([ids], device=pl_module.device)
            states, final_logits = self._layer_states(pl_module, tensor)
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
