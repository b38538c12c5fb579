"""GradientHeatmap in real training runs, against gradients and weights read independently."""

import math

import pytest

from lightning_heatmaps import GradientHeatmap

from conftest import (
    EncoderModel, ReferenceGradients, TokenModel, make_trainer, read_events, scalar_series, tiny_gpt2,
    tiny_llama, tiny_neox, token_loader, vector_loader,
)

ALL = ["grad_norm", "grad_rms", "grad_to_weight", "update_ratio", "weight_drift"]


def whole(tensor):
    return tensor


def _check(events, reference, tag_key, metric, step):
    grad, weight = reference.grad_sq[step][tag_key], reference.weight_sq[step][tag_key]
    expected = {
        "grad_norm": math.sqrt(grad),
        "grad_rms": math.sqrt(grad / reference.numel[tag_key]),
        "grad_to_weight": math.sqrt(grad / weight),
        "update_ratio": math.sqrt(reference.update_sq[step][tag_key] / weight),
        "weight_drift": math.sqrt(reference.drift_sq[step][tag_key] / reference.initial_sq[tag_key])
        if reference.initial_sq[tag_key] else float("nan"),
    }[metric]
    layer, component = tag_key.split("/")
    value = scalar_series(events, f"{metric}/layer_{layer}/{component}")[step]
    if math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == pytest.approx(expected, rel=2e-4, abs=1e-9), (metric, tag_key, step)


def test_llama_gradient_metrics_match_reference(tmp_path):
    model = TokenModel(tiny_llama(2), lr=1e-2)
    names = {"attn.q": "self_attn.q_proj", "attn.v": "self_attn.v_proj", "mlp.gate": "mlp.gate_proj", "mlp.down": "mlp.down_proj"}
    targets = {f"{layer}/{c}": [(f"model.model.layers.{layer}.{m}.weight", whole)] for layer in range(2) for c, m in names.items()}
    targets["1/all"] = [(f"model.model.layers.1.{m}.weight", whole) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")]
    reference = ReferenceGradients(2, targets)
    trainer = make_trainer(tmp_path, [GradientHeatmap(metrics=ALL, every_n_steps=2), reference], max_steps=5)
    trainer.fit(model, token_loader())
    events = read_events(trainer.logger.log_dir)
    assert sorted(scalar_series(events, "grad_norm/layer_0/attn.q")) == [0, 2, 4]
    for key in targets:
        for metric in ALL:
            for step in (0, 2, 4):
                _check(events, reference, key, metric, step)
    assert {f"heatmaps/{m}/layer_x_step" for m in ALL} <= set(events.Tags()["images"])


def test_gpt2_fused_gradients_equal_column_slices(tmp_path):
    model = TokenModel(tiny_gpt2(2))
    targets = {}
    for layer in range(2):
        for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
            targets[f"{layer}/{name}"] = [
                (f"model.transformer.h.{layer}.attn.c_attn.weight", lambda t, i=index: t[:, 32 * i : 32 * (i + 1)]),
                (f"model.transformer.h.{layer}.attn.c_attn.bias", lambda t, i=index: t[32 * i : 32 * (i + 1)]),
            ]
        targets[f"{layer}/mlp.up"] = [(f"model.transformer.h.{layer}.mlp.c_fc.weight", whole),
                                      (f"model.transformer.h.{layer}.mlp.c_fc.bias", whole)]
    reference = ReferenceGradients(1, targets)
    trainer = make_trainer(tmp_path, [GradientHeatmap(metrics=["grad_norm", "grad_to_weight"], every_n_steps=1), reference],
                           max_steps=2)
    trainer.fit(model, token_loader())
    events = read_events(trainer.logger.log_dir)
    for key in targets:
        for metric in ("grad_norm", "grad_to_weight"):
            for step in (0, 1):
                _check(events, reference, key, metric, step)


def test_gpt_neox_gradients_split_per_head(tmp_path):
    model = TokenModel(tiny_neox(2))
    targets = {}
    for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
        targets[f"1/{name}"] = [
            ("model.gpt_neox.layers.1.attention.query_key_value.weight",
             lambda t, i=index: t.view(4, 24, 32)[:, 8 * i : 8 * (i + 1)]),
            ("model.gpt_neox.layers.1.attention.query_key_value.bias",
             lambda t, i=index: t.view(4, 24)[:, 8 * i : 8 * (i + 1)]),
        ]
    reference = ReferenceGradients(1, targets)
    trainer = make_trainer(tmp_path, [GradientHeatmap(every_n_steps=1), reference], max_steps=2)
    trainer.fit(model, token_loader())
    events = read_events(trainer.logger.log_dir)
    for key in targets:
        _check(events, reference, key, "grad_norm", 1)


def test_multihead_attention_in_proj_rows(tmp_path):
    model = EncoderModel(layers=2)
    targets = {}
    for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
        targets[f"0/{name}"] = [("encoder.layers.0.self_attn.in_proj_weight", lambda t, i=index: t[16 * i : 16 * (i + 1)]),
                                ("encoder.layers.0.self_attn.in_proj_bias", lambda t, i=index: t[16 * i : 16 * (i + 1)])]
    targets["0/attn.o"] = [("encoder.layers.0.self_attn.out_proj.weight", whole), ("encoder.layers.0.self_attn.out_proj.bias", whole)]
    reference = ReferenceGradients(1, targets)
    trainer = make_trainer(tmp_path, [GradientHeatmap(every_n_steps=1, metrics=["grad_norm", "update_ratio"]), reference],
                           max_steps=2)
    trainer.fit(model, vector_loader())
    events = read_events(trainer.logger.log_dir)
    for key in targets:
        for metric in ("grad_norm", "update_ratio"):
            _check(events, reference, key, metric, 1)


def test_accumulated_gradients_are_read_once_per_optimizer_step(tmp_path):
    model = TokenModel(tiny_llama(2))
    targets = {"0/attn.k": [("model.model.layers.0.self_attn.k_proj.weight", whole)]}
    reference = ReferenceGradients(1, targets)
    trainer = make_trainer(tmp_path, [GradientHeatmap(every_n_steps=1), reference], max_steps=2, accumulate_grad_batches=4)
    trainer.fit(model, token_loader())
    events = read_events(trainer.logger.log_dir)
    assert sorted(scalar_series(events, "grad_norm/layer_0/attn.k")) == [0, 1]
    for step in (0, 1):
        _check(events, reference, "0/attn.k", "grad_norm", step)
