"""Resolution of a model's modules into ``(layer, component)`` pairs.

One resolver turns a model into a :class:`LayerMap`: the monitored components, each with the
parameters (or parameter slices, for fused projections) that make up its weights and the rule that
extracts its activation from a forward hook. Known architectures get canonical component names
(``attn.q attn.k attn.v attn.o mlp.up mlp.gate mlp.down``); anything else falls back to the largest
stack of repeated blocks, and a model without one still works with one layer per parameterised module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_heatmaps.architectures import (
    ADAPTER_SEGMENTS, COMPONENT_ORDER, EXPERT_PARAMETERS, FUSED_QKV_LAYOUTS, LEAVES, NORM_CLASS_HINTS,
    SEGMENT_ROLES, SUBTREES, WRAPPER_SEGMENTS, FusedLayout,
)
from lightning_heatmaps.layouts import confirm_expert_gate_up, confirm_fused_qkv, confirm_gate_up

CANONICAL_COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")


#: A user's choice of modules: ``{regex: component name}`` matched with :func:`re.search` against full
#: module names, or a callable ``(name, module) -> (layer, component) | None``.
ModuleSelection = Union[Mapping[str, str], Callable[[str, nn.Module], Union[tuple[int, str], None]]]


def selection_key(modules: ModuleSelection | None) -> str:
    """What identifies a ``modules`` selection in every process, for a callback's ``state_key``.

    A mapping is its own ``repr`` (regexes and names). A callable is named by its module, qualified name and, for
    a function (a lambda too), the line it is defined on: its ``repr`` holds a memory address, which differs in
    the process that resumes the run. Two callables with the same name are told apart by ``name=``.

    Example:
        >>> selection_key({"mlp$": "mlp"})
        "{'mlp$': 'mlp'}"
        >>> selection_key(len)
        'builtins.len'
    """
    if modules is None or isinstance(modules, Mapping):
        return repr(modules)
    function = getattr(modules, "__func__", modules)  # a bound method: its function
    if not hasattr(function, "__qualname__"):
        function = type(function)  # a callable object: its class
    code = getattr(function, "__code__", None)
    line = f":{code.co_firstlineno}" if code is not None else ""
    return f"{getattr(function, '__module__', None)}.{function.__qualname__}{line}"


@dataclass(frozen=True)
class FusedPart:
    """Part ``index`` of a fused dimension laid out as ``groups`` repeats of segments of ``sizes``.

    ``sizes`` lists the segments in storage order within one group; part ``index`` is segment ``index`` of
    every group. ``groups == 1`` is a contiguous layout (GPT-2's ``[q | k | v]``, Phi-3's ``[q | k | v]``
    with smaller k and v under grouped-query attention); ``groups > 1`` interleaves per head or per group
    (GPT-NeoX: ``[q_h k_h v_h]`` for each head ``h``).

    Example:
        >>> FusedPart((2, 2, 2), index=1).take(torch.arange(6.0), dim=0)
        tensor([2., 3.])
        >>> FusedPart((1, 1), index=1, groups=2).take(torch.arange(4.0), dim=0).flatten()
        tensor([1., 3.])
    """

    sizes: tuple[int, ...]
    index: int
    groups: int = 1

    @property
    def parts(self) -> int:
        return len(self.sizes)

    @property
    def fraction(self) -> tuple[int, int]:
        """``(numerator, denominator)`` of the fused dimension this part covers."""
        return self.sizes[self.index], sum(self.sizes)

    def take(self, tensor: Tensor, dim: int) -> Tensor:
        dim = dim % tensor.dim()
        offset = sum(self.sizes[: self.index])
        if self.groups == 1:
            return tensor.narrow(dim, offset, self.sizes[self.index])
        grouped = tensor.unflatten(dim, (self.groups, sum(self.sizes)))
        return grouped.narrow(dim + 1, offset, self.sizes[self.index])


@dataclass(frozen=True)
class ParamRef:
    """A parameter, or the slice of a fused parameter, that belongs to one component.

    The parameter is looked up through its module (``module.<attribute>``) each time it is read, never
    kept: sharding (``fully_shard``) and wrappers replace parameter objects after resolution.
    """

    name: str
    module: nn.Module
    attribute: str
    dim: int = 0
    part: FusedPart | None = None

    @property
    def param(self) -> nn.Parameter:
        """The parameter as the module holds it now (a DTensor under FSDP2)."""
        return self.module.get_parameter(self.attribute)

    def view(self, tensor: Tensor) -> Tensor:
        """The slice of ``tensor`` (the parameter itself, its gradient or an update) for this ref."""
        return tensor if self.part is None else self.part.take(tensor, self.dim)

    def global_indices(self, size: int) -> Tensor | None:
        """Indices along :attr:`dim` of the full parameter that this ref covers (``None``: all of them)."""
        return None if self.part is None else self.part.take(torch.arange(size), 0).flatten()

    @property
    def numel(self) -> int:
        return self.numel_of(self.param.shape)

    def numel_of(self, shape: Any) -> int:
        """Elements of this ref in a parameter of full shape ``shape``."""
        total = math.prod(shape)
        if self.part is None:
            return total
        covered, whole = self.part.fraction
        return total * covered // whole


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return getattr(output, "last_hidden_state", None)


@dataclass(frozen=True)
class ModuleOutput:
    """Activation = the hooked module's output (its first tensor), or one fused part of its last dim."""

    part: FusedPart | None = None

    def __call__(self, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
        tensor = _first_tensor(output)
        if tensor is None or self.part is None:
            return tensor
        return self.part.take(tensor, -1)


@dataclass(frozen=True)
class AttentionInputProjection:
    """q, k or v of :class:`torch.nn.MultiheadAttention`, recomputed from the attention's inputs.

    ``MultiheadAttention`` projects inside ``F.multi_head_attention_forward`` with no submodule to hook,
    so on sampled steps the projection ``x @ W_i.T + b_i`` is recomputed (one matmul per part).
    """

    attention: nn.MultiheadAttention
    index: int

    def __call__(self, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
        names = ("query", "key", "value")
        x = args[self.index] if len(args) > self.index else kwargs.get(names[self.index])
        if x is None:
            return None
        weight, bias = _attention_projection(self.attention, self.index)
        with torch.no_grad():
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _attention_projection(attention: nn.MultiheadAttention, index: int) -> tuple[Tensor, Tensor | None]:
    embed = attention.embed_dim
    bias = attention.in_proj_bias
    bias_part = None if bias is None else bias[index * embed : (index + 1) * embed]
    if attention.in_proj_weight is not None:
        return attention.in_proj_weight[index * embed : (index + 1) * embed], bias_part
    separate = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    return separate[index], bias_part


@dataclass(frozen=True)
class Component:
    """One monitored component: where it sits (``layer``, ``name``), its weights and its activation.

    A component can span several modules (the experts of a mixture-of-experts layer stored as a
    ``ModuleList``): their statistics pool exactly. ``activation`` is ``None`` where the output cannot be
    observed with a hook (experts fused into one 3-D parameter compute inside a single forward).
    """

    layer: int
    name: str
    module_name: str
    module: nn.Module
    params: tuple[ParamRef, ...]
    activation: Callable[[tuple, dict, Any], Tensor | None] | None
    modules: tuple[nn.Module, ...] = ()

    @property
    def hooked_modules(self) -> tuple[nn.Module, ...]:
        """The modules whose forward outputs are this component's activation."""
        return self.modules or (self.module,)


@dataclass
class LayerMap:
    """What is monitored: the components, layer and component labels, and what was skipped.

    Example:
        >>> model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), num_layers=2)
        >>> layer_map = resolve_layers(model)
        >>> layer_map.layer_labels, layer_map.component_names
        (['0', '1'], ['attn.q', 'attn.k', 'attn.v', 'attn.o', 'mlp.up', 'mlp.down'])
    """

    components: list[Component]
    layer_labels: list[str]
    component_names: list[str]
    architecture: str
    skipped: list[str] = field(default_factory=list)
    #: why each skipped module is not monitored (``norm``, ``embedding``, ``outside the blocks``, ...)
    reasons: dict[str, str] = field(default_factory=dict)
    #: how a monitored module is monitored where that needs saying (a fused projection monitored whole, and why)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_labels)

    def describe(self) -> str:
        """A one-paragraph report of what is monitored and what was skipped."""
        text = (
            f"{self.num_layers} layers x {len(self.component_names)} components "
            f"({len(self.components)} monitored, architecture: {self.architecture}): "
            f"{', '.join(self.component_names)}."
        )
        if self.skipped:
            groups: dict[tuple[str, str], int] = {}
            for name in self.skipped:
                key = (re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name), self.reasons.get(name, ""))
                groups[key] = groups.get(key, 0) + 1
            shown = [
                f"{key}{f' (x{count})' if count > 1 else ''}{f' [{reason}]' if reason else ''}"
                for (key, reason), count in groups.items()
            ]
            text += f" Not monitored (modules with parameters): {', '.join(shown[:24])}{', ...' if len(shown) > 24 else ''}."
        if self.notes:
            groups_of_notes: dict[tuple[str, str], int] = {}
            for name, note in self.notes.items():
                key = (re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name), note)
                groups_of_notes[key] = groups_of_notes.get(key, 0) + 1
            text += "".join(f" {key}{f' (x{count})' if count > 1 else ''}: {note}."
                            for (key, note), count in groups_of_notes.items())
        return text


def layer_tags(num_layers: int, first_layer_index: int = 0, labels: list[str] | None = None) -> list[str]:
    """Scalar-tag names of the layers, zero-padded to the widest number so they sort in order.

    With ``labels`` of several stacks (``enc.0``, ``dec.0``), the stack's prefix leads: ``layer_enc_00``.

    Example:
        >>> layer_tags(12)[:2], layer_tags(12)[-1]
        (['layer_00', 'layer_01'], 'layer_11')
        >>> layer_tags(3, labels=["enc.0", "enc.1", "dec.0"])
        ['layer_enc_0', 'layer_enc_1', 'layer_dec_0']
    """
    if labels is not None and not all(label.isdigit() for label in labels):
        split = [label.rsplit(".", 1) if "." in label else ["", label] for label in labels]
        width = max(len(number) for _, number in split)
        return [f"layer_{prefix}_{int(number):0{width}d}" if prefix else f"layer_{label}" for (prefix, number), label
                in zip(split, labels)]
    width = len(str(num_layers - 1 + first_layer_index))
    return [f"layer_{i + first_layer_index:0{width}d}" for i in range(num_layers)]


# --- Resolution by content -----------------------------------------------------------------------
# The vocabulary (which names mean which component, how fused projections are laid out) is data, in
# `architectures.py`; what follows applies it to a block.


def _own_params(module_name: str, module: nn.Module) -> tuple[ParamRef, ...]:
    return tuple(ParamRef(f"{module_name}.{n}" if module_name else n, module, n) for n, _ in module.named_parameters(recurse=False))


def _all_params(module_name: str, module: nn.Module) -> tuple[ParamRef, ...]:
    return tuple(ParamRef(f"{module_name}.{n}", module, n) for n, _ in module.named_parameters())


def _attention_components(module_name: str, attention: nn.MultiheadAttention) -> list:
    result = []
    embed = attention.embed_dim
    for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
        refs = []
        if attention.in_proj_weight is not None:
            part = FusedPart((embed, embed, embed), index)
            refs.append(ParamRef(f"{module_name}.in_proj_weight", attention, "in_proj_weight", 0, part))
        else:
            param_name = ("q_proj_weight", "k_proj_weight", "v_proj_weight")[index]
            refs.append(ParamRef(f"{module_name}.{param_name}", attention, param_name))
        if attention.in_proj_bias is not None:
            part = FusedPart((embed, embed, embed), index)
            refs.append(ParamRef(f"{module_name}.in_proj_bias", attention, "in_proj_bias", 0, part))
        result.append((name, tuple(refs), AttentionInputProjection(attention, index)))
    # out_proj's weights are applied functionally: its module hook never fires, the attention's output is o.
    result.append(("attn.o", _own_params(f"{module_name}.out_proj", attention.out_proj), ModuleOutput()))
    return result


def _has_own_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _block_candidates(model: nn.Module) -> list[tuple[int, str, list[tuple[str, nn.Module]]]]:
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if len(children) < 2 or len({type(child) for _, child in children}) != 1:
            continue
        size = _param_count(module)
        if size > 0:
            candidates.append((size, name, children))
    return candidates


def find_layer_stack(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]] | None:
    """The largest ``ModuleList``/``Sequential`` of two or more blocks of one class, by parameter count.

    Example:
        >>> find_layer_stack(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))  # no repeated blocks
    """
    candidates = _block_candidates(model)
    if not candidates:
        return None
    _, name, children = max(candidates, key=lambda candidate: candidate[0])
    return name, children


def find_block_stacks(model: nn.Module, share: float = 0.1) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """Every outermost stack of repeated blocks holding at least ``share`` of the largest one's parameters,
    in model order (an encoder-decoder model has two: the encoder's blocks and the decoder's).

    Example:
        >>> [name for name, _ in find_block_stacks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))]
        []
    """
    candidates = _block_candidates(model)
    def inside(inner: str, outer: str) -> bool:
        return inner != outer and (outer == "" or inner.startswith(outer + "."))

    outermost = [c for c in candidates if not any(inside(c[1], o[1]) for o in candidates)]
    if not outermost:
        return []
    largest = max(size for size, _, _ in outermost)
    return [(name, children) for size, name, children in outermost if size >= share * largest]


def _without_compile_wrapper(name: str) -> str:
    """Drop wrapper segments (``torch.compile``'s ``_orig_mod``, FSDP1's ``_fsdp_wrapped_module``, activation
    checkpointing's ``_checkpoint_wrapped_module``): a wrapped block keeps its components' names."""
    pattern = "|".join(WRAPPER_SEGMENTS)
    return re.sub(rf"(^|\.)({pattern})(?=\.|$)", "", name).lstrip(".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def find_config(model: nn.Module) -> Any:
    """The Hugging Face config of ``model`` (its own, or the first submodule's with a ``model_type``), else None."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "model_type", None):
            return config
    return None


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or any(hint in name for hint in NORM_CLASS_HINTS)


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__


def _weight_dim(module: nn.Module) -> int:
    """The output-feature dimension of a linear-like module's weight (GPT-2's ``Conv1D`` stores ``(in, out)``)."""
    return 1 if type(module).__name__ == "Conv1D" else 0


def _owners(block: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The parameterised units of a block, each once: ``(relative name, module, kind)``.

    A peft-wrapped projection (its ``base_layer`` and adapters) is one unit, ``kind="adapter"``; so is an
    ``nn.MultiheadAttention`` (``"mha"``); a module with a 3-D parameter is a fused experts unit
    (``"experts"``); every other module with parameters of its own is ``"leaf"``.
    """
    modules = {_without_compile_wrapper(n): m for n, m in block.named_modules()}
    owners: list[tuple[str, nn.Module, str]] = []
    taken: list[str] = []
    for rel, module in modules.items():
        if any(rel == t or rel.startswith(t + ".") for t in taken):
            continue
        segments = rel.split(".") if rel else []
        marker = next((i for i, segment in enumerate(segments) if segment in ADAPTER_SEGMENTS), None)
        if marker is not None:
            wrapper = ".".join(segments[:marker])
            if not any(o[0] == wrapper for o in owners):
                owners.append((wrapper, modules[wrapper], "adapter"))
                taken.append(wrapper)
            continue
        if isinstance(module, nn.MultiheadAttention):
            owners.append((rel, module, "mha"))
            taken.append(rel)
        elif any(segment in ADAPTER_SEGMENTS for segment in (n.split(".")[0] for n, _ in module.named_children())):
            owners.append((rel, module, "adapter"))
            taken.append(rel)
        elif _has_own_params(module):
            kind = "experts" if any(p.dim() == 3 for p in module.parameters(recurse=False)) else "leaf"
            owners.append((rel, module, kind))
    return owners


def _subtree(segments: list[str]) -> str:
    """The component prefix of a leaf at ``segments``: ``attn``, ``xattn``, ``mlp``, ``mlp.experts``, ``mlp.shared`` or ``""``."""
    found, position = "", len(segments)
    for index, segment in enumerate(segments[:-1]):
        if SUBTREES.get(segment) in ("attn", "xattn", "mlp"):
            found, position = SUBTREES[segment], index
            break
    if found == "mlp":
        for segment in segments[position + 1 :]:
            if SUBTREES.get(segment) in ("mlp.experts", "mlp.shared"):
                return SUBTREES[segment]
    return found


def _role(segments: list[str], prefix: str) -> str | None:
    leaf = segments[-1]
    table = LEAVES["mlp"] if prefix.startswith("mlp") else LEAVES["attn"] if prefix in ("attn", "xattn") else LEAVES[""]
    role = table.get(leaf)
    if role is None and prefix == "":
        return LEAVES[""].get(leaf)
    if role is None and leaf == "dense" and len(segments) > 1:
        role = SEGMENT_ROLES.get(segments[-2])
    return role


def _qkv_candidate(param: Tensor, config: Any, weight_dim: int) -> FusedLayout | None:
    """The vocabulary's q/k/v layout for ``config`` (confirmed or refuted by ``confirm_fused_qkv``), if it fits."""
    rule = FUSED_QKV_LAYOUTS.get(getattr(config, "model_type", None) or "", FUSED_QKV_LAYOUTS["default"])
    try:
        layout = rule(config)
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    names, sizes, groups = layout
    return layout if sum(sizes) * groups == param.shape[weight_dim] else None


@dataclass
class _Resolved:
    components: list[Component] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    #: the model being resolved, for the fused-layout probe (``None``: resolved without one)
    model: nn.Module | None = None
    #: the fused-layout probe's observations in this resolution (one probe per attention class and config)
    probes: dict[Any, Any] = field(default_factory=dict)
    #: each module's parent, by id, built when the first fused projection needs it
    parents: dict[int, nn.Module] = field(default_factory=dict)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(name)
        self.reasons[name] = reason


def _config_owner(model: nn.Module) -> nn.Module | None:
    """The module that holds the config :func:`find_config` returns (its own attribute: not a ``torch.compile``
    wrapper, which forwards attribute reads to the module it wraps)."""
    for module in model.modules():
        config = vars(module).get("config")
        if config is not None and getattr(config, "model_type", None):
            return module
    return None


def _confirmed_qkv_layout(full: str, module: nn.Module, weight: Tensor, config: Any, weight_dim: int,
                          resolved: _Resolved, whole: str) -> tuple[FusedLayout | None, int]:
    """The layout of fused q/k/v projection ``module`` as the attention's own forward shows it, else ``None``.

    The vocabulary's layout for the config is only a candidate: :func:`~lightning_heatmaps.layouts.confirm_fused_qkv`
    runs a copy of the attention on markers; a layout it does not confirm is noted in ``resolved``.
    """
    candidate = _qkv_candidate(weight, config, weight_dim) if config is not None else None
    model = resolved.model
    if model is not None and not resolved.parents:
        resolved.parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    parent = resolved.parents.get(id(module))
    if model is None or parent is None:
        resolved.notes[full] = f"fused q/k/v layout not confirmed (no attention module holds it): monitored whole as {whole}"
        return None, weight_dim
    owner = _config_owner(model) if config is not None else None
    if owner is not None:
        relative = next((n for n, m in owner.named_modules() if m is module), None)
        owner = owner if relative is not None else None
    if owner is None:
        relative = next(n for n, c in parent.named_children() if c is module)
    source = f"model_type {getattr(config, 'model_type', None)!r}" if config is not None else ""
    confirmation = confirm_fused_qkv(owner, parent, _without_compile_wrapper(relative), candidate, source,
                                     cache=resolved.probes)
    reason = confirmation.reason
    if confirmation.layout is not None and confirmation.weight_dim is not None:
        _, sizes, groups = confirmation.layout
        if sum(sizes) * groups != weight.shape[confirmation.weight_dim]:
            reason = f"the copy's {sum(sizes) * groups} output features differ from the weight's shape {tuple(weight.shape)}"
    if confirmation.layout is None or reason:
        resolved.notes[full] = f"fused q/k/v layout not confirmed ({reason}): monitored whole as {whole}"
        return None, weight_dim
    if confirmation.note:
        resolved.notes[full] = confirmation.note
    return confirmation.layout, weight_dim if confirmation.weight_dim is None else confirmation.weight_dim


def _fused_components(layer: int, full: str, module: nn.Module, owner_params: tuple[ParamRef, ...], prefix: str,
                      layout: FusedLayout, weight_dim: int) -> list[Component]:
    names, sizes, groups = layout
    result = []
    for index, name in enumerate(names):
        part = FusedPart(sizes, index, groups)
        refs = tuple(ParamRef(ref.name, ref.module, ref.attribute, weight_dim if ref.param.dim() > 1 else 0, part)
                     for ref in owner_params)
        result.append(Component(layer, f"{prefix}.{name}", full, module, refs, ModuleOutput(part)))
    return result


def _expert_components(layer: int, full: str, module: nn.Module, prefix: str, config: Any,
                       resolved: _Resolved) -> list[Component]:
    """Experts fused into 3-D parameters ``[experts, ...]``: one component per role, over all experts.

    A bias (``<weight>_bias``, ``[experts, out]``) pools with its weight's role, split as its weight is. A fused
    ``gate_up`` tensor is split only where its layout is confirmed
    (:func:`~lightning_heatmaps.layouts.confirm_expert_gate_up`); otherwise it is monitored whole as
    ``<prefix>.gate_up`` and the reason is noted.
    """
    weights = {a: p for a, p in module.named_parameters(recurse=False) if p.dim() == 3 and a in EXPERT_PARAMETERS}
    biases = {a: a[: -len("_bias")] for a, _ in module.named_parameters(recurse=False)
              if a.endswith("_bias") and a[: -len("_bias")] in weights}
    by_name: dict[str, list[ParamRef]] = {}
    for attribute, param in module.named_parameters(recurse=False):
        name = f"{full}.{attribute}"
        weight = biases.get(attribute, attribute)
        role = EXPERT_PARAMETERS.get(weight) if weight in weights else None
        if role is None:
            by_name.setdefault(_join(prefix, attribute), []).append(ParamRef(name, module, attribute))
            continue
        if role != "fused:gate_up":
            by_name.setdefault(f"{prefix}.{role}", []).append(ParamRef(name, module, attribute))
            continue
        layout = confirm_expert_gate_up(module, weights[weight], config)
        if isinstance(layout, str):
            resolved.notes[f"{full}.{weight}"] = (f"fused gate/up layout not confirmed ({layout}): monitored whole as "
                                                  f"{prefix}.gate_up")
            by_name.setdefault(f"{prefix}.gate_up", []).append(ParamRef(name, module, attribute))
            continue
        dim, (names, sizes, groups) = layout
        gate, up = (FusedPart(sizes, names.index(part), groups) for part in ("gate", "up"))
        dim = dim if attribute == weight else 1  # a bias [experts, out]: its output dimension is 1
        by_name.setdefault(f"{prefix}.gate", []).append(ParamRef(name, module, attribute, dim, gate))
        by_name.setdefault(f"{prefix}.up", []).append(ParamRef(name, module, attribute, dim, up))
    return [Component(layer, name, full, module, tuple(refs), None) for name, refs in by_name.items()]


def _gate_up_layout(block: nn.Module, rel: str, config: Any, resolved: _Resolved) -> FusedLayout | str:
    """The confirmed layout of the fused gate/up leaf at ``rel`` in ``block`` (its MLP probed once per class)."""
    if "." not in rel:
        return "it has no enclosing MLP to probe"
    parent_name, fused_name = rel.rsplit(".", 1)
    parent = block.get_submodule(parent_name)
    downs = [name for name, _ in parent.named_children() if LEAVES["mlp"].get(name) == "down"]
    if len(downs) != 1:
        return "its MLP has no single down projection to read"
    key = ("gate_up", type(parent), fused_name, downs[0])
    if key not in resolved.probes:
        resolved.probes[key] = confirm_gate_up(parent, fused_name, downs[0], config)
    return resolved.probes[key]


def _resolve_block(layer: int, prefix: str, block: nn.Module, config: Any, resolved: _Resolved) -> None:
    owners = _owners(block)
    has_experts = any(kind == "experts" or "experts" in rel.split(".") for rel, _, kind in owners)
    for rel, module, kind in owners:
        full = _join(prefix, rel)
        segments = rel.split(".") if rel else [type(module).__name__.lower()]
        if kind == "mha":
            for name, refs, activation in _attention_components(full, module):
                resolved.components.append(Component(layer, name, full, module, refs, activation))
            continue
        base = module.get_submodule("base_layer") if kind == "adapter" and hasattr(module, "base_layer") else module
        if kind != "adapter" and _is_norm(module):
            resolved.skip(full, "norm")
            continue
        if kind != "adapter" and _is_embedding(module):
            resolved.skip(full, "embedding")
            continue
        subtree = _subtree(segments)
        params = _all_params(full, module) if kind == "adapter" else _own_params(full, module)
        if kind == "experts":
            resolved.components += _expert_components(layer, full, module, subtree if subtree == "mlp.experts" else
                                                      _join(subtree, "experts") if subtree else "mlp.experts", config,
                                                      resolved)
            continue
        if not any(ref.param.dim() >= 2 for ref in params):
            resolved.skip(full, "no weight matrix")
            continue
        role = _role(segments, subtree)
        if role is not None and role.startswith("fused:") and kind != "adapter":
            weight_dim = _weight_dim(base)
            weight = next(ref.param for ref in params if ref.param.dim() >= 2)
            if role == "fused:qkv":
                layout, weight_dim = _confirmed_qkv_layout(full, module, weight, config, weight_dim, resolved,
                                                           whole=_join(subtree, "qkv"))
            else:  # fused:gate_up
                layout = _gate_up_layout(block, rel, config, resolved)
                if isinstance(layout, str):
                    resolved.notes[full] = (f"fused gate/up layout not confirmed ({layout}): monitored whole as "
                                            f"{_join(subtree, 'gate_up')}")
                    layout = None
            if layout is not None:
                resolved.components += _fused_components(layer, full, module, params, subtree, layout, weight_dim)
                continue
            role = "qkv" if role == "fused:qkv" else "gate_up"  # unknown layout: monitored whole, under its role
        elif role is not None and role.startswith("fused:"):
            role = role.split(":")[1]  # an adapter on a fused projection: monitored whole
        if role is None:
            name = rel or type(module).__name__.lower()
        elif role == "router":
            name = "mlp.router" if has_experts else f"{subtree}.gate"
        elif role == "router.shared":
            name = "mlp.shared.router"
        elif "." in role:
            name = role  # a block-level leaf with a full name (fc1 -> mlp.up)
        else:
            name = f"{subtree}.{role}" if subtree else role
        resolved.components.append(Component(layer, name, full, module, params, ModuleOutput()))


def _merge(components: list[Component]) -> list[Component]:
    """One component per ``(layer, name)``: the experts of a ``ModuleList`` pool into one, exactly."""
    merged: dict[tuple[int, str], Component] = {}
    for component in components:
        key = (component.layer, component.name)
        if key not in merged:
            merged[key] = component
            continue
        first = merged[key]
        modules = tuple(dict.fromkeys((*first.hooked_modules, *component.hooked_modules)))
        activation = first.activation if first.activation is not None and component.activation is not None else None
        if activation is not None and (first.activation != ModuleOutput() or component.activation != ModuleOutput()):
            activation = None  # parts of fused outputs of several modules: not one hookable output
        merged[key] = Component(first.layer, first.name, first.module_name, first.module, first.params + component.params,
                                activation, modules)
    return list(merged.values())


def _ordered_names(components: list[Component]) -> list[str]:
    seen: dict[str, None] = {}
    for component in components:
        seen.setdefault(component.name, None)
    canonical = [name for name in COMPONENT_ORDER if name in seen]
    return canonical + [name for name in seen if name not in COMPONENT_ORDER]


def _stack_prefix(name: str, used: set[str]) -> str:
    lowered = name.lower()
    prefix = "enc" if "encoder" in lowered else "dec" if "decoder" in lowered else name.rsplit(".", 1)[-1] or "blocks"
    while prefix in used:
        prefix += "_"
    used.add(prefix)
    return prefix


def _resolve_automatic(model: nn.Module, first_layer_index: int) -> tuple[_Resolved, str, list[str]]:
    stacks = find_block_stacks(model)
    resolved = _Resolved()
    if not stacks:
        parameterised = [(n, m) for n, m in model.named_modules() if _has_own_params(m)]
        resolved.components = [
            Component(i, type(module).__name__, name, module, _own_params(name, module), ModuleOutput())
            for i, (name, module) in enumerate(parameterised)
        ]
        return resolved, "no repeated blocks: one layer per parameterised module", [c.module_name for c in resolved.components]
    config = find_config(model)
    resolved.model = model
    labels: list[str] = []
    used: set[str] = set()
    for stack_name, blocks in stacks:
        prefix = _stack_prefix(stack_name, used) if len(stacks) > 1 else ""
        for number, (child_name, block) in enumerate(blocks):
            labels.append(f"{prefix}.{number + first_layer_index}" if prefix else str(number + first_layer_index))
            _resolve_block(len(labels) - 1, _join(stack_name, child_name), block, config, resolved)
    resolved.components = _merge(resolved.components)
    inside = [_join(stack_name, child_name) for stack_name, blocks in stacks for child_name, _ in blocks]
    for name, module in model.named_modules():
        name = _without_compile_wrapper(name)
        if _has_own_params(module) and not any(name == p or name.startswith(p + ".") for p in inside):
            resolved.skip(name, "embedding" if _is_embedding(module) else "norm" if _is_norm(module) else "outside the blocks")
    model_type = getattr(config, "model_type", None) if config is not None else None
    architecture = model_type or f"generic blocks of {type(stacks[0][1][0][1]).__name__}"
    return resolved, architecture, labels


def _layer_number(name: str, pattern: re.Match | None) -> int | None:
    if pattern is not None and "layer" in (pattern.re.groupindex or {}):
        return int(pattern.group("layer"))
    numbers = [part for part in name.split(".") if part.isdigit()]
    return int(numbers[0]) if numbers else None


def _some_names(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, m in model.named_modules() if n and _has_own_params(m)]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _resolve_selected(model: nn.Module, modules: ModuleSelection) -> tuple[list[Component], list[str], dict[int, int]]:
    """Components chosen by a user mapping or callable; layers keyed by the number found in the name."""
    chosen: list[tuple[int, str, str, nn.Module]] = []
    if callable(modules) and not isinstance(modules, Mapping):
        for name, module in model.named_modules():
            picked = modules(name, module)
            if picked is not None:
                layer, component = picked
                chosen.append((int(layer), str(component), name, module))
        if not chosen:
            raise ValueError(
                f"The `modules` callable {modules!r} selected no module. Some module names: {_some_names(model)}."
            )
    else:
        compiled = [(re.compile(pattern), component) for pattern, component in modules.items()]
        hits = {pattern.pattern: 0 for pattern, _ in compiled}
        for name, module in model.named_modules():
            for pattern, component in compiled:
                found = pattern.search(name) if name else None
                if found is None:
                    continue
                hits[pattern.pattern] += 1
                layer = _layer_number(name, found)
                if layer is None:
                    raise ValueError(
                        f"Module {name!r} matched `modules` pattern {pattern.pattern!r} but has no layer number: "
                        "add a `(?P<layer>\\d+)` group to the pattern or use a callable."
                    )
                chosen.append((layer, component, name, module))
                break
        missing = [pattern for pattern, count in hits.items() if count == 0]
        if missing:
            raise ValueError(
                f"Invalid value for modules: pattern(s) {missing} match no module of {type(model).__name__}. "
                f"Some module names: {_some_names(model)}."
            )
    numbers = sorted({layer for layer, *_ in chosen})
    position = {number: index for index, number in enumerate(numbers)}
    components = []
    for layer, component, name, module in chosen:
        if isinstance(module, nn.MultiheadAttention):
            parts = _attention_components(name, module)
            components += [Component(position[layer], n, name, module, refs, act) for n, refs, act in parts]
        else:
            refs = tuple(ParamRef(f"{name}.{n}", module, n) for n, _ in module.named_parameters())
            components.append(Component(position[layer], component, name, module, refs, ModuleOutput()))
    covered = {name for *_, name, _ in chosen}
    skipped = [
        name
        for name, module in model.named_modules()
        if _has_own_params(module) and not any(name == c or name.startswith(c + ".") for c in covered)
    ]
    return components, skipped, position


def resolve_layers(model: nn.Module, modules: ModuleSelection | None = None, first_layer_index: int = 0) -> LayerMap:
    """Resolve ``model`` into the layers and components to monitor.

    Args:
        model: the model (a ``LightningModule`` is fine: its submodules are searched).
        modules: ``None`` for automatic resolution; a mapping ``{regex: component}`` whose regexes are
            searched in full module names (the layer number is the ``layer`` group or the first
            numeric path segment); or a callable ``(name, module) -> (layer, component) | None``.
        first_layer_index: number shown for the first layer (0 or 1).

    Raises:
        ValueError: a pattern matches nothing, or nothing at all can be monitored.

    Example:
        >>> block = lambda: nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        >>> layer_map = resolve_layers(nn.Sequential(*[block() for _ in range(3)]), first_layer_index=1)
        >>> layer_map.layer_labels, layer_map.component_names
        (['1', '2', '3'], ['0', '2'])
    """
    reasons: dict[str, str] = {}
    notes: dict[str, str] = {}
    if modules is None:
        resolved, architecture, labels = _resolve_automatic(model, first_layer_index)
        components, skipped, reasons, notes = resolved.components, resolved.skipped, resolved.reasons, resolved.notes
    else:
        components, skipped, position = _resolve_selected(model, modules)
        architecture = "user selection"
        labels = [str(number + first_layer_index) for number in position]
    if not components:
        raise ValueError(f"Found no module with parameters to monitor in {type(model).__name__}.")
    return LayerMap(components, labels, _ordered_names(components), architecture, skipped, reasons, notes)


def iter_unique_params(layer_map: LayerMap) -> Iterator[nn.Parameter]:
    """Each distinct parameter of the monitored components, once, in a stable order (as held now)."""
    seen: set[int] = set()
    for component in layer_map.components:
        for ref in component.params:
            param = ref.param
            if id(param) not in seen:
                seen.add(id(param))
                yield param


# --- Decoders for lens heatmaps -----------------------------------------------------------------

#: Where known causal-LM families keep their final norm (the unembedding is ``get_output_embeddings()``).
FINAL_NORMS = (
    "model.norm",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3
    "transformer.ln_f",  # GPT-2, GPT-J
    "gpt_neox.final_layer_norm",  # GPT-NeoX, Pythia
    "model.decoder.final_layer_norm",  # OPT
    "model.final_layernorm",  # Phi
)


def find_language_model(module: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``module`` (itself, or its first submodule with an unembedding).

    Raises:
        ValueError: there is none.
    """
    for name, candidate in module.named_modules():
        embeddings = getattr(candidate, "get_output_embeddings", None)
        if callable(embeddings) and hasattr(candidate, "config"):
            try:
                if embeddings() is not None:
                    return candidate
            except (NotImplementedError, AttributeError):
                continue
    raise ValueError(
        f"Found no Hugging Face language model (a module with `config` and `get_output_embeddings()`) in "
        f"{type(module).__name__}: pass `hidden_states=` and `decoder=` callables instead."
    )


def find_decoder(language_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(final_norm, unembedding)`` of a Hugging Face causal LM.

    Raises:
        ValueError: the final norm is not at any known place; the message lists where it looked.
    """
    modules = dict(language_model.named_modules())
    for name in FINAL_NORMS:
        if name in modules:
            return modules[name], language_model.get_output_embeddings()
    raise ValueError(
        f"Cannot find the final norm of {type(language_model).__name__} (looked for {', '.join(FINAL_NORMS)}): "
        "pass `decoder=` (a callable from a hidden state to logits)."
    )
