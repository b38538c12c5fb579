"""Every common Hugging Face family: canonical components, every trainable weight of every block covered,
finite values after real training steps; fused, expert, encoder-decoder and LoRA splits against references."""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, resolve_layers
from lightning_heatmaps.layers import find_block_stacks

from conftest import TokenModel, make_trainer, token_loader
from families import EXPECTED, FAMILIES, build


def _coverage(model, layer_map):
    """Share of each trainable weight matrix inside the block stacks covered by the monitored components."""
    covered: dict[int, float] = {}
    for component in layer_map.components:
        for ref in component.params:
            share = 1.0 if ref.part is None else ref.part.fraction[0] / ref.part.fraction[1]
            covered[id(ref.param)] = covered.get(id(ref.param), 0.0) + share
    result = {}
    for stack, blocks in find_block_stacks(model):
        for child, block in blocks:
            for owner_name, owner in block.named_modules():
                if isinstance(owner, nn.Embedding):
                    continue
                for name, param in owner.named_parameters(recurse=False):
                    if param.requires_grad and param.dim() >= 2:
                        result[f"{stack}.{child}.{owner_name}.{name}"] = covered.get(id(param), 0.0)
    return result


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_mapped_whole_and_trains(tmp_path, family):
    torch.manual_seed(0)
    model = build(family)
    layer_map = resolve_layers(model)
    expected = EXPECTED[family]
    assert [name for name in layer_map.component_names if name in expected] == list(expected)
    assert set(layer_map.component_names) == set(expected), layer_map.component_names  # nothing left generic
    coverage = _coverage(model, layer_map)
    assert coverage and all(share == pytest.approx(1.0) for share in coverage.values()), coverage
    if family in ("t5", "bart"):
        assert layer_map.layer_labels == ["enc.0", "enc.1", "dec.0", "dec.1"]

    trainer = make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=1), GradientHeatmap(every_n_steps=1)], max_steps=2)
    trainer.fit(TokenModel(model), token_loader(batches=2, batch_size=2, length=8))
    for metric in ("activation_rms", "grad_norm"):
        saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", metric, "layer_x_component.npz"))
        values, missing = saved["values"], saved["missing"]
        assert np.isfinite(values[~missing]).all(), (metric, values)
        assert np.isnan(values[missing]).all()
        if metric == "grad_norm":
            assert (values[~missing] > 0).all()  # every component trains
            # grey only where a layer has no such component (an encoder block has no cross-attention)
            assert not missing.any() or family in ("t5", "bart")


def _component(layer_map, layer, name):
    return next(c for c in layer_map.components if c.layer == layer and c.name == name)


def _sumsq(component, tensor_of):
    """Sum of squares of a component's slices of ``tensor_of(param)`` (the parameter, its gradient, ...)."""
    return sum(float(ref.view(tensor_of(ref.param)).double().square().sum()) for ref in component.params)


def _backward(model, length=6):
    ids = torch.randint(0, 48, (2, length), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()


def test_phi3_gqa_qkv_and_gate_up_split_as_phi3_splits_them():
    model = build("phi3")  # 4 heads, 2 key-value heads of 8: qkv rows 32 | 16 | 16, gate_up rows 48 | 48
    layer_map = resolve_layers(model)
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    _backward(model)
    qkv, gate_up = attention.qkv_proj.weight, mlp.gate_up_proj.weight
    # Independent reference: Phi-3's own forward slices [q | k | v] at query_pos and chunks gate_up in two.
    query_pos, kv = 4 * attention.head_dim, attention.num_key_value_heads * attention.head_dim
    expected = {"attn.q": slice(0, query_pos), "attn.k": slice(query_pos, query_pos + kv),
                "attn.v": slice(query_pos + kv, None)}
    for name, rows in expected.items():
        component = _component(layer_map, 1, name)
        assert _sumsq(component, lambda p: p.grad) == pytest.approx(float(torch.linalg.vector_norm(qkv.grad[rows].double()) ** 2))
        output = torch.randn(2, 3, qkv.shape[0])
        torch.testing.assert_close(component.activation((), {}, output), output[..., rows])
    gate, up = gate_up.grad.chunk(2, dim=0)
    assert _sumsq(_component(layer_map, 1, "mlp.gate"), lambda p: p.grad) == pytest.approx(float(torch.linalg.vector_norm(gate.double()) ** 2))
    assert _sumsq(_component(layer_map, 1, "mlp.up"), lambda p: p.grad) == pytest.approx(float(torch.linalg.vector_norm(up.double()) ** 2))


#: The fused q/k/v projection of the first block, by family (the module whose output the attention splits).
FUSED_QKV = {
    "falcon": "transformer.h.0.self_attention.query_key_value",
    "bloom": "transformer.h.0.self_attention.query_key_value",
    "gpt_bigcode": "transformer.h.0.attn.c_attn",
    "codegen": "transformer.h.0.attn.qkv_proj",
    "gpt2": "transformer.h.0.attn.c_attn",
    "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
    "phi3": "model.layers.0.self_attn.qkv_proj",
    "mpt": "transformer.blocks.0.attn.Wqkv",
}


def _attention_states_of_marked_projection(model, fused):
    """The (query, key, value) states the model's own attention computes with, when output feature ``j`` of the
    fused projection reads ``j + 1``: a one-token forward (rotary embeddings are the identity at position 0).

    The states are read through transformers' public attention-function registry where the family dispatches
    through it; a family that computes attention inline is read through a torch function mode: the arguments of
    its call to ``scaled_dot_product_attention`` (Falcon before transformers 5.2x), or the operands of its first
    product of two marked tensors (q and k^T) and the right operand of the next (v) (Bloom, MPT).
    """
    from torch.overrides import TorchFunctionMode
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    width = fused.weight.shape[1] if type(fused).__name__ == "Conv1D" else fused.weight.shape[0]
    marker = torch.arange(1, width + 1, dtype=torch.float32)
    captured = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.append((query, key, value))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    products = (torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
                torch.Tensor.bmm, torch.Tensor.baddbmm)
    marked = lambda t: isinstance(t, torch.Tensor) and t.numel() > 0 and bool(
        torch.isin(t.detach().flatten(), marker).all())

    class Products(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.operands = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention and not captured:
                captured.append(tuple(t.detach().clone() for t in args[:3]))
            if func in products:
                tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
                if func in (torch.baddbmm, torch.Tensor.baddbmm):
                    tensors = [kwargs.get("batch1", tensors[1] if len(tensors) > 1 else None),
                               kwargs.get("batch2", tensors[2] if len(tensors) > 2 else None)]
                self.operands.append([t.detach().clone() for t in tensors[-2:]])
            return func(*args, **kwargs)

    AttentionInterface.register("marker_capture", capture)
    handle = fused.register_forward_hook(lambda module, args, output: marker.expand(*output.shape[:-1], width).clone())
    try:
        model.set_attn_implementation("marker_capture")
        products_mode = Products()
        with torch.no_grad(), products_mode:
            model(input_ids=torch.tensor([[3]]))
    finally:
        handle.remove()
    if captured:
        return captured[0]
    operands = products_mode.operands
    first = next(i for i, (a, b) in enumerate(operands) if marked(a) and marked(b))
    q, k_transposed = operands[first]
    v = next(b for a, b in operands[first + 1:] if marked(b))
    return q, k_transposed, v


@pytest.mark.parametrize("variant", [
    ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    ("falcon", dict(multi_query=True)),
    ("falcon", dict(multi_query=False, new_decoder_architecture=False)),
    *[(family, {}) for family in ("bloom", "gpt_bigcode", "codegen", "gpt2", "gpt_neox", "phi3", "mpt")],
])
def test_fused_qkv_matches_the_models_own_split(variant):
    family, overrides = variant
    model = build(family, **overrides)
    layer_map = resolve_layers(model)
    fused = model.get_submodule(FUSED_QKV[family])
    q, k, v = _attention_states_of_marked_projection(model, fused)
    conv1d = type(fused).__name__ == "Conv1D"  # GPT-2 stores its weight as (in, out)
    width = fused.weight.shape[1] if conv1d else fused.weight.shape[0]
    reference = {name: sorted({int(x) - 1 for x in part.flatten().tolist()}) for name, part in
                 (("attn.q", q), ("attn.k", k), ("attn.v", v))}  # (a GQA family may repeat k and v per query group)
    assert sorted(sum(reference.values(), [])) == list(range(width)), "q, k and v must share out every feature once"
    for name, features in reference.items():
        component = _component(layer_map, 0, name)
        marker = torch.arange(1, width + 1, dtype=torch.float32)[None, None]
        assert sorted(int(x) - 1 for x in component.activation((), {}, marker).flatten().tolist()) == features
        for ref in component.params:  # the weight and its bias: each output feature's index, sliced as ours
            param = ref.param
            out_dim = 1 if conv1d and param.dim() == 2 else 0
            index = torch.arange(param.shape[out_dim]).reshape([-1 if d == out_dim else 1 for d in range(param.dim())])
            sliced = ref.view(index.expand(param.shape))
            assert sorted(set(sliced.flatten().tolist())) == features, (name, ref.name)
            assert sliced.numel() == len(features) * param.numel() // param.shape[out_dim]


class OldStyleExpert(nn.Module):
    def __init__(self, width=16, hidden=24):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(width, hidden, bias=False), nn.Linear(hidden, width, bias=False), nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class OldStyleMoE(nn.Module):
    """Mixtral before transformers 5: a router Linear and a ModuleList of experts (w1 gate, w3 up, w2 down)."""

    def __init__(self, width=16, experts=4):
        super().__init__()
        self.gate = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(OldStyleExpert(width) for _ in range(experts))

    def forward(self, x):
        weights, chosen = torch.topk(self.gate(x).softmax(-1), 2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = (chosen == e).any(-1)
            if mask.any():
                out[mask] += expert(x[mask]) * weights[mask][chosen[mask] == e][:, None]
        return out


class OldStyleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(16, 16)
        self.block_sparse_moe = OldStyleMoE()

    def forward(self, x):
        return x + self.block_sparse_moe(x + self.self_attn.q_proj(x))


def test_moe_experts_pool_exactly_in_both_storage_styles():
    # transformers 5: experts fused into 3-D parameters [experts, out, in]; gate_up_proj rows are [gate | up].
    model = build("mixtral")
    layer_map = resolve_layers(model)
    _backward(model)
    experts = model.model.layers[0].mlp.experts
    half = experts.gate_up_proj.shape[1] // 2
    references = {"mlp.experts.gate": experts.gate_up_proj.grad[:, :half], "mlp.experts.up": experts.gate_up_proj.grad[:, half:],
                  "mlp.experts.down": experts.down_proj.grad, "mlp.router": model.model.layers[0].mlp.gate.weight.grad}
    for name, grad in references.items():
        assert _sumsq(_component(layer_map, 0, name), lambda p: p.grad) == pytest.approx(float(torch.linalg.vector_norm(grad.double()) ** 2))
    assert _component(layer_map, 0, "mlp.experts.up").activation is None  # computed inside one forward: no output to hook

    # Older models: a ModuleList of experts, one component per role over all experts, hooks on every expert.
    blocks = nn.ModuleList(OldStyleBlock() for _ in range(2))
    layer_map = resolve_layers(blocks)
    assert layer_map.component_names == ["attn.q", "mlp.router", "mlp.experts.up", "mlp.experts.gate", "mlp.experts.down"]
    x = torch.randn(10, 16)
    for block in blocks:
        x = block(x)
    x.square().sum().backward()
    gate = _component(layer_map, 1, "mlp.experts.gate")
    assert len(gate.hooked_modules) == 4
    expected = sum(float(torch.linalg.vector_norm(e.w1.weight.grad.double()) ** 2) for e in blocks[1].block_sparse_moe.experts)
    assert _sumsq(gate, lambda p: p.grad) == pytest.approx(expected)


def test_t5_encoder_and_decoder_blocks_are_both_monitored(tmp_path):
    model = build("t5")
    layer_map = resolve_layers(model)
    assert layer_map.layer_labels == ["enc.0", "enc.1", "dec.0", "dec.1"]
    assert _component(layer_map, 1, "attn.q").module is model.encoder.block[1].layer[0].SelfAttention.q
    assert _component(layer_map, 2, "xattn.o").module is model.decoder.block[0].layer[1].EncDecAttention.o
    assert _component(layer_map, 3, "mlp.down").module is model.decoder.block[1].layer[2].DenseReluDense.wo
    assert not any(c.layer < 2 and c.name.startswith("xattn") for c in layer_map.components)  # no cross-attention in the encoder
    from conftest import ReferenceGradients, read_events, scalar_series

    targets = {"enc.1 attn.q": [("model.encoder.block.1.layer.0.SelfAttention.q.weight", lambda t: t)],
               "dec.0 xattn.o": [("model.decoder.block.0.layer.1.EncDecAttention.o.weight", lambda t: t)],
               "dec.1 mlp.down": [("model.decoder.block.1.layer.2.DenseReluDense.wo.weight", lambda t: t)]}
    reference = ReferenceGradients(1, targets)
    trainer = make_trainer(tmp_path, [GradientHeatmap(every_n_steps=1), reference], max_steps=2)
    trainer.fit(TokenModel(model), token_loader(batches=2, batch_size=2, length=8))
    events = read_events(trainer.logger.log_dir)
    tags = set(events.Tags()["scalars"])
    assert {"grad_norm/layer_enc_0/attn.q", "grad_norm/layer_dec_1/xattn.v", "grad_norm/layer_dec_1/all"} <= tags
    for key, tag in (("enc.1 attn.q", "layer_enc_1/attn.q"), ("dec.0 xattn.o", "layer_dec_0/xattn.o"),
                     ("dec.1 mlp.down", "layer_dec_1/mlp.down")):
        for step in (0, 1):
            expected = math.sqrt(reference.grad_sq[step][key])
            assert scalar_series(events, f"grad_norm/{tag}")[step] == pytest.approx(expected, rel=1e-4), (key, step)


def test_lora_gradients_come_from_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import ReferenceGradients, read_events, scalar_series, tiny_llama

    model = peft.get_peft_model(tiny_llama(2), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    layer_map = resolve_layers(model)
    q = _component(layer_map, 1, "attn.q")
    assert q.module is model.base_model.model.model.layers[1].self_attn.q_proj  # the wrapper: output = base + adapter
    prefix = "model.base_model.model.model.layers.1"
    adapters = {name: [(f"{prefix}.{path}.lora_{ab}.default.weight", lambda t: t) for ab in "AB"]
                for name, path in (("q", "self_attn.q_proj"), ("v", "self_attn.v_proj"), ("up", "mlp.up_proj"))}
    reference = ReferenceGradients(1, adapters)
    callback = GradientHeatmap(every_n_steps=1, metrics=["grad_norm", "update_ratio"])
    trainer = make_trainer(tmp_path, [callback, reference], max_steps=2)
    trainer.fit(TokenModel(model), token_loader())
    events = read_events(trainer.logger.log_dir)
    for name, tag in (("q", "attn.q"), ("v", "attn.v"), ("up", "mlp.up")):
        grads = scalar_series(events, f"grad_norm/layer_1/{tag}")
        updates = scalar_series(events, f"update_ratio/layer_1/{tag}")
        for step in (0, 1):
            assert grads[step] == pytest.approx(math.sqrt(reference.grad_sq[step][name]), rel=1e-4)
            # update_ratio is relative to the adapter weights, the only ones that move
            assert updates[step] == pytest.approx(math.sqrt(reference.update_sq[step][name] / reference.weight_sq[step][name]), rel=1e-4)
    tags = set(events.Tags()["scalars"])
    assert "grad_norm/layer_1/attn.k" not in tags and "grad_norm/layer_1/mlp.down" not in tags  # frozen: no scalar
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "grad_norm", "layer_x_component.npz"))
    column = list(saved["component_labels"]).index("attn.k")
    assert saved["missing"][1, column] and np.isnan(saved["values"][1, column])


def test_expert_heatmap_token_share_and_grad_norm_against_references(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from conftest import ReferenceGradients, read_events, scalar_series
    from lightning_heatmaps import ExpertHeatmap

    torch.manual_seed(0)
    model = TokenModel(build("mixtral"))
    layers = model.model.model.layers

    class Routing(Callback):
        """Independent count: top-2 of softmax(x W_router^T) from the router's input, per sampled step."""

        def __init__(self):
            self.share, self.step = {}, None

        def on_train_start(self, trainer, pl_module):
            for index, layer in enumerate(layers):
                def hook(module, args, output, index=index):
                    if self.step is None:
                        return
                    x = args[0].reshape(-1, module.weight.shape[1])
                    chosen = torch.topk(torch.softmax(x @ module.weight.T, -1), 2, dim=-1).indices
                    counts = torch.bincount(chosen.flatten(), minlength=4).double() / x.shape[0]
                    self.share.setdefault(self.step, {})[index] = counts
                layer.mlp.gate.register_forward_hook(hook)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = trainer.global_step

        def on_before_backward(self, trainer, pl_module, loss):
            self.step = None

    prefix = "model.model.layers.{}.mlp.experts"
    targets = {f"{layer}/{e}": [(f"{prefix.format(layer)}.gate_up_proj", lambda t, e=e: t[e]),
                                (f"{prefix.format(layer)}.down_proj", lambda t, e=e: t[e])] for layer in range(2) for e in range(4)}
    routing, gradients = Routing(), ReferenceGradients(1, targets)
    trainer = make_trainer(tmp_path, [ExpertHeatmap(every_n_steps=1), routing, gradients], max_steps=2)
    trainer.fit(model, token_loader(batches=2, batch_size=2, length=8))
    events = read_events(trainer.logger.log_dir)
    for step in (0, 1):
        for layer in range(2):
            for expert in range(4):
                share = scalar_series(events, f"expert_token_share/layer_{layer}/{expert}")[step]
                assert share == pytest.approx(float(routing.share[step][layer][expert]), abs=1e-6)
                norm = scalar_series(events, f"expert_grad_norm/layer_{layer}/{expert}")[step]
                assert norm == pytest.approx(math.sqrt(gradients.grad_sq[step][f"{layer}/{expert}"]), rel=1e-4)
            assert sum(scalar_series(events, f"expert_token_share/layer_{layer}/{e}")[step] for e in range(4)) == pytest.approx(2.0)


def test_expert_heatmap_with_a_module_list_of_experts():
    from lightning_heatmaps.expert import resolve_experts

    blocks = nn.ModuleList(OldStyleBlock() for _ in range(2))
    layer_map, routers, top_k = resolve_experts(blocks)
    assert layer_map.layer_labels == ["0", "1"] and layer_map.component_names == ["0", "1", "2", "3"]
    assert routers[1] is blocks[1].block_sparse_moe.gate
    expert = next(c for c in layer_map.components if c.layer == 1 and c.name == "2")
    assert {ref.param for ref in expert.params} == set(blocks[1].block_sparse_moe.experts[2].parameters())
    with pytest.raises(ValueError, match="ExpertHeatmap found no mixture-of-experts layer"):
        resolve_experts(build("llama"))


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if f not in ("gpt2", "opt", "falcon", "bloom", "t5", "bart")))
def test_every_projection_in_the_configs_tensor_parallel_plan_is_monitored_canonically(family):
    """Many configs name their block's projections in ``base_model_tp_plan``: a cross-check of the vocabulary."""
    model = build(family)
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    layer_map = resolve_layers(model)
    by_module = {}
    for component in layer_map.components:
        by_module.setdefault(component.module_name, set()).add(component.name)
    for pattern in plan:
        if "layers.*." not in pattern or pattern.endswith(("norm", "_norm")):
            continue
        suffix = pattern.split("layers.*.", 1)[1]
        if not any(name.endswith(f"layers.0.{suffix}") for name, _ in model.named_modules()) and not any(
                name.endswith(f"layers.0.{suffix}") for name, _ in model.named_parameters()):
            continue  # planned for a kind of layer this model does not have (dense layers of an MoE family)
        names = {name for module, found in by_module.items() if module.endswith(f"layers.0.{suffix}") for name in found}
        if not names:  # a parameter of a fused experts module (mlp.experts.gate_up_proj)
            module, attribute = suffix.rsplit(".", 1)
            names = {c.name for c in layer_map.components if c.layer == 0 and c.module_name.endswith(f"layers.0.{module}")
                     and any(ref.attribute == attribute for ref in c.params)}
        assert names and all(name.startswith(("attn.", "mlp.")) for name in names), (pattern, names)


def test_expert_heatmap_token_share_alone(tmp_path):
    from conftest import read_events, scalar_series
    from lightning_heatmaps import ExpertHeatmap

    trainer = make_trainer(tmp_path, [ExpertHeatmap(every_n_steps=1, metrics="token_share")], max_steps=2)
    trainer.fit(TokenModel(build("qwen3_moe")), token_loader(batches=2, batch_size=2, length=8))
    events = read_events(trainer.logger.log_dir)
    for step in (0, 1):
        assert sum(scalar_series(events, f"expert_token_share/layer_1/{e}")[step] for e in range(4)) == pytest.approx(2.0)


def _gate_up_roles(run, width):
    """``{fused output feature: (unit, "gate" | "up")}`` from what a module computes, given ``run(values)``: the
    per-unit input of its down projection when the fused gate/up output reads ``values``.

    Every fused output reads 1, then feature ``c`` reads 1, 2 and 3: the one unit that moves is ``c``'s unit, and it
    moves affinely when ``c`` is its up input (``act(gate) * up``, GPT-OSS's ``(up + 1) * glu(gate)``), not when
    ``c`` is its gate (the activation's input).
    """
    roles = {}
    for feature in range(width):
        outputs = []
        for value in (1.0, 2.0, 3.0):
            values = torch.ones(width, dtype=torch.float64)
            values[feature] = value
            outputs.append(run(values).double())
        moved = (outputs[2] - outputs[0]).abs()
        assert int((moved > 1e-6).sum()) == 1, (feature, moved)
        unit = int(moved.argmax())
        curvature = abs(float(outputs[2][unit] - 2 * outputs[1][unit] + outputs[0][unit]))
        roles[feature] = (unit, "up" if curvature < 1e-5 * float(moved[unit]) else "gate")
    assert sorted(roles.values()) == sorted((u, r) for u in range(width // 2) for r in ("gate", "up"))
    return roles


def _features(ref, shape_dim_size, dim, full_shape):
    """The fused output features a ref covers: its slice of a tensor holding each feature's index."""
    index = torch.arange(shape_dim_size).reshape([-1 if d == dim else 1 for d in range(len(full_shape))])
    return sorted(set(ref.view(index.expand(full_shape)).flatten().tolist()))


def test_fused_gate_up_of_phi3_matches_the_models_own_split():
    model = build("phi3", intermediate_size=16)
    mlp = model.model.layers[0].mlp
    width = mlp.gate_up_proj.weight.shape[0]

    def run(values):  # the MLP's own forward, the fused output replaced by `values`, read at down_proj's input
        seen = []
        hooks = [mlp.gate_up_proj.register_forward_hook(lambda m, a, out: values.float().expand(out.shape).clone()),
                 mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].flatten()))]
        with torch.no_grad():
            mlp(torch.zeros(1, 1, 32))
        for hook in hooks:
            hook.remove()
        return seen[0]

    roles = _gate_up_roles(run, width)
    layer_map = resolve_layers(model)
    for role in ("gate", "up"):
        ref = _component(layer_map, 0, f"mlp.{role}").params[0]
        assert _features(ref, width, 0, mlp.gate_up_proj.weight.shape) == sorted(f for f, (_, r) in roles.items() if r == role)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_fused_expert_gate_up_matches_the_models_own_split(family):
    """Experts stored as 3-D tensors, ``[experts, out, in]`` (Mixtral) or ``[experts, in, out]`` with gate and up
    interleaved (GPT-OSS): the split, weights and biases, equals what the family's own forward does."""
    sizes = {"mixtral": {"intermediate_size": 8}, "qwen2_moe": {"moe_intermediate_size": 8}, "qwen3_moe": {"moe_intermediate_size": 8}}
    model = build(family, **sizes.get(family, {}))  # 2 x intermediate != hidden, so the shape tells the test the storage
    model.set_experts_implementation("eager")  # the family's own forward, not a kernel driven by its declared layout
    experts = model.model.layers[0].mlp.experts
    hidden = model.config.hidden_size
    gate_up = experts.gate_up_proj
    transposed = gate_up.shape[1] == hidden  # this test's configs make the shape decide: 2 x intermediate != hidden
    width = gate_up.shape[2] if transposed else gate_up.shape[1]

    def run(values):  # expert 0 alone, one token e_0, its fused output set to `values`, read through an identity down
        with torch.no_grad():
            for param in experts.parameters():
                param.zero_()
            if transposed:
                gate_up[0, 0, :] = values
            else:
                gate_up[0, :, 0] = values
            experts.down_proj[0] = torch.eye(*experts.down_proj.shape[1:])
            token = torch.zeros(1, hidden)
            token[0, 0] = 1.0
            return experts(token, torch.tensor([[0]]), torch.tensor([[1.0]]))[0, : width // 2]

    roles = _gate_up_roles(run, width)
    layer_map = resolve_layers(model)
    for role in ("gate", "up"):
        expected = sorted(f for f, (_, r) in roles.items() if r == role)
        component = _component(layer_map, 0, f"mlp.experts.{role}")
        for ref in component.params:  # the weight, and its bias where the family has one
            param = ref.param
            dim = (2 if transposed else 1) if param.dim() == 3 else 1
            assert _features(ref, width, dim, param.shape) == expected, (role, ref.attribute)
        assert {ref.attribute for ref in component.params} == {"gate_up_proj", *(["gate_up_proj_bias"] if family == "gpt_oss" else [])}
    if family == "gpt_oss":  # biases pool with their role: no component of their own
        assert "mlp.experts.down_proj_bias" not in layer_map.component_names
        assert {ref.attribute for ref in _component(layer_map, 0, "mlp.experts.down").params} == {"down_proj", "down_proj_bias"}


class UndeclaredExperts(nn.Module):
    """3-D experts that do not declare their layout (``is_concatenated``): gate and up cannot be told apart."""

    def __init__(self, experts=4, width=16, hidden=8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * hidden, width))
        self.down_proj = nn.Parameter(torch.randn(experts, width, hidden))

    def forward(self, x):
        gate, up = (x @ self.gate_up_proj[0].T).chunk(2, dim=-1)
        return (nn.functional.silu(gate) * up) @ self.down_proj[0].T


class PlainGatedMLP(nn.Module):
    """A fused gate/up the forward does not use as act(gate) * up: no candidate layout matches."""

    def __init__(self, config=None, width=16, hidden=8):  # built from the config, as Hugging Face MLPs are
        super().__init__()
        self.gate_up_proj = nn.Linear(width, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        a, b = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(a * b)  # no activation, though the config names one


class UnknownLayoutBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = PlainGatedMLP()
        self.moe = nn.Module()
        self.moe.experts = UndeclaredExperts()

    def forward(self, x):
        return x + self.mlp(x) + self.moe.experts(x)


class UnknownLayoutModel(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(hidden_size=16, hidden_act="silu")
        self.config.model_type = "custom"
        self.layers = nn.ModuleList(UnknownLayoutBlock() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_fused_tensors_of_an_unconfirmed_layout_are_monitored_whole_and_reported(tmp_path):
    model = UnknownLayoutModel()
    layer_map = resolve_layers(model)
    names = layer_map.component_names
    assert "mlp.gate_up" in names and "mlp.experts.gate_up" in names
    assert not {"mlp.gate", "mlp.up", "mlp.experts.gate", "mlp.experts.up"} & set(names)
    assert set(layer_map.notes) == {"layers.0.mlp.gate_up_proj", "layers.1.mlp.gate_up_proj",
                                    "layers.0.moe.experts.gate_up_proj", "layers.1.moe.experts.gate_up_proj"}
    report = layer_map.describe()
    assert ("layers.*.moe.experts.gate_up_proj (x2): fused gate/up layout not confirmed (the module does not declare "
            "whether gate and up are concatenated or interleaved): monitored whole as mlp.experts.gate_up") in report
    assert ("layers.*.mlp.gate_up_proj (x2): fused gate/up layout not confirmed (its MLP's forward matches 0 of the 4 "
            "gate/up layouts): monitored whole as mlp.gate_up") in report
    whole = _component(layer_map, 1, "mlp.experts.gate_up")
    assert [ref.part for ref in whole.params] == [None]  # the whole tensor, so its norm is exact
