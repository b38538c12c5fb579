"""Resolution of a model's modules into ``(layer, component)`` pairs.

One resolver turns a model into a :class:`LayerMap`: the monitored components, each with the
parameters (or parameter slices, for fused projections) that make up its weights and the rule that
extracts its activation from a forward hook. Known architectures get canonical component names
(``attn.q attn.k attn.v attn.o mlp.up mlp.gate mlp.down``); anything else falls back to the largest
stack of repeated blocks, and a model without one still works with one layer per parameterised module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

CANONICAL_COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")

#: A user's choice of modules: ``{regex: component name}`` matched with :func:`re.search` against full
#: module names, or a callable ``(name, module) -> (layer, component) | None``.
ModuleSelection = Union[Mapping[str, str], Callable[[str, nn.Module], Union[tuple[int, str], None]]]


@dataclass(frozen=True)
class FusedPart:
    """Part ``index`` of ``parts`` equal blocks of one dimension of a fused tensor.

    With ``groups > 1`` the blocks are interleaved per group (per attention head, as in GPT-NeoX's
    ``query_key_value``: ``[q_h k_h v_h]`` for each head ``h``); with ``groups == 1`` they are
    contiguous (GPT-2's ``c_attn``: ``[q | k | v]``).

    Example:
        >>> FusedPart(parts=3, index=1).take(torch.arange(6.0), dim=0)
        tensor([2., 3.])
    """

    parts: int
    index: int
    groups: int = 1

    def take(self, tensor: Tensor, dim: int) -> Tensor:
        dim = dim % tensor.dim()
        if self.groups == 1:
            size = tensor.shape[dim] // self.parts
            return tensor.narrow(dim, self.index * size, size)
        return tensor.unflatten(dim, (self.groups, self.parts, -1)).select(dim + 1, self.index)


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
        return None if self.part is None else self.part.take(torch.arange(size), 0)

    @property
    def numel(self) -> int:
        return self.param.numel() // (self.part.parts if self.part is not None else 1)


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
    """One monitored component: where it sits (``layer``, ``name``), its weights and its activation."""

    layer: int
    name: str
    module_name: str
    module: nn.Module
    params: tuple[ParamRef, ...]
    activation: Callable[[tuple, dict, Any], Tensor | None]


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
            groups: dict[str, int] = {}
            for name in self.skipped:
                key = re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", name)
                groups[key] = groups.get(key, 0) + 1
            shown = [f"{key} (x{count})" if count > 1 else key for key, count in groups.items()]
            text += f" Skipped modules with parameters: {', '.join(shown[:16])}{', ...' if len(shown) > 16 else ''}."
        return text


def layer_tags(num_layers: int, first_layer_index: int = 0) -> list[str]:
    """Scalar-tag names of the layers, zero-padded to the widest number so they sort in order.

    Example:
        >>> layer_tags(12)[:2], layer_tags(12)[-1]
        (['layer_00', 'layer_01'], 'layer_11')
    """
    width = len(str(num_layers - 1 + first_layer_index))
    return [f"layer_{i + first_layer_index:0{width}d}" for i in range(num_layers)]


# --- Architecture rules -------------------------------------------------------------------------

Rule = Mapping[str, Union[str, Callable[[nn.Module, nn.Module], list[tuple[str, ParamRef, ...]]]]]


def _own_params(module_name: str, module: nn.Module) -> tuple[ParamRef, ...]:
    return tuple(ParamRef(f"{module_name}.{n}" if module_name else n, module, n) for n, _ in module.named_parameters(recurse=False))


def _fused_components(
    module_name: str, module: nn.Module, names: tuple[str, ...], weight_dim: int, groups: int
) -> list[tuple[str, tuple[ParamRef, ...], ModuleOutput]]:
    result = []
    for index, name in enumerate(names):
        part = FusedPart(parts=len(names), index=index, groups=groups)
        refs = []
        for param_name, param in module.named_parameters(recurse=False):
            dim = weight_dim if param.dim() > 1 else 0
            refs.append(ParamRef(f"{module_name}.{param_name}", module, param_name, dim=dim, part=part))
        result.append((name, tuple(refs), ModuleOutput(part)))
    return result


def _gpt2_qkv(module_name: str, module: nn.Module, block: nn.Module) -> list:
    # GPT-2's Conv1D stores weight as (in, out): q | k | v are column blocks of the weight.
    return _fused_components(module_name, module, ("attn.q", "attn.k", "attn.v"), weight_dim=1, groups=1)


def _neox_qkv(module_name: str, module: nn.Module, block: nn.Module) -> list:
    # GPT-NeoX reshapes the fused output to (heads, 3 * head_size): q, k, v interleave per head.
    head_size = getattr(getattr(block, "attention", None), "head_size", None)
    out_features = module.weight.shape[0]
    if not head_size:
        raise ValueError(f"Cannot split fused q/k/v of {module_name!r}: its attention has no `head_size`.")
    groups = out_features // (3 * head_size)
    return _fused_components(module_name, module, ("attn.q", "attn.k", "attn.v"), weight_dim=0, groups=groups)


def _attention_components(module_name: str, attention: nn.MultiheadAttention) -> list:
    result = []
    embed = attention.embed_dim
    for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
        refs = []
        if attention.in_proj_weight is not None:
            part = FusedPart(parts=3, index=index)
            refs.append(ParamRef(f"{module_name}.in_proj_weight", attention, "in_proj_weight", 0, part))
        else:
            param_name = ("q_proj_weight", "k_proj_weight", "v_proj_weight")[index]
            refs.append(ParamRef(f"{module_name}.{param_name}", attention, param_name))
        if attention.in_proj_bias is not None:
            assert attention.in_proj_bias.shape[0] == 3 * embed
            refs.append(ParamRef(f"{module_name}.in_proj_bias", attention, "in_proj_bias", 0, FusedPart(3, index)))
        result.append((name, tuple(refs), AttentionInputProjection(attention, index)))
    # out_proj's weights are applied functionally: its module hook never fires, the attention's output is o.
    result.append(("attn.o", _own_params(f"{module_name}.out_proj", attention.out_proj), ModuleOutput()))
    return result


def _multihead_attention(module_name: str, module: nn.Module, block: nn.Module) -> list:
    return _attention_components(module_name, module)


_LLAMA: Rule = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "mlp.up_proj": "mlp.up",
    "mlp.gate_proj": "mlp.gate",
    "mlp.down_proj": "mlp.down",
}
_GPT2: Rule = {"attn.c_attn": _gpt2_qkv, "attn.c_proj": "attn.o", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
_GPT_NEOX: Rule = {
    "attention.query_key_value": _neox_qkv,
    "attention.dense": "attn.o",
    "mlp.dense_h_to_4h": "mlp.up",
    "mlp.dense_4h_to_h": "mlp.down",
}
_BERT: Rule = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.o",
    "intermediate.dense": "mlp.up",
    "output.dense": "mlp.down",
}
_TORCH_ENCODER: Rule = {"self_attn": _multihead_attention, "linear1": "mlp.up", "linear2": "mlp.down"}

#: Known block layouts, by name. Llama covers Mistral, Qwen2/Qwen3, Gemma and other Llama-family models.
ARCHITECTURES: dict[str, Rule] = {
    "llama": _LLAMA,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    "bert": _BERT,
    "torch_transformer": _TORCH_ENCODER,
}


# --- Resolution ---------------------------------------------------------------------------------


def _has_own_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_layer_stack(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]] | None:
    """The largest ``ModuleList``/``Sequential`` of two or more blocks of one class, by parameter count.

    Example:
        >>> find_layer_stack(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))  # no repeated blocks
    """
    best: tuple[int, str, list[tuple[str, nn.Module]]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if len(children) < 2 or len({type(child) for _, child in children}) != 1:
            continue
        size = _param_count(module)
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, children)
    return None if best is None else (best[1], best[2])


def _without_compile_wrapper(name: str) -> str:
    """Drop wrapper segments (``torch.compile``'s ``_orig_mod``, FSDP1's ``_fsdp_wrapped_module``, activation
    checkpointing's ``_checkpoint_wrapped_module``): a wrapped block keeps its components' names."""
    return re.sub(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.|$)", "", name).lstrip(".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _rule_matches(rule: Rule, block: nn.Module) -> int:
    names = {_without_compile_wrapper(n): m for n, m in block.named_modules()}
    return sum(1 for key in rule if key in names and _has_own_params(names[key]))


def _components_of_block(
    layer: int, prefix: str, block: nn.Module, rule: Rule | None
) -> tuple[list[Component], list[str]]:
    """Components of one block by ``rule`` (or every parameterised module when ``rule`` is None)."""
    components: list[Component] = []
    covered: set[str] = set()
    modules = {_without_compile_wrapper(n): m for n, m in block.named_modules()}
    entries: list[tuple[str, Any]]
    if rule is not None:
        entries = [(key, value) for key, value in rule.items() if key in modules]
    else:
        entries = []
        for rel, module in modules.items():
            if isinstance(module, nn.MultiheadAttention):
                entries.append((rel, _multihead_attention))
            elif _has_own_params(module) and not any(rel.startswith(c + ".") for c, _ in entries):
                entries.append((rel, rel or type(module).__name__.lower()))
    for rel, how in entries:
        module = modules[rel]
        full = _join(prefix, rel)
        if isinstance(how, str):
            components.append(Component(layer, how, full, module, _own_params(full, module), ModuleOutput()))
        else:
            for name, refs, activation in how(full, module, block):
                components.append(Component(layer, name, full, module, refs, activation))
        covered.add(rel)
    skipped = [
        _join(prefix, rel)
        for rel, module in modules.items()
        if _has_own_params(module) and not any(rel == c or rel.startswith(c + ".") for c in covered)
    ]
    return components, skipped


def _ordered_names(components: list[Component]) -> list[str]:
    seen: dict[str, None] = {}
    for component in components:
        seen.setdefault(component.name, None)
    canonical = [name for name in CANONICAL_COMPONENTS if name in seen]
    return canonical + [name for name in seen if name not in CANONICAL_COMPONENTS]


def _resolve_automatic(model: nn.Module) -> tuple[list[Component], list[str], str, list[str] | None]:
    stack = find_layer_stack(model)
    if stack is None:
        components = [
            Component(i, type(module).__name__, name, module, _own_params(name, module), ModuleOutput())
            for i, (name, module) in enumerate((n, m) for n, m in model.named_modules() if _has_own_params(m))
        ]
        return components, [], "no repeated blocks: one layer per parameterised module", [c.module_name for c in components]
    stack_name, blocks = stack
    first_block = blocks[0][1]
    scores = {arch: _rule_matches(rule, first_block) for arch, rule in ARCHITECTURES.items()}
    architecture = max(scores, key=scores.__getitem__)
    rule: Rule | None = ARCHITECTURES[architecture]
    if scores[architecture] < min(3, len(rule)):
        architecture, rule = f"generic blocks of {type(first_block).__name__}", None
    components, skipped = [], []
    for layer, (child_name, block) in enumerate(blocks):
        found, missed = _components_of_block(layer, _join(stack_name, child_name), block, rule)
        components += found
        skipped += missed
    inside = {_join(stack_name, child_name) for child_name, _ in blocks}
    skipped += [
        name
        for name, module in model.named_modules()
        if _has_own_params(module) and not any(name == p or name.startswith(p + ".") for p in inside)
    ]
    return components, skipped, architecture, None


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
    if modules is None:
        components, skipped, architecture, labels = _resolve_automatic(model)
        if labels is None:
            count = 1 + max((c.layer for c in components), default=-1)
            labels = [str(i + first_layer_index) for i in range(count)]
    else:
        components, skipped, position = _resolve_selected(model, modules)
        architecture = "user selection"
        labels = [str(number + first_layer_index) for number in position]
    if not components:
        raise ValueError(f"Found no module with parameters to monitor in {type(model).__name__}.")
    return LayerMap(components, labels, _ordered_names(components), architecture, skipped)


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
