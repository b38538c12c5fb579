"""ActivationHeatmap in real training runs, read back from the TensorBoard event files."""


import numpy as np
import pytest
import torch

from lightning_heatmaps import ActivationHeatmap

from conftest import (
    EncoderModel, ReferenceActivations, TokenModel, make_trainer, read_events, scalar_series, tiny_gpt2,
    tiny_llama, token_loader, vector_loader,
)

LLAMA_MODULES = {
    "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj", "mlp.up": "mlp.up_proj", "mlp.gate": "mlp.gate_proj", "mlp.down": "mlp.down_proj",
}


def _output(args, output):
    return output


def test_llama_activation_rms_matches_reference_at_sampled_steps(tmp_path):
    model = TokenModel(tiny_llama(2))
    targets = {f"{layer}/{component}": (f"model.model.layers.{layer}.{module}", _output)
               for layer in range(2) for component, module in LLAMA_MODULES.items()}
    reference = ReferenceActivations(2, targets)
    callback = ActivationHeatmap(every_n_steps=2, min_render_interval_seconds=0)
    trainer = make_trainer(tmp_path, [callback, reference], max_steps=7,
                           limit_val_batches=2, val_check_interval=3, num_sanity_val_steps=2)
    trainer.fit(model, token_loader(batches=8), token_loader(batches=2, seed=1))
    events = read_events(trainer.logger.log_dir)
    for layer in range(2):
        for component in LLAMA_MODULES:
            series = scalar_series(events, f"activation_rms/layer_{layer}/{component}")
            assert sorted(series) == [0, 2, 4, 6]  # the sampling rule; validation never adds samples
            for step, value in series.items():
                assert value == pytest.approx(reference.rms(step, [f"{layer}/{component}"]), rel=1e-4)
        pooled = scalar_series(events, f"activation_rms/layer_{layer}/all")
        for step, value in pooled.items():
            keys = [f"{layer}/{c}" for c in LLAMA_MODULES]
            assert value == pytest.approx(reference.rms(step, keys), rel=1e-4)

    images = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    assert set(images) == {"heatmaps/activation_rms/layer_x_step", "heatmaps/activation_rms/layer_x_component"}
    assert all(event.width > 300 and event.height > 200 for events_ in images.values() for event in events_)
    assert images["heatmaps/activation_rms/layer_x_step"][-1].step == 6  # rendered again at the end

    saved = np.load(f"{trainer.logger.log_dir}/heatmaps/activation_rms/layer_x_step.npz")
    assert saved["steps"].tolist() == [0, 2, 4, 6]
    assert saved["layer_labels"].tolist() == ["0", "1"] and str(saved["metric"]) == "activation_rms"
    expected = [[scalar_series(events, f"activation_rms/layer_{layer}/all")[s] for s in (0, 2, 4, 6)] for layer in range(2)]
    np.testing.assert_allclose(saved["values"], expected, rtol=1e-6)
    latest = np.load(f"{trainer.logger.log_dir}/heatmaps/activation_rms/layer_x_component.npz")
    assert latest["component_labels"].tolist() == list(LLAMA_MODULES) and int(latest["step"]) == 6
    assert latest["values"][1, 6] == pytest.approx(scalar_series(events, "activation_rms/layer_1/mlp.down")[6], rel=1e-6)

    # trainer.validate / predict afterwards do not feed the training heatmaps.
    trainer.validate(model, token_loader(batches=2, seed=2), verbose=False)
    trainer.predict(model, token_loader(batches=2, seed=3))
    assert sorted(scalar_series(read_events(trainer.logger.log_dir), "activation_rms/layer_0/all")) == [0, 2, 4, 6]
    assert callback.samples_recorded == 4 and not callback._handles  # hooks went at the end of fit


def test_gpt2_fused_qkv_activations_equal_slice_norms(tmp_path):
    model = TokenModel(tiny_gpt2(2))
    targets = {f"{layer}/{name}": (f"model.transformer.h.{layer}.attn.c_attn",
                                   lambda args, out, i=i: out.split(32, dim=2)[i])
               for layer in range(2) for i, name in enumerate(("attn.q", "attn.k", "attn.v"))}
    reference = ReferenceActivations(1, targets)
    callback = ActivationHeatmap(metrics=["rms", "max_abs"], every_n_steps=1)
    trainer = make_trainer(tmp_path, [callback, reference], max_steps=3)
    trainer.fit(model, token_loader())
    events = read_events(trainer.logger.log_dir)
    for key in targets:
        layer, name = key.split("/")
        for step, value in scalar_series(events, f"activation_rms/layer_{layer}/{name}").items():
            assert value == pytest.approx(reference.rms(step, [key]), rel=1e-4)
        for step, value in scalar_series(events, f"activation_max_abs/layer_{layer}/{name}").items():
            assert value == pytest.approx(reference.sums[step][key][2], rel=1e-5)


def test_transformer_encoder_qkv_and_out_projection(tmp_path):
    model = EncoderModel(layers=2)

    def in_proj(layer, index):
        attention = model.encoder.layers[layer].self_attn
        return lambda args, output: torch.nn.functional.linear(
            args[0], attention.in_proj_weight[16 * index : 16 * (index + 1)], attention.in_proj_bias[16 * index : 16 * (index + 1)])

    targets = {}
    for layer in range(2):
        for index, name in enumerate(("attn.q", "attn.k", "attn.v")):
            targets[f"{layer}/{name}"] = (f"encoder.layers.{layer}.self_attn", in_proj(layer, index))
        targets[f"{layer}/attn.o"] = (f"encoder.layers.{layer}.self_attn", lambda args, output: output[0])
        targets[f"{layer}/mlp.up"] = (f"encoder.layers.{layer}.linear1", _output)
    reference = ReferenceActivations(2, targets)
    trainer = make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=2), reference], max_steps=4)
    trainer.fit(model, vector_loader())
    events = read_events(trainer.logger.log_dir)
    for key in targets:
        layer, name = key.split("/")
        series = scalar_series(events, f"activation_rms/layer_{layer}/{name}")
        assert sorted(series) == [0, 2]
        for step, value in series.items():
            assert value == pytest.approx(reference.rms(step, [key]), rel=1e-4)


def test_gradient_accumulation_pools_all_micro_batches(tmp_path):
    model = TokenModel(tiny_llama(2))
    targets = {"1/mlp.up": ("model.model.layers.1.mlp.up_proj", _output)}
    reference = ReferenceActivations(1, targets)
    trainer = make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=1), reference], max_steps=3,
                           accumulate_grad_batches=3)
    trainer.fit(model, token_loader(batches=9))
    series = scalar_series(read_events(trainer.logger.log_dir), "activation_rms/layer_1/mlp.up")
    assert sorted(series) == [0, 1, 2]
    for step, value in series.items():
        assert reference.sums[step]["1/mlp.up"][1] == 3 * 4 * 12 * 48  # three micro-batches were pooled
        assert value == pytest.approx(reference.rms(step, ["1/mlp.up"]), rel=1e-4)


def test_checkpointed_forwards_are_not_counted_twice(tmp_path):
    def run(checkpointing, path):
        torch.manual_seed(0)
        backbone = tiny_llama(2)
        if checkpointing:
            backbone.gradient_checkpointing_enable()
        trainer = make_trainer(path, [ActivationHeatmap(every_n_steps=1, metrics=["rms", "zero_fraction"])], max_steps=2)
        trainer.fit(TokenModel(backbone), token_loader())
        events = read_events(trainer.logger.log_dir)
        return {tag: scalar_series(events, tag) for tag in events.Tags()["scalars"] if tag.startswith("activation")}

    plain, checkpointed = run(False, tmp_path / "plain"), run(True, tmp_path / "checkpointed")
    assert plain.keys() == checkpointed.keys()
    for tag in plain:
        assert checkpointed[tag] == pytest.approx(plain[tag], rel=1e-5), tag
