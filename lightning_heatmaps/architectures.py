"""The vocabulary of transformer blocks: which module names mean which canonical component.

Pure data, read by :mod:`lightning_heatmaps.layers`, which applies it. A block's parameterised leaf is
placed by the first *subtree* segment on its path (attention, cross-attention, MLP, experts, shared
expert) and then named by its *leaf* name in that subtree. Fused q/k/v projections have a *candidate* layout
per family here; :mod:`lightning_heatmaps.layouts` confirms it (or finds the real one) from the attention's own
forward at ``fit`` start, and a layout it cannot confirm is monitored whole. Whatever is not in these tables keeps its path as its component name, so nothing
trainable is ever dropped.

To add a family, add its names here; no code changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: The canonical component order of the layer x component view (unknown names follow, in model order).
COMPONENT_ORDER = (
    # *.qkv, *.gate_up: a fused tensor whose layout is not confirmed, monitored whole
    "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
    "xattn.q", "xattn.k", "xattn.v", "xattn.qkv", "xattn.o",
    "mlp.up", "mlp.gate", "mlp.gate_up", "mlp.down",
    "mlp.router",
    "mlp.experts.up", "mlp.experts.gate", "mlp.experts.gate_up", "mlp.experts.down",
    "mlp.shared.up", "mlp.shared.gate", "mlp.shared.down", "mlp.shared.router",
)

#: Path segments that open a subtree, and the prefix its components get.
SUBTREES: Mapping[str, str] = {
    # self-attention
    "self_attn": "attn", "attn": "attn", "attention": "attn", "self_attention": "attn", "SelfAttention": "attn",
    "mixer": "attn",
    # cross-attention (encoder-decoder models)
    "encoder_attn": "xattn", "EncDecAttention": "xattn", "crossattention": "xattn", "cross_attn": "xattn",
    "cross_attention": "xattn",
    # feed-forward
    "mlp": "mlp", "ffn": "mlp", "feed_forward": "mlp", "DenseReluDense": "mlp", "intermediate": "mlp", "output": "mlp",
    "block_sparse_moe": "mlp", "moe": "mlp",
    # inside the feed-forward of a mixture of experts
    "experts": "mlp.experts", "shared_expert": "mlp.shared", "shared_experts": "mlp.shared",
}

#: Inside BERT-style blocks, a generic ``dense`` leaf takes its role from the subtree segment it sits in.
SEGMENT_ROLES: Mapping[str, str] = {"intermediate": "up", "output": "down"}

#: Leaf names, per subtree prefix, and the role they play. ``"fused:<kind>"`` means a fused projection
#: split by :data:`FUSED_LAYOUTS`. ``"router"`` is a mixture-of-experts router.
LEAVES: Mapping[str, Mapping[str, str]] = {
    "attn": {
        "q_proj": "q", "q": "q", "query": "q", "q_lin": "q", "wq": "q",
        "k_proj": "k", "k": "k", "key": "k", "k_lin": "k", "wk": "k",
        "v_proj": "v", "v": "v", "value": "v", "v_lin": "v", "wv": "v",
        "o_proj": "o", "o": "o", "out_proj": "o", "dense": "o", "out_lin": "o", "c_proj": "o", "wo": "o",
        "c_attn": "fused:qkv", "qkv_proj": "fused:qkv", "query_key_value": "fused:qkv", "Wqkv": "fused:qkv",
        "qkv": "fused:qkv", "in_proj": "fused:qkv",
    },
    "mlp": {
        "up_proj": "up", "c_fc": "up", "fc1": "up", "fc_in": "up", "dense_h_to_4h": "up", "lin1": "up", "wi": "up",
        "wi_1": "up", "w3": "up",
        "gate_proj": "gate", "wi_0": "gate", "w1": "gate",
        "down_proj": "down", "c_proj": "down", "fc2": "down", "fc_out": "down", "dense_4h_to_h": "down", "lin2": "down",
        "wo": "down", "w2": "down",
        "gate_up_proj": "fused:gate_up",
        "gate": "router", "router": "router", "shared_expert_gate": "router.shared",
    },
    # Leaves that sit directly in the block (OPT, BART, torch's TransformerEncoderLayer).
    "": {"fc1": "mlp.up", "fc2": "mlp.down", "linear1": "mlp.up", "linear2": "mlp.down"},
}

#: The expert tensors of fused mixture-of-experts modules (transformers 5 stores every expert in one
#: 3-D parameter, ``[experts, out, in]`` or ``[experts, in, out]``): attribute -> role, or a fused gate/up
#: pair whose layout the module itself must confirm. A ``<attribute>_bias`` pools with its weight's role.
EXPERT_PARAMETERS: Mapping[str, str] = {
    "gate_up_proj": "fused:gate_up", "down_proj": "down", "up_proj": "up", "gate_proj": "gate",
    "w1": "gate", "w2": "down", "w3": "up",
}

#: Path segments added by wrappers, dropped from names (torch.compile, FSDP1, activation checkpointing).
WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

#: Segments under which peft keeps a wrapped projection's pieces: the wrapper is the component.
ADAPTER_SEGMENTS = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                    "lora_dropout")

#: Module class names that are normalisation layers (skipped, reported as "norm").
NORM_CLASS_HINTS = ("Norm", "LayerNorm", "RMSNorm")


def _heads(config: Any) -> int:
    for name in ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("the config has no number of attention heads")


def _kv_heads(config: Any) -> int:
    for name in ("num_key_value_heads", "num_kv_heads", "n_head_kv"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return _heads(config)


def hidden_size(config: Any) -> int:
    """The model width a config names (``hidden_size``, ``n_embd``, ``d_model`` or ``dim``)."""
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("the config has no hidden size")


def _head_dim(config: Any) -> int:
    value = getattr(config, "head_dim", None)
    return value if isinstance(value, int) and value > 0 else hidden_size(config) // _heads(config)


#: A fused layout: ``(names in storage order, segment sizes per group, groups)`` along the output features.
FusedLayout = tuple[tuple[str, ...], tuple[int, ...], int]
QKV = ("q", "k", "v")


def _contiguous_qkv(config: Any) -> FusedLayout:
    """``[q | k | v]`` with k and v of ``num_key_value_heads`` heads (GPT-2, MPT, Phi-3 under GQA)."""
    q, kv = _heads(config) * _head_dim(config), _kv_heads(config) * _head_dim(config)
    return QKV, (q, kv, kv), 1


def _per_head_qkv(config: Any) -> FusedLayout:
    """``[q_h k_h v_h]`` for each head ``h`` (GPT-NeoX, Bloom, Falcon's original layout)."""
    size = _head_dim(config)
    return QKV, (size, size, size), _heads(config)


def _falcon_qkv(config: Any) -> FusedLayout:
    heads, size = _heads(config), _head_dim(config)
    if getattr(config, "new_decoder_architecture", False):
        groups = _kv_heads(config)  # per kv group: its query heads, then one k and one v head
        return QKV, (size * heads // groups, size, size), groups
    if getattr(config, "multi_query", False):
        return QKV, (size * heads, size, size), 1
    return _per_head_qkv(config)


def _bigcode_qkv(config: Any) -> FusedLayout:
    if getattr(config, "multi_query", True):
        size = _head_dim(config)
        return QKV, (hidden_size(config), size, size), 1
    return _per_head_qkv(config)


def _codegen_qkv(config: Any) -> FusedLayout:
    """CodeGen: 4 model-parallel groups, each ``[q | v | k]`` (its own storage order)."""
    groups = 4
    local = hidden_size(config) // groups
    return ("q", "v", "k"), (local, local, local), groups


def _equal_halves_gate_up(size: int) -> FusedLayout:
    return ("gate", "up"), (size // 2, size // 2), 1


#: Candidate fused q/k/v layouts by ``config.model_type`` (``"default"``: contiguous ``[q | k | v]`` with GQA sizes),
#: each confirmed or refuted by running the attention (see :func:`lightning_heatmaps.layouts.confirm_fused_qkv`).
FUSED_QKV_LAYOUTS: Mapping[str, Callable[[Any], FusedLayout]] = {
    "default": _contiguous_qkv,
    "gpt_neox": _per_head_qkv,
    "bloom": _per_head_qkv,
    "falcon": _falcon_qkv,
    "gpt_bigcode": _bigcode_qkv,
    "codegen": _codegen_qkv,
}
