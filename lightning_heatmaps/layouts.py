"""Confirmation of fused q/k/v layouts from what the attention itself computes.

A fused projection (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, ...) is split into ``attn.q``, ``attn.k``
and ``attn.v`` only when the layout is *observed*: a copy of the attention runs one token whose fused output is a
marker (output feature ``j`` reads ``j + 1``), and the query, key and value states the attention then computes with
say which output features are q, k and v. Rotary embeddings are the identity at position 0, so the markers arrive
unchanged. The states are read through transformers' public attention registry (``AttentionInterface``) where the
family dispatches through it, and otherwise through a :class:`~torch.overrides.TorchFunctionMode` that sees
``scaled_dot_product_attention`` and the products ``q @ k^T`` and ``probs @ v`` of attention computed inline.

The probe never touches the user's model: a Hugging Face model is rebuilt from a copy of its config with one layer
(on the meta device, then uninitialised CPU storage: its weights do not matter because the marker replaces the
fused output; the buffers, such as rotary frequencies, are copied from the real model); any other attention
module is deep-copied with its parameters replaced by uninitialised CPU tensors and its hooks dropped. The copy
runs in eval mode (no dropout draws) under a forked CPU generator; only the copy's attention implementation is
changed, the probe's function is in transformers' registry only while the copy runs, and the forward stops as
soon as the states are seen. Parameters of the real model are never read, so sharded (FSDP2 DTensor) or
accelerator parameters change nothing and every rank computes the same result with no collective. Cost: one
probe per distinct (model class, attention class, config) in one resolution (a plain PyTorch model: one per fused
projection), each a one-token forward through the embeddings and one attention, in the virtual memory of a
one-layer model, most of which is never written.

Pure helpers (:func:`derive_layout`, :func:`roles_of_layout`) turn the observed roles into a
:data:`~lightning_heatmaps.architectures.FusedLayout`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_heatmaps.architectures import QKV, FusedLayout, hidden_size

#: The name under which the probe's attention function is registered in transformers' ``AttentionInterface``
#: (``ALL_ATTENTION_FUNCTIONS``) while a probe runs.
PROBE_ATTENTION = "lightning_heatmaps_layout_probe"

#: Largest fused width whose markers float32 represents exactly.
_MAX_WIDTH = 2**24 - 1

_PRODUCTS = (torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm,
             torch.Tensor.baddbmm)


@dataclass(frozen=True)
class Confirmation:
    """What the probe found for one fused q/k/v projection.

    ``layout`` is ``None`` when the layout is not confirmed; ``reason`` then says why. ``weight_dim`` is the
    dimension of the fused weight that holds the output features, as the module's own forward showed it.
    ``note`` is set when a split was made that differs from the vocabulary's candidate.

    Example:
        >>> Confirmation(None, reason="no q/k/v states computed from its output were seen").layout is None
        True
    """

    layout: FusedLayout | None
    weight_dim: int | None = None
    reason: str = ""
    note: str = ""


class _Seen(Exception):
    """Raised inside the probe's forward once q, k and v are seen: the rest of the model need not run."""


def roles_of_layout(layout: FusedLayout) -> list[int]:
    """The role (index into ``QKV``) of each output feature of ``layout``, in storage order.

    Example:
        >>> roles_of_layout((("q", "v", "k"), (1, 1, 1), 2))
        [0, 2, 1, 0, 2, 1]
    """
    names, sizes, groups = layout
    group = [QKV.index(name) for name, size in zip(names, sizes) for _ in range(size)]
    return group * groups


def derive_layout(roles: Sequence[int]) -> FusedLayout | None:
    """The layout ``(names, sizes, groups)`` whose parts are exactly ``roles``, or ``None`` if there is none.

    A layout repeats one group of three segments, one per role, in any order: contiguous ``[q | k | v]``
    (``groups=1``), per head ``[q_h k_h v_h]``, per key-value group, or another storage order (``[q | v | k]``).

    Example:
        >>> derive_layout([0, 0, 1, 2, 0, 0, 1, 2])
        (('q', 'k', 'v'), (2, 1, 1), 2)
        >>> derive_layout([1, 0, 2, 0])  # q appears twice per group, v once: not a layout
    """
    runs: list[tuple[int, int]] = []
    for role in roles:
        if runs and runs[-1][0] == role:
            runs[-1] = (role, runs[-1][1] + 1)
        else:
            runs.append((role, 1))
    if len(runs) % 3 or sorted(role for role, _ in runs[:3]) != [0, 1, 2]:
        return None
    if any(run != runs[index % 3] for index, run in enumerate(runs)):
        return None
    return tuple(QKV[role] for role, _ in runs[:3]), tuple(size for _, size in runs[:3]), len(runs) // 3


def roles_from_states(width: int, query: Tensor, key: Tensor, value: Tensor) -> tuple[list[int] | None, str]:
    """The role of each of ``width`` output features, from q/k/v states computed with marker values.

    A state may be the markers times one positive factor (rotary scaling such as Phi-3's long-context
    ``attention_scaling``, a query pre-scaled by ``1/sqrt(d)``): the factor is the smallest step between its values.
    A wrong factor cannot pass unnoticed: the three states must then still partition the features exactly.

    Returns ``(roles, "")``, or ``(None, reason)`` when a state holds something other than (scaled) markers, a
    feature reaches two roles, or a feature reaches none.

    Example:
        >>> roles_from_states(4, torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([4.0]))
        ([0, 0, 1, 2], '')
        >>> roles_from_states(4, torch.tensor([0.5, 1.0]), torch.tensor([3.0]), torch.tensor([4.0]))  # q scaled
        ([0, 0, 1, 2], '')
    """
    roles = [-1] * width
    for index, (name, state) in enumerate(zip(QKV, (query, key, value))):
        values = state.detach().to("cpu", torch.float64).flatten().unique()
        if values.numel() == 0 or not bool(torch.isfinite(values).all()):
            return None, f"the {name} states are empty or not finite"
        scale = 1.0
        if not torch.equal(values.round(), values) and values.numel() > 1:
            scale = float((values[1:] - values[:-1]).min())
        positions = values / scale
        features = positions.round().long()
        if (positions - features).abs().max() > 1e-3 or (features < 1).any() or (features > width).any():
            return None, f"the {name} states are not the projection's output features (transformed after the split)"
        for feature in (features - 1).tolist():
            if roles[feature] not in (-1, index):
                return None, f"output feature {feature} reaches both {QKV[roles[feature]]} and {name}"
            roles[feature] = index
    unused = roles.count(-1)
    if unused:
        return None, f"{unused} of {width} output features reach none of q, k, v"
    return roles, ""


def _marked(tensor: Any, width: int) -> bool:
    if not isinstance(tensor, Tensor) or tensor.numel() == 0 or tensor.is_meta or not tensor.is_floating_point():
        return False
    values = tensor.detach()
    return bool(((values >= 1) & (values <= width) & (values == values.round())).all())


class _StateObserver(TorchFunctionMode):
    """Records q, k and v from ``scaled_dot_product_attention`` or from inline products of marked tensors."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.states: tuple[Tensor, Tensor, Tensor] | None = None
        self._query_key: tuple[Tensor, Tensor] | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.states is None and self.width and func is F.scaled_dot_product_attention:
            # the first attention after the marker: whether its states are (scaled) markers is decided later
            query, key, value = (kwargs.get(name, args[i] if len(args) > i else None)
                                 for i, name in enumerate(("query", "key", "value")))
            if all(isinstance(t, Tensor) for t in (query, key, value)):
                self.states = (query.detach().clone(), key.detach().clone(), value.detach().clone())
                raise _Seen
        if self.states is None and func in _PRODUCTS:
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
            if func in (torch.baddbmm, torch.Tensor.baddbmm):  # (input, batch1, batch2): the product's operands
                tensors = [kwargs.get("batch1", tensors[1] if len(tensors) > 1 else None),
                           kwargs.get("batch2", tensors[2] if len(tensors) > 2 else None)]
            left, right = (tensors[-2:] if len(tensors) >= 2 else (None, None))
            if self._query_key is None and _marked(left, self.width) and _marked(right, self.width):
                self._query_key = (left.detach().clone(), right.detach().clone())
            elif self._query_key is not None and _marked(right, self.width):
                self.states = (*self._query_key, right.detach().clone())
                raise _Seen
        return func(*args, **kwargs)


def _original_class(module: nn.Module) -> type:
    """The module's own class, under the dynamic subclass that FSDP2's ``fully_shard`` gives it."""
    return next(c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed"))


def _is_transformers_model(module: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(module).__mro__)


def _is_dtensor(tensor: Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"  # without importing torch.distributed where it is not built


def _pattern(name: str) -> str:
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _output_dim(fused: nn.Module, in_width: int, width: int) -> tuple[int | None, str]:
    """Which dimension of the (probe's own) fused weight holds the output features, from its forward.

    The weight is filled with its row index and the module applied to the second unit vector: a weight stored
    ``(out, in)`` (``nn.Linear``) answers ``0, 1, 2, ...``; one stored ``(in, out)`` (GPT-2's ``Conv1D``) answers
    ``1`` everywhere.
    """
    weights = [p for p in fused.parameters(recurse=False) if p.dim() == 2]
    if len(weights) != 1 or in_width < 2:
        return None, "its weight is not one matrix"
    weight = weights[0]
    with torch.no_grad():
        for param in fused.parameters():
            param.zero_()
        weight.copy_(torch.arange(weight.shape[0], dtype=weight.dtype)[:, None].expand(weight.shape))
        unit = torch.zeros(1, 1, in_width)
        unit[..., 1] = 1
        answer = fused(unit).flatten()
    if weight.shape[0] == width and torch.equal(answer, torch.arange(width, dtype=answer.dtype)):
        return 0, ""
    if weight.shape[1] == width and answer.numel() == width and bool((answer == 1).all()):
        return 1, ""
    return None, "its forward is not a product with its weight"


def _run_probe(fused: nn.Module, call: Any) -> tuple[Any, int, int]:
    """Run ``call(observer)`` with ``fused``'s output replaced by markers: the states seen, the width, the input width."""
    seen: dict[str, int] = {}
    observer = _StateObserver(0)

    def marker(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        width = output.shape[-1]
        seen["width"], seen["in"] = width, args[0].shape[-1] if args and isinstance(args[0], Tensor) else 0
        observer.width = width  # only values 1..width are markers
        return torch.arange(1, width + 1, dtype=torch.float32).expand(*output.shape[:-1], width).clone()

    handle = fused.register_forward_hook(marker)
    try:
        with torch.no_grad(), observer:
            try:
                call(observer)
            except _Seen:
                pass
    finally:
        handle.remove()
    return observer.states, seen.get("width", 0), seen.get("in", 0)


#: The observer of the probe now running, read by the attention function registered for the probe.
_OBSERVER: list[_StateObserver] = []


def _probe_transformers(owner: nn.Module, relative: str, attention_class: type) -> tuple[Any, nn.Module, int, int]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = copy.deepcopy(owner.config)
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        config.num_hidden_layers = 1  # layer 0 is all the probe runs
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:1]
    with torch.device("meta"):
        probe = _original_class(owner)(config)
    probe = probe.float().to_empty(device="cpu").eval()
    real_buffers = dict(owner.named_buffers())
    with torch.no_grad():
        for name, buffer in probe.named_buffers():
            real = real_buffers.get(name)
            if real is None or real.shape != buffer.shape or _is_dtensor(real):
                buffer.zero_()  # zero rotary frequencies are the identity, as position 0 is
            else:
                buffer.copy_(real.detach().to("cpu"))
    pattern = _pattern(relative)
    parent_pattern = pattern.rsplit(".", 1)[0] if "." in pattern else ""
    modules = dict(probe.named_modules())
    fused = next((m for n, m in modules.items() if _pattern(n) == pattern and "." in n
                  and _original_class(modules[n.rsplit(".", 1)[0]]) is attention_class), None)
    if fused is None:
        raise LookupError(f"a fresh {type(probe).__name__} has no {attention_class.__name__} at {parent_pattern}")

    def capture(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        observer = _OBSERVER[-1]
        observer.states = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        raise _Seen

    def call(observer: _StateObserver) -> None:
        _OBSERVER.append(observer)
        # Registered on the public global registry only while the copy runs (`del` restores it as found), and
        # selected by the copy alone: the user's model keeps its own attention implementation.
        ALL_ATTENTION_FUNCTIONS[PROBE_ATTENTION] = capture
        try:
            try:
                probe.set_attn_implementation(PROBE_ATTENTION)
            except (ValueError, TypeError, AttributeError, KeyError):
                pass  # a family that computes attention inline: seen through the products
            probe(input_ids=torch.zeros(1, 1, dtype=torch.long))
        finally:
            del ALL_ATTENTION_FUNCTIONS[PROBE_ATTENTION]
            _OBSERVER.pop()

    states, width, in_width = _run_probe(fused, call)
    return states, fused, width, in_width


def _probe_module(attention: nn.Module, relative: str) -> tuple[Any, nn.Module, int, int]:
    """A non-Hugging-Face attention: a deep copy with uninitialised CPU parameters, called on one token."""
    if any(c.__module__.startswith("torch.distributed") for m in attention.modules() for c in type(m).__mro__):
        raise TypeError("the attention module is itself sharded; a copy would take part in its collectives")
    memo: dict[int, Any] = {}
    for param in attention.parameters():
        memo[id(param)] = nn.Parameter(torch.empty(tuple(param.shape)), requires_grad=False)
    for buffer in attention.buffers():
        if _is_dtensor(buffer):
            raise TypeError("a buffer is a sharded DTensor")
        memo[id(buffer)] = buffer.detach().to("cpu", torch.float32 if buffer.is_floating_point() else buffer.dtype,
                                              copy=True)
    probe = copy.deepcopy(attention, memo).eval()
    for module in probe.modules():  # the copy is ours: the real module's hooks (other callbacks') must not run
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                      module._backward_pre_hooks):
            hooks.clear()
    fused = probe.get_submodule(relative)
    weight = next((p for p in fused.parameters(recurse=False) if p.dim() == 2), None)
    in_width = getattr(fused, "in_features", None) or (None if weight is None else weight.shape[1])
    if in_width is None:
        raise TypeError("the fused projection has no weight matrix")

    def call(observer: _StateObserver) -> None:
        probe(torch.zeros(1, 1, in_width))

    states, width, seen_in = _run_probe(fused, call)
    return states, fused, width, seen_in


def _cache_key(owner: nn.Module | None, attention: nn.Module, relative: str) -> Any:
    if owner is None:
        return None  # a plain module: its layout depends on its instance, not on a config
    try:
        config = owner.config.to_json_string(use_diff=False)
    except Exception:  # a config that does not serialise: no caching
        return None
    return _original_class(owner), _original_class(attention), _pattern(relative), config


def confirm_fused_qkv(owner: nn.Module | None, attention: nn.Module, relative: str,
                      candidate: FusedLayout | None, candidate_source: str = "",
                      cache: dict[Any, Any] | None = None) -> Confirmation:
    """Confirm the q/k/v layout of the fused projection ``relative`` under ``attention`` by running a copy.

    The copy's fused output is replaced by markers (feature ``j`` reads ``j + 1``); the q/k/v states its attention
    computes say which features are q, k and v. The split is made only if those roles form a layout
    :class:`~lightning_heatmaps.layers.FusedPart` can express; any failure of the copy is a reason, not an error.

    Args:
        owner: the Hugging Face model that holds the config (``None`` for plain PyTorch models); it is neither
            run nor changed: a copy is.
        attention: the module whose forward splits the fused output (the fused projection's parent).
        relative: the fused projection's name relative to ``owner`` (or to ``attention`` when ``owner`` is ``None``).
        candidate: the vocabulary's layout for this config, if any.
        candidate_source: what the candidate comes from, for the report (``"model_type 'gpt2'"``).
        cache: observations by (model class, attention class, place, config), shared by the calls of one
            resolution so that the blocks of one model are probed once.

    Returns:
        The confirmed layout and output dimension, or ``layout=None`` and the reason.

    Example:
        >>> class Attention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.qkv = nn.Linear(8, 24)
        ...     def forward(self, x):
        ...         q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).transpose(1, -2).unbind(-3)
        ...         return F.scaled_dot_product_attention(q, k, v)
        >>> attention = Attention()
        >>> confirm_fused_qkv(None, attention, "qkv", None).layout
        (('q', 'k', 'v'), (8, 8, 8), 1)
    """
    key = _cache_key(owner, attention, relative) if cache is not None else None
    if key is not None and key in cache:
        layout, weight_dim, width, reason = cache[key]
    else:
        layout, weight_dim, width, reason = _observe(owner, attention, relative)
        if key is not None:
            cache[key] = (layout, weight_dim, width, reason)
    if layout is None:
        return Confirmation(None, None, reason)
    if candidate is not None and roles_of_layout(candidate) == roles_of_layout(layout):
        return Confirmation(candidate, weight_dim)
    note = (f"the attention's forward refutes the vocabulary's layout for {candidate_source}: split as observed"
            if candidate is not None else "")
    return Confirmation(layout, weight_dim, note=note)


def _observe(owner: nn.Module | None, attention: nn.Module, relative: str) -> tuple[Any, int | None, int, str]:
    """``(derived layout, output dim, width, reason)`` from one probe; any failure is a reason, never a crash."""
    try:
        with torch.random.fork_rng(devices=[]):  # the copy runs in eval mode; the CPU generator is kept regardless
            return _observe_copy(owner, attention, relative)
    except Exception as error:  # noqa: BLE001 - whatever the copy does, the run goes on with the tensor whole
        return None, None, 0, f"probe failed: {type(error).__name__}: {error}"[:300]


def _observe_copy(owner: nn.Module | None, attention: nn.Module, relative: str) -> tuple[Any, int | None, int, str]:
    if owner is not None and _is_transformers_model(owner):
        states, fused, width, in_width = _probe_transformers(owner, relative, _original_class(attention))
    else:
        states, fused, width, in_width = _probe_module(attention, relative)
    if width == 0:
        return None, None, 0, "the fused projection did not run in the attention's forward"
    if width > _MAX_WIDTH:
        return None, None, width, f"{width} output features are too many for exact markers"
    if states is None:
        return None, None, width, "no q/k/v states computed from its output were seen"
    roles, reason = roles_from_states(width, *states)
    if roles is None:
        return None, None, width, reason
    layout = derive_layout(roles)
    if layout is None:
        return None, None, width, "its output features are not a contiguous or interleaved [q|k|v] in any order"
    weight_dim, reason = _output_dim(fused, in_width, width)
    if weight_dim is None:
        return None, None, width, f"cannot tell which weight dimension holds its output features: {reason}"
    return layout, weight_dim, width, ""


# --- Gate/up: a fused 2-D projection (its MLP's forward) and 3-D experts (their declaration) -------------------

#: Every way a fused gate/up output can be laid out: the part stored first, and whether the parts interleave.
GATE_UP_CANDIDATES = (("gate", False), ("up", False), ("gate", True), ("up", True))


def _gate_up_parts(values: Tensor, first: str, interleaved: bool) -> dict[str, Tensor]:
    half = values.shape[-1] // 2
    parts = (values[..., 0::2], values[..., 1::2]) if interleaved else (values[..., :half], values[..., half:])
    second = "up" if first == "gate" else "gate"
    return {first: parts[0], second: parts[1]}


def _gate_up_layout(first: str, interleaved: bool, width: int) -> FusedLayout:
    names = (first, "up" if first == "gate" else "gate")
    return (names, (1, 1), width // 2) if interleaved else (names, (width // 2, width // 2), 1)


def confirm_gate_up(mlp: nn.Module, fused_name: str, down_name: str, config: Any) -> FusedLayout | str:
    """The layout of a fused 2-D ``gate_up`` projection, confirmed by its MLP's own forward, or why it is not.

    A fresh, uninitialised instance of the MLP's class is built from ``config`` on CPU (the model's own
    parameters are never read, so sharded or accelerator parameters change nothing). One token runs through
    it with the fused projection's output replaced by fixed values ``v``; what reaches the down projection is
    compared with ``act(gate) * up`` (``act``: the config's ``hidden_act``) for every way ``v`` can split into
    gate and up (:data:`GATE_UP_CANDIDATES`: concatenated or interleaved, gate or up first). Exactly one
    must match. The forward stops at the down projection's input and draws no random numbers.

    Example:
        >>> from transformers import Phi3Config
        >>> from transformers.models.phi3.modeling_phi3 import Phi3MLP
        >>> config = Phi3Config(hidden_size=8, intermediate_size=12)
        >>> confirm_gate_up(Phi3MLP(config), "gate_up_proj", "down_proj", config)
        (('gate', 'up'), (12, 12), 1)
    """
    act_name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if not isinstance(act_name, str):
        return "no config names the activation"
    try:
        from transformers.activations import ACT2FN

        act = ACT2FN[act_name]
    except (ImportError, KeyError):
        return f"unknown activation {act_name!r}"
    seen: list[Tensor] = []

    def capture(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().double())
        raise _Seen

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = _original_class(mlp)(config)
        probe = probe.float().to_empty(device="cpu").eval()
        fused = probe.get_submodule(fused_name)
        width, in_width = fused.weight.shape
        if width % 2:
            return f"an odd fused size {width}"
        values = torch.linspace(-2.0, 2.0, width, dtype=torch.float32)[torch.randperm(
            width, generator=torch.Generator().manual_seed(0))]
        handles = [fused.register_forward_hook(lambda m, a, output: values.expand(output.shape).clone()),
                   probe.get_submodule(down_name).register_forward_pre_hook(capture)]
        try:
            with torch.no_grad():
                probe(torch.zeros(1, 1, in_width))
        except _Seen:
            pass
        finally:
            for handle in handles:
                handle.remove()
    except Exception as error:  # noqa: BLE001 - never break a run: the tensor is monitored whole
        return f"its MLP could not be probed ({type(error).__name__}: {error})"[:300]
    if not seen:
        return "its MLP's forward never reached the down projection"
    received = seen[0].flatten()
    matches = []
    for first, interleaved in GATE_UP_CANDIDATES:
        parts = _gate_up_parts(values, first, interleaved)
        expected = (act(parts["gate"]) * parts["up"]).double()
        if received.shape == expected.shape and torch.allclose(received, expected, rtol=1e-4, atol=1e-6):
            matches.append(_gate_up_layout(first, interleaved, width))
    if len(matches) != 1:
        return f"its MLP's forward matches {len(matches)} of the {len(GATE_UP_CANDIDATES)} gate/up layouts"
    return matches[0]


def confirm_expert_gate_up(module: nn.Module, param: Tensor, config: Any) -> tuple[int, FusedLayout] | str:
    """``(output dim, layout)`` of a 3-D fused ``gate_up`` expert tensor, or why it is not confirmed.

    The storage order (``[experts, out, in]`` or ``[experts, in, out]``) is read from the shape against the
    config's hidden size, which decides it whenever the two inner sizes differ; where they are equal, the
    module's own declaration decides. Whether gate and up are concatenated (``[gate | up]``) or interleaved
    (``gate_0 up_0 gate_1 up_1 ...``) only the module can say: transformers' experts modules declare both
    (``is_transposed``, ``is_concatenated``), and its own expert kernels compute from that declaration.

    Example:
        >>> experts = nn.Module()
        >>> experts.is_concatenated, experts.is_transposed = False, True
        >>> class Config:
        ...     hidden_size = 8
        >>> confirm_expert_gate_up(experts, torch.zeros(4, 8, 6), Config())
        (2, (('gate', 'up'), (1, 1), 3))
        >>> confirm_expert_gate_up(nn.Module(), torch.zeros(4, 6, 8), Config())
        'the module does not declare whether gate and up are concatenated or interleaved'
    """
    declared_transposed = getattr(module, "is_transposed", None)
    concatenated = getattr(module, "is_concatenated", None)
    if not isinstance(concatenated, bool):
        return "the module does not declare whether gate and up are concatenated or interleaved"
    try:
        hidden = hidden_size(config) if config is not None else None
    except ValueError:
        hidden = None
    first, second = param.shape[1], param.shape[2]
    if hidden is not None and (first == hidden) != (second == hidden):
        transposed = first == hidden  # [experts, hidden (in), 2 x intermediate (out)]
        if isinstance(declared_transposed, bool) and declared_transposed != transposed:
            return f"its shape {tuple(param.shape)} contradicts its declared is_transposed={declared_transposed}"
    elif isinstance(declared_transposed, bool):
        transposed = declared_transposed
    else:
        return f"its shape {tuple(param.shape)} does not decide which dimension is the output"
    dim = 2 if transposed else 1
    size = param.shape[dim]
    if size % 2:
        return f"an odd fused size {size}"
    return dim, _gate_up_layout("gate", not concatenated, size)
