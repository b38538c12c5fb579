"""Resolution of real architectures into (layer, component), and the user's overrides."""

import pytest
import torch
from torch import nn

from lightning_heatmaps import CANONICAL_COMPONENTS, resolve_layers

from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_neox


def _names(layer_map):
    return [(c.layer, c.name) for c in layer_map.components]


def test_llama_family_gets_all_seven_canonical_components():
    import transformers

    configs = {
        "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config, "gemma": transformers.GemmaConfig,
    }
    models = [tiny_llama(3)]
    for config_class in configs.values():
        config = config_class(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, vocab_size=40)
        models.append(transformers.AutoModelForCausalLM.from_config(config))
    for model in models:
        layer_map = resolve_layers(model)
        assert layer_map.architecture == model.config.model_type, type(model).__name__
        assert layer_map.component_names == list(CANONICAL_COMPONENTS)
        assert len(layer_map.components) == 7 * layer_map.num_layers
        assert any("embed_tokens" in name for name in layer_map.skipped)


def test_gpt2_fused_qkv_splits_columns_of_the_conv1d_weight():
    model = tiny_gpt2()
    layer_map = resolve_layers(model)
    assert layer_map.component_names == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
    attention = model.transformer.h[1].attn.c_attn
    for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
        component = next(c for c in layer_map.components if c.layer == 1 and c.name == name)
        weight_ref, bias_ref = component.params
        torch.testing.assert_close(weight_ref.view(attention.weight), attention.weight[:, 32 * index : 32 * (index + 1)])
        torch.testing.assert_close(bias_ref.view(attention.bias), attention.bias[32 * index : 32 * (index + 1)])
        # The activation is the matching slice of the fused output, as GPT-2 itself splits it.
        output = torch.randn(2, 5, 96)
        torch.testing.assert_close(component.activation((), {}, output), output.split(32, dim=2)[index])


def test_gpt_neox_fused_qkv_is_interleaved_per_head():
    model = tiny_neox()
    layer_map = resolve_layers(model)
    assert layer_map.architecture == "gpt_neox"
    fused = model.gpt_neox.layers[0].attention.query_key_value
    heads, head_size = 4, 8
    # NeoX: view the output as (heads, 3 * head_size) and chunk the last dim into q, k, v.
    output = torch.randn(2, 5, 96)
    expected = output.view(2, 5, heads, 3 * head_size).chunk(3, dim=-1)
    weight_rows = fused.weight.view(heads, 3 * head_size, 32).chunk(3, dim=1)
    for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
        component = next(c for c in layer_map.components if c.layer == 0 and c.name == name)
        torch.testing.assert_close(component.activation((), {}, output), expected[index])
        torch.testing.assert_close(component.params[0].view(fused.weight), weight_rows[index])


def test_bert_components():
    layer_map = resolve_layers(tiny_bert())
    assert layer_map.architecture == "bert"
    assert layer_map.reasons["bert.encoder.layer.1.attention.output.LayerNorm"] == "norm"
    assert layer_map.reasons["bert.embeddings.word_embeddings"] == "embedding"
    modules = {c.name: c.module_name for c in layer_map.components if c.layer == 1}
    assert modules["attn.o"].endswith("layer.1.attention.output.dense")
    assert modules["mlp.down"].endswith("layer.1.output.dense")
    assert modules["mlp.up"].endswith("layer.1.intermediate.dense")


def test_torch_transformer_encoder_splits_in_proj_rows():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), num_layers=2, enable_nested_tensor=False)
    layer_map = resolve_layers(encoder)
    assert layer_map.component_names == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
    attention = encoder.layers[1].self_attn
    k = next(c for c in layer_map.components if c.layer == 1 and c.name == "attn.k")
    torch.testing.assert_close(k.params[0].view(attention.in_proj_weight), attention.in_proj_weight[16:32])
    x = torch.randn(3, 2, 16)
    expected = x @ attention.in_proj_weight[16:32].T + attention.in_proj_bias[16:32]
    torch.testing.assert_close(k.activation((x, x, x), {}, None), expected)


def test_generic_blocks_and_models_without_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.norm, self.down = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4)

    model = nn.Module()
    model.stem = nn.Linear(4, 4)
    model.blocks = nn.ModuleList([Block() for _ in range(3)])
    layer_map = resolve_layers(model, first_layer_index=1)
    assert layer_map.layer_labels == ["1", "2", "3"]
    assert layer_map.component_names == ["up", "down"]  # unknown names keep their path; norms are not weights
    assert layer_map.skipped == ["blocks.0.norm", "blocks.1.norm", "blocks.2.norm", "stem"]
    assert layer_map.reasons["blocks.0.norm"] == "norm" and layer_map.reasons["stem"] == "outside the blocks"
    flat = resolve_layers(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert flat.layer_labels == ["0", "2"] and flat.num_layers == 2


def test_user_regex_mapping_and_callable():
    model = tiny_llama(3)
    layer_map = resolve_layers(model, {r"mlp\.down_proj$": "mlp.down", r"self_attn\.o_proj$": "attn.o"}, first_layer_index=1)
    assert layer_map.layer_labels == ["1", "2", "3"]
    assert sorted(_names(layer_map)) == sorted((i, n) for i in range(3) for n in ("mlp.down", "attn.o"))

    def pick(name, module):
        if name.endswith("input_layernorm"):
            return int(name.split(".")[2]), "norm.in"
        return None

    layer_map = resolve_layers(model, pick)
    assert _names(layer_map) == [(0, "norm.in"), (1, "norm.in"), (2, "norm.in")]


def test_pattern_matching_nothing_lists_existing_names():
    with pytest.raises(ValueError, match=r"pattern\(s\) \['nothing_here'\] match no module.*model\.layers\.0\.self_attn\.q_proj"):
        resolve_layers(tiny_llama(), {"nothing_here": "x", "q_proj": "attn.q"})
    with pytest.raises(ValueError, match="selected no module"):
        resolve_layers(tiny_llama(), lambda name, module: None)
    with pytest.raises(ValueError, match="has no layer number"):
        resolve_layers(tiny_llama(), {"lm_head": "head"})


def test_describe_reports_monitored_and_skipped():
    text = resolve_layers(tiny_llama(3)).describe()
    assert "3 layers x 7 components (21 monitored" in text
    assert "model.layers.*.input_layernorm (x3) [norm]" in text and "model.embed_tokens [embedding]" in text
