"""Fused q/k/v layouts are confirmed from the attention's own forward, or the projection is monitored whole."""

import logging

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_heatmaps import ActivationHeatmap, resolve_layers
from lightning_heatmaps.layouts import PROBE_ATTENTION, derive_layout, roles_from_states, roles_of_layout

from conftest import make_trainer, tiny_gpt2, vector_loader
from families import build
from test_families import FUSED_QKV, _attention_states_of_marked_projection, _component

WIDTH, HEADS = 16, 2


def _storage(name: str) -> torch.Tensor:
    """``order`` such that ``fused[..., order]`` is ``[q | k | v]`` (heads inside each) for a storage layout."""
    size, head = WIDTH, WIDTH // HEADS
    if name == "qkv":
        return torch.arange(3 * size)
    if name == "kqv":  # stored [k | q | v]
        return torch.cat([torch.arange(size, 2 * size), torch.arange(size), torch.arange(2 * size, 3 * size)])
    if name == "per_head":  # stored [q_h k_h v_h] for each head h
        return torch.tensor([h * 3 * head + r * head + d for r in range(3) for h in range(HEADS) for d in range(head)])
    if name == "permuted":  # stored in an order no [segments] x groups layout describes
        return torch.randperm(3 * size, generator=torch.Generator().manual_seed(0))
    raise ValueError(name)


class FusedAttention(nn.Module):
    """Plain PyTorch attention with a fused ``qkv`` projection stored as ``storage`` says."""

    def __init__(self, storage: str, needs_mask: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out_proj = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("order", _storage(storage), persistent=False)
        self.needs_mask = needs_mask

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This module's own split of its fused output into (query, key, value) states ``(B, heads, T, d)``."""
        return tuple(part.unflatten(-1, (HEADS, -1)).transpose(1, 2) for part in fused[..., self.order].chunk(3, -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_mask and mask is None:
            raise TypeError("FusedAttention.forward() needs a mask")
        q, k, v = self.split(self.qkv(x))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2))


class Block(nn.Module):
    def __init__(self, storage: str, needs_mask: bool = False) -> None:
        super().__init__()
        self.attn = FusedAttention(storage, needs_mask)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, mask=torch.ones(1) if self.attn.needs_mask else None)
        return x + self.fc2(F.gelu(self.fc1(x)))


class Stack(L.LightningModule):
    def __init__(self, storage: str, needs_mask: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(storage, needs_mask) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def training_step(self, batch, batch_idx):
        return self(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _features(component, width):
    """The fused output features a component's activation takes, and those its weight and bias slices cover."""
    marker = torch.arange(1, width + 1, dtype=torch.float32)[None, None]
    taken = sorted(int(x) - 1 for x in component.activation((), {}, marker).flatten().tolist())
    sliced = []
    for ref in component.params:
        index = torch.arange(ref.param.shape[ref.dim]).reshape([-1 if d == ref.dim else 1 for d in range(ref.param.dim())])
        sliced.append(sorted(set(ref.view(index.expand(ref.param.shape)).flatten().tolist())))
    return taken, sliced


@pytest.mark.parametrize("storage", ["qkv", "kqv", "per_head"])
def test_plain_attention_is_split_as_its_own_forward_splits(storage):
    model = Stack(storage)
    layer_map = resolve_layers(model)
    assert layer_map.component_names == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
    attention = model.blocks[1].attn
    marker = torch.arange(1, 3 * WIDTH + 1, dtype=torch.float32)[None, None]
    for name, state in zip(("attn.q", "attn.k", "attn.v"), attention.split(marker)):
        expected = sorted(int(x) - 1 for x in state.flatten().tolist())
        taken, sliced = _features(_component(layer_map, 1, name), 3 * WIDTH)
        assert taken == expected, (storage, name)
        assert sliced == [expected, expected], (storage, name)  # weight rows and bias entries
    assert not layer_map.notes


def test_a_layout_no_split_describes_is_monitored_whole_and_reported(tmp_path, caplog):
    model = Stack("permuted")
    layer_map = resolve_layers(model)
    assert layer_map.component_names == ["attn.qkv", "attn.o", "mlp.up", "mlp.down"]
    whole = _component(layer_map, 0, "attn.qkv")
    assert whole.params[0].part is None and whole.module is model.blocks[0].attn.qkv
    note = layer_map.notes["blocks.0.attn.qkv"]
    assert note.startswith("fused q/k/v layout not confirmed (its output features are not a contiguous or interleaved")
    assert note.endswith("monitored whole as attn.qkv")
    assert "blocks.*.attn.qkv (x2): fused q/k/v layout not confirmed" in layer_map.describe()

    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=1)], max_steps=1).fit(model, vector_loader(batches=1))
    report = next(r.getMessage() for r in caplog.records if "ActivationHeatmap" in r.getMessage() and "monitors" in r.getMessage())
    assert "attn.qkv" in report and "fused q/k/v layout not confirmed" in report


def test_a_probe_that_fails_leaves_the_projection_whole_with_the_reason():
    layer_map = resolve_layers(Stack("qkv", needs_mask=True))  # its forward cannot run on one input alone
    assert "attn.qkv" in layer_map.component_names
    assert "probe failed: TypeError: FusedAttention.forward() needs a mask" in layer_map.notes["blocks.1.attn.qkv"]

    # a Hugging Face model whose attention was swapped for a class a fresh copy of the model does not have
    import transformers

    class Renamed(transformers.models.gpt2.modeling_gpt2.GPT2Attention):
        pass

    model = tiny_gpt2()
    swapped = Renamed(model.config, layer_idx=0)
    swapped.load_state_dict(model.transformer.h[0].attn.state_dict())
    model.transformer.h[0].attn = swapped
    layer_map = resolve_layers(model)
    assert {c.name for c in layer_map.components if c.layer == 0} >= {"attn.qkv"}
    assert {c.name for c in layer_map.components if c.layer == 1} >= {"attn.q", "attn.k", "attn.v"}
    assert "has no Renamed" in layer_map.notes["transformer.h.0.attn.c_attn"]


def test_a_model_type_whose_candidate_is_wrong_is_split_as_the_model_splits():
    model = build("gpt2")
    model.config.model_type = "gpt_neox"  # the vocabulary's candidate would interleave per head: GPT-2 does not
    layer_map = resolve_layers(model)
    fused = model.get_submodule(FUSED_QKV["gpt2"])
    q, k, v = _attention_states_of_marked_projection(model, fused)
    for name, state in (("attn.q", q), ("attn.k", k), ("attn.v", v)):
        expected = sorted(int(x) - 1 for x in state.flatten().tolist())
        taken, sliced = _features(_component(layer_map, 0, name), fused.weight.shape[1])
        assert taken == expected and sliced == [expected, expected], name
    assert "refutes the vocabulary's layout for model_type 'gpt_neox'" in layer_map.notes[FUSED_QKV["gpt2"]]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["gpt2", "bloom", "plain", "phi3", "gpt_oss"])
def test_the_probe_leaves_the_model_as_it_was(family):  # phi3: its gate/up MLP is probed too
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(0)
    model = Stack("per_head") if family == "plain" else build(family)
    model.eval()
    inputs = torch.randn(2, 5, WIDTH) if family == "plain" else torch.randint(0, 64, (2, 5))
    run = (lambda: model(inputs)) if family == "plain" else (lambda: model(input_ids=inputs).logits)
    before, state = run(), {k: v.clone() for k, v in model.state_dict().items()}
    implementation = None if family == "plain" else model.config._attn_implementation
    rng, registry = torch.get_rng_state(), list(ALL_ATTENTION_FUNCTIONS)

    layer_map = resolve_layers(model)

    assert {"attn.q", "attn.k", "attn.v"} <= set(layer_map.component_names)  # the probe did run and confirm
    if family in ("phi3", "gpt_oss"):
        assert {"gate", "up"} <= {name.rsplit(".", 1)[-1] for name in layer_map.component_names}
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(ALL_ATTENTION_FUNCTIONS) == registry and PROBE_ATTENTION not in ALL_ATTENTION_FUNCTIONS
    assert _hooks(model) == 0
    if family != "plain":
        assert model.config._attn_implementation == implementation
    after = {k: v for k, v in model.state_dict().items()}
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    torch.testing.assert_close(run(), before, rtol=0, atol=0)


def test_layouts_from_roles():
    assert derive_layout(roles_of_layout((("q", "v", "k"), (8, 8, 8), 4))) == (("q", "v", "k"), (8, 8, 8), 4)
    assert derive_layout([0] * 4 + [1] * 2 + [2] * 2) == (("q", "k", "v"), (4, 2, 2), 1)
    assert derive_layout([0, 1, 2, 0, 2, 1]) is None  # the order changes between groups
    assert derive_layout([0, 0, 1, 2, 0, 1, 2]) is None  # the sizes change between groups
    assert derive_layout([0, 1, 0, 1]) is None  # no v
    marker = torch.arange(1.0, 7.0)
    assert roles_from_states(6, marker[:2], marker[2:4], marker[4:]) == ([0, 0, 1, 1, 2, 2], "")
    assert roles_from_states(6, marker[:3], marker[2:4], marker[4:]) == (None, "output feature 2 reaches both q and k")
    assert roles_from_states(6, marker[:2], marker[2:3], marker[4:]) == (None, "1 of 6 output features reach none of q, k, v")
    assert roles_from_states(6, marker[:2] * 0.125, marker[2:4] * 0.7, marker[4:]) == ([0, 0, 1, 1, 2, 2], "")  # scaled
    assert roles_from_states(6, marker[:2].square(), marker[2:4], marker[4:])[0] is None  # transformed after the split
    assert roles_from_states(6, marker[:2] - 0.5, marker[2:4], marker[4:])[0] is None


def test_states_scaled_by_the_rotary_embedding_are_still_read():
    """Phi-3's long-context rotary scales q and k by ``attention_scaling`` even at position 0."""
    import transformers

    head_dim = 8
    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, max_position_embeddings=256, original_max_position_embeddings=64,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * (head_dim // 2),
                             long_factor=[2.0] * (head_dim // 2)),
    )
    model = transformers.Phi3ForCausalLM(config)
    assert model.model.rotary_emb.attention_scaling != 1.0
    layer_map = resolve_layers(model)
    assert not layer_map.notes
    rows = {"attn.q": range(0, 32), "attn.k": range(32, 48), "attn.v": range(48, 64)}  # Phi-3: [q | k | v] under GQA
    for name, expected in rows.items():
        taken, sliced = _features(_component(layer_map, 0, name), 64)
        assert taken == list(expected) and sliced == [list(expected)], name
