"""``InterventionMonitor`` (core of ``InterventionHeatmap``): how much each layer's subject, attention edge and
last token matter, layer x site."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_heatmaps.core.lens import LensImage, LensMonitor, LensResult, as_token_lists, check_memory
from lightning_heatmaps.interventions import CORRUPTIONS, SITES, causal_mask_with_blocked_edges, corrupt
from lightning_heatmaps.layers import find_language_model, find_layer_stack
from lightning_heatmaps.lens import jensen_shannon_bits

ATTENTION_NAMES = ("self_attn", "attn", "attention")
BLOCKABLE = ("eager", "sdpa")

__all__ = ["ATTENTION_NAMES", "BLOCKABLE", "InterventionMonitor"]


def _output_tensor(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _with_tensor(output: Any, tensor: Tensor) -> Any:
    return tensor if isinstance(output, Tensor) else (tensor, *output[1:])


class InterventionMonitor(LensMonitor):
    """The measurement of :class:`lightning_heatmaps.InterventionHeatmap`, driven by explicit events (no trainer).

    The same arguments as :class:`lightning_heatmaps.InterventionHeatmap`.

    Example:
        >>> monitor = InterventionMonitor([[5, 6, 7, 8, 9]], subject_spans=[(1, 3)])
        >>> monitor.output_name
        'intervention_jsd'
    """

    metric = "intervention_jsd"
    summary_label = "mean_divergence"

    def __init__(
        self,
        prompts: Any,
        subject_spans: Sequence[tuple[int, int]] | None,
        tokenizer: Any = None,
        corruption: str = "noise",
        noise_scale: float = 3.0,
        window: int = 9,
        seed: int = 0,
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
        if corruption not in CORRUPTIONS:
            raise ValueError(f"Invalid value for corruption={corruption!r}: must be one of {CORRUPTIONS}.")
        if not isinstance(noise_scale, (int, float)) or noise_scale < 0:
            raise ValueError(f"Invalid value for noise_scale={noise_scale!r}: must be a number >= 0.")
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"Invalid value for window={window!r}: must be an integer >= 0.")
        self.prompt_ids = as_token_lists(prompts, tokenizer, "prompts")
        if not subject_spans or len(subject_spans) != len(self.prompt_ids):
            raise ValueError(
                f"Invalid value for subject_spans={subject_spans!r}: need one (start, end) span per prompt "
                f"({len(self.prompt_ids)} prompts)."
            )
        self.subject_spans = []
        for index, (span, ids) in enumerate(zip(subject_spans, self.prompt_ids)):
            if span is None or len(span) != 2:
                raise ValueError(f"Invalid subject span {span!r} for prompt {index}: need (start, end).")
            start, end = int(span[0]), int(span[1])
            if not 0 <= start < end <= len(ids) - 1:
                raise ValueError(
                    f"Invalid subject span ({start}, {end}) for prompt {index} of {len(ids)} tokens: need "
                    f"0 <= start < end <= {len(ids) - 1} (the subject ends before the last token)."
                )
            self.subject_spans.append((start, end))
        self.corruption, self.noise_scale, self.window, self.seed = corruption, float(noise_scale), window, seed

    def _prepare(self, model: nn.Module) -> int:
        self._model = find_language_model(model)
        implementation = getattr(self._model.config, "_attn_implementation", "eager") or "eager"
        if implementation not in BLOCKABLE:
            raise ValueError(
                f"InterventionHeatmap cannot block attention edges with attn_implementation={implementation!r}: "
                f"use one of {BLOCKABLE} (it takes an explicit attention mask)."
            )
        stack = find_layer_stack(self._model)
        if stack is None:
            raise ValueError(f"Cannot find the layers of {type(self._model).__name__}.")
        self._blocks = [block for _, block in stack[1]]
        self._attentions = []
        for index, block in enumerate(self._blocks):
            children = dict(block.named_children())
            found = next((children[name] for name in ATTENTION_NAMES if name in children), None)
            if found is None:
                raise ValueError(f"Cannot find the attention of layer {index} (looked for {ATTENTION_NAMES}).")
            self._attentions.append(found)
        layers = len(self._blocks)
        config = self._model.config
        width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)
        vocabulary = int(self._model.get_output_embeddings().weight.shape[0])
        longest = max(len(ids) for ids in self.prompt_ids)
        rows = 3 * layers + 1
        megabytes = 4 * rows * (longest * width * 8 + longest * longest * 4 + vocabulary * longest) / 2**20
        check_memory("intervention batch", megabytes, self.max_memory_mb)
        return layers

    def _prompt_divergences(self, ids: list[int], span: tuple[int, int], prompt_index: int, device: torch.device) -> Tensor:
        """``(layers, 3)`` JSD in bits of one prompt, all interventions in one batch (row 0 clean)."""
        layers, tokens = len(self._blocks), len(ids)
        rows = 3 * layers + 1
        subject = torch.arange(*span, device=device)
        last = tokens - 1
        batch = torch.tensor([ids], device=device).expand(rows, tokens)
        noise: dict[str, Tensor] = {}
        handles = []

        def scale_noise(module: nn.Module, args: tuple, output: Tensor) -> None:
            # The clean row's input embeddings, read in the model's own forward (under FSDP2 the embedding
            # is gathered there, and only there), size the seeded noise.
            if "value" in noise:
                return
            generator = torch.Generator().manual_seed(self.seed + prompt_index)
            noise["value"] = (torch.randn(tokens, output.shape[-1], generator=generator) * self.noise_scale
                              * output[0].float().std().cpu()).to(device)

        def corrupt_rows(layer: int) -> Any:
            def hook(module: nn.Module, args: tuple, output: Any) -> Any:
                states = _output_tensor(output)
                changed = states.clone()
                mean = states[0].mean(dim=0) if self.corruption == "mean" else None
                if self.corruption == "noise" and "value" not in noise:
                    raise RuntimeError("the input embeddings did not run before the layers, so the noise has no scale")
                for row, positions in ((1 + layer, subject), (1 + 2 * layers + layer, torch.tensor([last], device=device))):
                    part = noise["value"][positions] if self.corruption == "noise" else None
                    changed[row, positions] = corrupt(states[row, positions], self.corruption, part, mean)
                return _with_tensor(output, changed)
            return hook

        def block_edges(layer: int) -> Any:
            blocked = torch.zeros(rows, dtype=torch.bool)
            for centre in range(layers):
                # Exactly `window` layers centred on `centre`; an even window takes the extra layer before it.
                if centre - self.window // 2 <= layer < centre + (self.window + 1) // 2:
                    blocked[1 + layers + centre] = True

            def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                if not blocked.any():
                    return None
                states = kwargs.get("hidden_states", args[0] if args else None)
                kwargs["attention_mask"] = causal_mask_with_blocked_edges(
                    rows, tokens, blocked, subject, last, kwargs.get("attention_mask"), states.dtype, states.device)
                return args, kwargs
            return hook

        try:
            if self.corruption == "noise":
                handles.append(self._model.get_input_embeddings().register_forward_hook(scale_noise))
            for layer, (block, attention) in enumerate(zip(self._blocks, self._attentions)):
                handles.append(block.register_forward_hook(corrupt_rows(layer)))
                handles.append(attention.register_forward_pre_hook(block_edges(layer), with_kwargs=True))
            logits = self._model(input_ids=batch).logits[:, -1].float()
        finally:
            for handle in handles:
                handle.remove()
        log_probs = torch.log_softmax(logits, dim=-1)
        divergences = jensen_shannon_bits(log_probs[:1].expand_as(log_probs[1:]), log_probs[1:])
        return divergences.reshape(3, layers).T  # rows: Subj. (layer order), Attn., Last.

    def _evaluate(self, model: nn.Module) -> LensResult:
        total = None
        for index, (ids, span) in enumerate(zip(self.prompt_ids, self.subject_spans)):
            cells = self._prompt_divergences(ids, span, index, self._device(model))
            total = cells if total is None else total + cells
        table = (total / len(self.prompt_ids)).cpu().numpy().astype(np.float64)
        image = LensImage(name="layer_x_site", values=table, row_labels=self.layer_labels, column_labels=list(SITES),
                          xlabel="intervention site", kind="layer_x_site", arrays={"subject_spans": np.asarray(self.subject_spans)})
        scalars = {f"{self.output_name}/{site.rstrip('.').lower()}_max": float(table[:, i].max()) for i, site in enumerate(SITES)}
        return LensResult([image], table.mean(axis=1), scalars)
