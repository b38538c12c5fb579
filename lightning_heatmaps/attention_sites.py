"""Where :class:`~lightning_heatmaps.AttentionHeatmap` sees attention, without changing what the model computes.

Three kinds of site, found at fit start (:func:`find_attention_sites`), each installed only for the forward of
a sampled micro-batch (:class:`AttentionTaps`) and removed before its backward, so unsampled steps run no
extra code at all and forwards recomputed by activation checkpointing (during backward) are not seen:

- Hugging Face models (``transformers``): a wrapping function registered in transformers' public
  ``AttentionInterface`` (and the original's mask function in ``AttentionMaskInterface``) under a name of its
  own, set with the public ``set_attn_implementation`` while a sampled forward runs. It receives the
  attention module, query, key, the mask, ``scaling``, ``sliding_window`` and ``softcap`` as the model passes
  them, measures, and calls the original implementation (``eager``: the model's own ``eager_attention_forward``;
  ``sdpa``: transformers' ``sdpa_attention_forward``; ``flex_attention``: transformers'
  ``flex_attention_forward``, whose ``BlockMask`` is evaluated element by element, chunk by chunk) with the
  same arguments. FlashAttention (``flash_attention_2``/``_3``) is wrapped in place instead, under its own name
  in ``AttentionInterface`` for the sampled forward (the model picks its kernel by that name), and the keys each
  query sees are rebuilt from what the kernel gets: the 2D padding mask, packed ``cu_seq_lens`` or
  ``position_ids``, the causal flag and the window.
- ``nn.MultiheadAttention``: a forward pre-hook that recomputes q and k from its input projection.
- Any other model calling ``torch.nn.functional.scaled_dot_product_attention``: a
  ``TorchFunctionMode`` that sees the call, with forward pre-hooks on the blocks telling which layer runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_heatmaps.architectures import SUBTREES
from lightning_heatmaps.layers import _attention_projection, _stack_prefix, find_block_stacks

#: transformers' FlashAttention implementations (``flash_attention_forward``, its unpadding and packing), measured
#: by reconstructing the keys each query sees (:func:`~lightning_heatmaps.attention.flash_allowed`).
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
#: transformers attention implementations that are measured, by name.
MEASURED_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", *FLASH_IMPLEMENTATIONS)
_WRAPPED = "lightning_heatmaps_"

#: ``(row, query, key, scale, mask, causal, sliding_window, softcap, query_rows, bias=None)`` -> None
Recorder = Callable[..., None]


@dataclass
class AttentionSites:
    """What :func:`find_attention_sites` found: one row per attention (self and cross apart) and how to see it.

    Attributes:
        kind: ``transformers``, ``multihead`` or ``sdpa``.
        row_labels: one label per row (``0``, ``enc.0``, ``dec_xattn.0``: a block's cross attention).
        heads: query heads of each row.
        modules: attention module -> row (``transformers``, ``multihead``) or block -> row (``sdpa``).
        models: the Hugging Face models whose attention implementation is wrapped while sampling.
        cross: rows that are cross attention.
    """

    kind: str
    row_labels: list[str]
    heads: list[int]
    modules: dict[nn.Module, int]
    models: list[nn.Module] = field(default_factory=list)
    cross: set[int] = field(default_factory=set)


def _is_pretrained(module: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__)


def _is_hf_attention(module: nn.Module) -> bool:
    """A transformers attention module (the innermost of these calls the registered attention function)."""
    return type(module).__module__.startswith("transformers.") and "attention" in type(module).__name__.lower() and (
        hasattr(module, "config") or hasattr(module, "scaling") or hasattr(module, "num_heads")
    )


def _heads_of(module: nn.Module, num_heads: int | None) -> int | None:
    for attribute in ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) else num_heads


def _block_heads(block: nn.Module, num_heads: int | None) -> int | None:
    """Heads of a plain block: ``num_heads`` if given, else the first head-count attribute of a module in it."""
    if num_heads is not None:
        return num_heads
    for module in block.modules():
        count = _heads_of(module, None)
        if count is not None:
            return count
    return None


def hf_models(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face ``PreTrainedModel`` instances in ``model`` (itself included)."""
    found: list[nn.Module] = []
    for name, module in model.named_modules():
        if _is_pretrained(module) and not any(module is not outer and _contains(outer, module) for outer in found):
            found.append(module)
    return found


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


def check_attention_implementations(model: nn.Module, owner: str) -> None:
    """Refuse a Hugging Face model whose attention implementation is not measured.

    Raises:
        ValueError: an implementation other than ``eager``, ``sdpa`` or ``flex_attention`` (``flash_attention_2``,
            ``flash_attention_3``, a hub kernel), naming it, why, and what is supported.
    """
    for model_ in hf_models(model):
        _check_registries(model_, owner)
        implementation = model_.config._attn_implementation
        if implementation in FLASH_IMPLEMENTATIONS:
            _check_flash_registry(implementation, owner)
        if implementation not in MEASURED_IMPLEMENTATIONS and not str(implementation).startswith(_WRAPPED):
            why = "its kernel's masking and scaling are not known to this callback, so it is not measured exactly"
            raise ValueError(
                f"{owner} does not measure attn_implementation={implementation!r} of {type(model_).__name__}: {why}. "
                f"Supported: {', '.join(MEASURED_IMPLEMENTATIONS)} (e.g. model.set_attn_implementation('sdpa')), "
                "nn.MultiheadAttention, and plain calls of torch.nn.functional.scaled_dot_product_attention."
            )


def _check_flash_registry(implementation: str, owner: str) -> None:
    """A FlashAttention implementation is wrapped in place, under its own name (the model picks its kernel by that
    name): refuse when transformers' global registry entry does not reach the models (a local override)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[implementation]
    if getattr(original, "_lightning_heatmaps_flash", False):
        return

    def probe(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    AttentionInterface.register(implementation, probe)
    try:
        reaches = ALL_ATTENTION_FUNCTIONS[implementation] is probe
    finally:
        AttentionInterface.register(implementation, original)
    if not reaches:
        raise ValueError(
            f"{owner} cannot see attn_implementation={implementation!r}: transformers' AttentionInterface entry for it "
            "is overridden locally, so a function registered for it would not be called. Supported: "
            f"{', '.join(MEASURED_IMPLEMENTATIONS)} through transformers' public registries."
        )


def _check_registries(model: nn.Module, owner: str) -> None:
    """Refuse a transformers release without the public pieces the wrapper needs, naming what is missing."""
    missing = [] if hasattr(model, "set_attn_implementation") else [f"{type(model).__name__}.set_attn_implementation"]
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:
        missing.append("transformers.AttentionInterface / transformers.masking_utils.AttentionMaskInterface")
    if missing:
        import transformers

        raise RuntimeError(
            f"{owner} sees a Hugging Face model's attention through transformers' public attention registries, which "
            f"transformers {transformers.__version__} lacks ({'; '.join(missing)}). Upgrade transformers (tested with "
            ">= 5.20), or use a model calling torch.nn.functional.scaled_dot_product_attention or nn.MultiheadAttention."
        )


def check_attention_sharding(sites: AttentionSites, model: nn.Module, owner: str) -> None:
    """Refuse tensor parallelism: a parameter of an attention site that is a DTensor no ``fully_shard`` manages
    (each rank's attention would see only its own heads), or one sharded over more than one mesh dimension
    (tensor parallelism with FSDP2). FSDP2 alone (``fully_shard`` on a data-parallel mesh) passes: its
    forward gathers whole q/k projections.

    Raises:
        ValueError: naming the parameter, its placements and what is supported.

    Example:
        >>> block = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), num_layers=2)
        >>> check_attention_sharding(find_attention_sites(block), block, "AttentionHeatmap")
    """
    from lightning_heatmaps.distributed import SUPPORTED, _fsdp2_units, is_dtensor

    units = _fsdp2_units(model)
    names = {module: name for name, module in model.named_modules()}
    for site in sites.modules:
        for module in site.modules():
            for name, param in module.named_parameters(recurse=False):
                if not is_dtensor(param):
                    continue
                placements = tuple(param.placements)
                where = ".".join(part for part in (names.get(module, ""), name) if part)
                if units.get(module) is None or any(p.is_partial() for p in placements) or sum(p.is_shard() for p in placements) > 1:
                    raise ValueError(
                        f"{owner} does not support tensor parallelism: parameter {where} is a DTensor sharded as "
                        f"{placements}{'' if units.get(module) is not None else ' that no `fully_shard` manages'}, so "
                        f"each rank's attention would see only its own heads (or partial q/k). {SUPPORTED}."
                    )


def find_attention_sites(model: nn.Module, num_heads: int | None = None, first_layer_index: int = 0) -> AttentionSites:
    """The attention rows of ``model``: every attention module of every block, in model order.

    Raises:
        ValueError: no attention could be found (names what was looked for).

    Example:
        >>> sites = find_attention_sites(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), num_layers=2))
        >>> sites.kind, sites.row_labels, sites.heads
        ('multihead', ['0', '1'], [2, 2])
    """
    stacks = find_block_stacks(model)
    models = hf_models(model)
    kind = "transformers" if models else "multihead" if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()) else "sdpa"
    labels: list[str] = []
    heads: list[int] = []
    modules: dict[nn.Module, int] = {}
    cross: set[int] = set()
    used: set[str] = set()
    for stack_name, blocks in stacks:
        prefix = _stack_prefix(stack_name, used) if len(stacks) > 1 else ""
        for number, (_, block) in enumerate(blocks):
            label = str(number + first_layer_index)
            if kind == "sdpa":
                found = [("", block)]
            else:
                wanted = _is_hf_attention if kind == "transformers" else (lambda m: isinstance(m, nn.MultiheadAttention))
                candidates = [(name, m) for name, m in block.named_modules() if wanted(m)]
                # The innermost attention modules (BertAttention holds BertSelfAttention, which calls the function).
                found = [(name, m) for name, m in candidates
                         if not any(other is not m and _contains(m, other) for _, other in candidates)]
            for name, module in found:
                is_cross = any(SUBTREES.get(segment) == "xattn" for segment in name.split(".")) or name.endswith("multihead_attn")
                count = _heads_of(module, num_heads) if kind != "sdpa" else _block_heads(block, num_heads)
                if count is None:
                    if kind == "sdpa":
                        continue  # a block that says nothing of heads: not an attention block
                    raise ValueError(
                        f"AttentionHeatmap cannot tell how many heads {type(module).__name__} has: pass num_heads=..."
                    )
                stack = f"{prefix}_xattn" if prefix and is_cross else "xattn" if is_cross else prefix
                modules[module] = len(labels)
                if is_cross:
                    cross.add(len(labels))
                labels.append(f"{stack}.{label}" if stack else label)
                heads.append(int(count))
    if not labels:
        raise ValueError(
            f"AttentionHeatmap found no attention it can see in {type(model).__name__}: it looks for Hugging Face "
            f"attention modules (attn_implementation {', '.join(map(repr, MEASURED_IMPLEMENTATIONS))}), nn.MultiheadAttention, "
            "and, in a stack of repeated blocks (an nn.ModuleList/nn.Sequential) with a head count (a num_heads/n_heads "
            "attribute, or AttentionHeatmap(num_heads=...)), calls of torch.nn.functional.scaled_dot_product_attention."
        )
    return AttentionSites(kind, labels, heads, modules, models, cross)


# --- Hugging Face: a wrapped attention function in transformers' registries --------------------------

_ACTIVE_TAPS: list[AttentionTaps] = []


def _wrapped_function(base: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  *args: Any, **kwargs: Any) -> Any:
        if base == "eager":
            original = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            original = ALL_ATTENTION_FUNCTIONS[base]
        for taps in _ACTIVE_TAPS:
            taps.transformers_call(module, base, query, key, attention_mask, kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def _flash_wrapper(base: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (a FlashAttention implementation), seen by the active taps first; registered under ``base``
    itself for a sampled forward, because the model picks its kernel by the implementation's name."""

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  *args: Any, **kwargs: Any) -> Any:
        for taps in _ACTIVE_TAPS:
            taps.transformers_call(module, base, query, key, attention_mask, kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    attention._lightning_heatmaps_flash = True  # type: ignore[attr-defined]
    return attention


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"{_WRAPPED}{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapped_function(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _flash_dtype(module: nn.Module, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """q and k in the dtype the kernel gets them: transformers casts float32 inputs (PEFT's float32 norms) to the
    half-precision dtype it finds for the module (autocast, the weights) before the kernel."""
    if query.dtype != torch.float32:
        return query, key
    try:
        from transformers.integrations.flash_attention import get_target_dtype
    except ImportError:
        return query, key
    target = get_target_dtype(query, module)
    return (query, key) if target in (None, torch.float32) else (query.to(target), key.to(target))


def _is_block_mask(mask: Any) -> bool:
    return type(mask).__name__ == "BlockMask" and hasattr(mask, "mask_mod")


def _block_mask_rows(block_mask: Any, query: Tensor, key: Tensor) -> Callable[[Tensor], Tensor]:
    """The allowed keys ``[B, Hq, r, Lk]`` of a chunk of query rows under ``block_mask``."""
    from lightning_heatmaps.attention import block_mask_allowed

    device = query.device
    batch = torch.arange(query.shape[0], device=device)[:, None, None, None]
    head = torch.arange(query.shape[1], device=device)[None, :, None, None]
    keys = torch.arange(key.shape[-2], device=device)[None, None, None, :]
    return lambda rows: block_mask_allowed(block_mask, batch, head, rows.to(device)[None, None, :, None], keys)


# --- plain SDPA: a torch function mode -----------------------------------------------------------------


class _SdpaMode(TorchFunctionMode):
    def __init__(self, taps: AttentionTaps) -> None:
        super().__init__()
        self.taps = taps

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.taps.sdpa_call(*args, **kwargs)
        return func(*args, **kwargs)


class AttentionTaps:
    """Installs the sites for one sampled forward (:meth:`install`) and removes them (:meth:`remove`).

    Each attention call seen is passed to ``record(row, query, key, scale, mask, causal, sliding_window,
    softcap, query_rows)``.
    """

    def __init__(self, sites: AttentionSites, record: Recorder) -> None:
        self.sites = sites
        self.record = record
        self._handles: list[Any] = []
        self._restore: list[tuple[nn.Module, str]] = []
        self._registry_restore: list[tuple[str, Callable[..., Any]]] = []
        self._mode: _SdpaMode | None = None
        self._block: int | None = None
        self._rows_by_shape: dict[tuple[int, int], Tensor | None] = {}

    @property
    def installed(self) -> bool:
        return bool(self._handles or self._restore or self._registry_restore or self._mode is not None)

    def install(self) -> None:
        self._rows_by_shape = {}
        if self.sites.kind == "transformers":
            for model in self.sites.models:
                base = model.config._attn_implementation
                if base.startswith(_WRAPPED):
                    continue  # another AttentionHeatmap wrapped it for this forward: its function calls every taps
                if base in FLASH_IMPLEMENTATIONS:
                    self._wrap_flash(base)
                    continue
                self._restore.append((model, base))
                model.set_attn_implementation(_register(base))
            _ACTIVE_TAPS.append(self)
        elif self.sites.kind == "multihead":
            self._handles = [module.register_forward_pre_hook(self._multihead_hook, with_kwargs=True)
                             for module in self.sites.modules]
        else:
            self._handles = [block.register_forward_pre_hook(self._block_hook(row)) for block, row in self.sites.modules.items()]
            self._mode = _SdpaMode(self)
            self._mode.__enter__()

    def remove(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for model, base in self._restore:
            model.set_attn_implementation(base)
        self._restore = []
        if self._registry_restore:
            from transformers import AttentionInterface

            for base, original in reversed(self._registry_restore):
                AttentionInterface.register(base, original)
            self._registry_restore = []
        if self in _ACTIVE_TAPS:
            _ACTIVE_TAPS.remove(self)
        self._block = None

    def _wrap_flash(self, base: str) -> None:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = ALL_ATTENTION_FUNCTIONS[base]
        if getattr(original, "_lightning_heatmaps_flash", False):
            return  # wrapped already (another model of this one, or another AttentionHeatmap): it calls every taps
        AttentionInterface.register(base, _flash_wrapper(base, original))
        self._registry_restore.append((base, original))

    # --- the three kinds of call ---------------------------------------------------------------

    def transformers_call(self, module: nn.Module, base: str, query: Tensor, key: Tensor, mask: Tensor | None,
                          kwargs: dict[str, Any]) -> None:
        row = self.sites.modules.get(module)
        if row is None:
            return
        if query.shape[1] != self.sites.heads[row]:  # a wrong count would fill another row's cells
            raise RuntimeError(
                f"AttentionHeatmap expected {self.sites.heads[row]} query heads in row {self.sites.row_labels[row]} "
                f"({type(module).__name__}) but its attention call has {query.shape[1]}: tensor parallelism (heads "
                "split across ranks) is not supported."
            )
        bias = kwargs.get("position_bias")  # T5: added to the scores (after scaling; it is not part of q.k)
        if bias is not None and bias.dim() == 4:
            bias = bias[..., : key.shape[-2]]
        # attention sinks: one more logit per head (gpt-oss's s_aux) or per row (sinks) in every row's softmax
        sink = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
        if _is_block_mask(mask):  # flex_attention: its mask_mod, on index grids, a chunk of query rows at a time
            self.record(row, query, key, kwargs.get("scaling"), _block_mask_rows(mask, query, key), False, None,
                        kwargs.get("softcap"), self._block_mask_query_rows(row, mask, query, key), bias=bias, sink=sink)
            return
        if base in FLASH_IMPLEMENTATIONS:  # no mask: unpadding, packing, causal and window flags, as FlashAttention
            allowed, rows = self._flash_rows(row, module, query, key, mask, kwargs)
            query, key = _flash_dtype(module, query, key)
            self.record(row, query, key, kwargs.get("scaling"), allowed, False, None, kwargs.get("softcap"), rows,
                        bias=bias, sink=sink)
            return
        if mask is not None and mask.dim() == 4:
            mask = mask[..., : key.shape[-2]]
        # sdpa applies a causal mask itself when it was given none; eager applies none.
        causal = base == "sdpa" and mask is None and query.shape[-2] > 1 and bool(
            kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)
        )
        scale = kwargs.get("scaling")
        window = kwargs.get("sliding_window") if mask is None else None
        self.record(row, query, key, scale, mask, causal, window, kwargs.get("softcap"),
                    self._query_rows(row, query, key, mask), bias=bias, sink=sink)

    def _flash_rows(self, row: int, module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None,
                    kwargs: dict[str, Any]) -> tuple[Callable[[Tensor], Tensor], Tensor | None]:
        """What transformers' ``_flash_attention_forward`` hands the kernel, in its order: a 2D padding mask
        (unpadded), else ``cu_seq_lens_q/k`` (packed), else packed ``position_ids`` (batch 1, several increasing
        runs; a sequence starts at each smallest position), else the plain batch."""
        from lightning_heatmaps.attention import flash_allowed

        batch, length, keys = query.shape[0], query.shape[-2], key.shape[-2]
        if kwargs.get("block_table") is not None:
            raise RuntimeError("AttentionHeatmap does not measure paged FlashAttention (a block_table): a training "
                               "forward does not use it.")
        if mask is not None and mask.dim() != 2:
            raise RuntimeError(f"AttentionHeatmap expected FlashAttention's 2D padding mask in {type(module).__name__} "
                               f"but got a mask of shape {tuple(mask.shape)}; not measured.")
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        packed = mask is None and cu_q is not None and cu_k is not None and \
            kwargs.get("max_length_q") is not None and kwargs.get("max_length_k") is not None
        if mask is None and not packed:
            positions = kwargs.get("position_ids")
            if positions is not None and batch == 1 and positions.shape[-1] > 1:
                positions = positions.reshape(-1)
                if bool((positions[1:] < positions[:-1]).any()):  # several increasing runs: packed
                    starts = (positions == positions.min()).nonzero().view(-1)
                    cu_q = cu_k = torch.cat([starts, starts.new_tensor([positions.numel()])])
                    packed = True
        allowed, rows = flash_allowed(
            length, keys, causal=causal, sliding_window=kwargs.get("sliding_window"),
            padding=mask[:, -keys:] if mask is not None else None, cu_seqlens_q=cu_q if packed else None,
            cu_seqlens_k=cu_k if packed else None, batch=batch, device=query.device,
        )
        if row in self.sites.cross:  # the decoder's non-padding rows, among those the kernel computes
            decoder = self._rows_by_shape.get((batch, length))
            rows = decoder if rows is None else rows if decoder is None else rows & decoder.to(rows.device)
        else:
            self._rows_by_shape[(batch, length)] = rows
        return allowed, rows

    def _query_rows(self, row: int, query: Tensor, key: Tensor, mask: Tensor | None) -> Tensor | None:
        """Non-padding query rows: in self attention, those that may see themselves; cross attention reuses the
        latest self attention's rows of the same shape (the decoder's queries)."""
        batch, length = query.shape[0], query.shape[-2]
        if row in self.sites.cross:
            return self._rows_by_shape.get((batch, length))
        rows = None
        if mask is not None and key.shape[-2] == length:
            from lightning_heatmaps.attention import allowed_keys

            allowed = allowed_keys(mask)
            allowed = allowed.expand(batch, allowed.shape[1], length, length) if allowed.shape[-2] == length else None
            rows = None if allowed is None else torch.diagonal(allowed[:, 0], dim1=-2, dim2=-1)
        self._rows_by_shape[(batch, length)] = rows
        return rows

    def _block_mask_query_rows(self, row: int, mask: Any, query: Tensor, key: Tensor) -> Tensor | None:
        """As :meth:`_query_rows`, for a ``BlockMask``: in self attention, the rows that may see themselves."""
        batch, length = query.shape[0], query.shape[-2]
        if row in self.sites.cross:
            return self._rows_by_shape.get((batch, length))
        rows = None
        if key.shape[-2] == length:
            from lightning_heatmaps.attention import block_mask_allowed

            index = torch.arange(length, device=query.device)
            batches = torch.arange(batch, device=query.device)[:, None]
            rows = block_mask_allowed(mask, batches, torch.zeros_like(batches), index[None, :], index[None, :])
        self._rows_by_shape[(batch, length)] = rows
        return rows

    def _block_hook(self, row: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._block = row

        return hook

    def sdpa_call(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> None:
        if self._block is None:
            return
        self.record(self._block, query, key, scale, attn_mask, is_causal, None, None, None)

    def _multihead_hook(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
        call = dict(zip(names, args)) | kwargs
        query, key = call["query"], call["key"]
        self_attention = query is key
        if module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        length, batch, _ = query.shape
        keys = key.shape[0]
        with torch.no_grad():
            q = nn.functional.linear(query, *_attention_projection(module, 0))
            k = nn.functional.linear(key, *_attention_projection(module, 1))
        heads = module.num_heads
        q = q.reshape(length, batch, heads, -1).permute(1, 2, 0, 3)
        k = k.reshape(keys, batch, heads, -1).permute(1, 2, 0, 3)
        allowed = torch.ones(batch, 1, length, keys, dtype=torch.bool, device=q.device)
        attn_mask, padding = call.get("attn_mask"), call.get("key_padding_mask")
        additive = None
        if attn_mask is not None:
            attn_mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, heads, length, keys)
            if attn_mask.dtype == torch.bool:
                allowed = allowed & ~attn_mask
            else:
                additive = attn_mask.to(torch.float32)
        elif call.get("is_causal"):
            allowed = allowed & torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()
        rows = None
        if padding is not None:
            pad = padding if padding.dtype == torch.bool else padding < torch.finfo(padding.dtype).min / 2
            allowed = allowed & ~pad[:, None, None, :]
            rows = ~pad if self_attention else None
        if additive is not None:  # one additive mask carrying the boolean part as -inf
            mask = additive.expand(batch, additive.shape[-3] if additive.dim() == 4 else 1, length, keys).masked_fill(~allowed, float("-inf"))
        else:
            mask = allowed
        self.record(self.sites.modules[module], q, k, None, mask, False, None, None, rows)
