"""Every invalid argument fails at construction with the argument, the value and the rule."""

import pytest

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"metrics": "rmss"}, ValueError, r"metrics='rmss': must be one or more distinct names from \['l2', 'max_abs'"),
        ({"metrics": []}, ValueError, r"metrics=\[\]"),
        ({"metrics": ["rms", "rms"]}, ValueError, "distinct"),
        ({"every_n_steps": 0}, ValueError, r"every_n_steps=0: must be an integer >= 1"),
        ({"every_n_steps": 2.5}, ValueError, r"every_n_steps=2.5: must be an integer >= 1"),
        ({"capacity": 1}, ValueError, r"capacity=1: must be an integer >= 2"),
        ({"history": "all"}, ValueError, r"history='all': must be one of \('recent', 'whole_run'\)"),
        ({"render_every_n_samples": 0}, ValueError, r"render_every_n_samples=0: must be an integer >= 1"),
        ({"min_render_interval_seconds": -1}, ValueError, r"min_render_interval_seconds=-1: must be a number >= 0"),
        ({"modules": ["q_proj"]}, TypeError, r"modules=\['q_proj'\]: must be None, a non-empty dict"),
        ({"modules": {"(": "x"}}, ValueError, r"pattern '\(' is not a regex"),
        ({"modules": {"q_proj": ""}}, TypeError, r"modules\['q_proj'\]='': must be a component name"),
        ({"first_layer_index": 2}, ValueError, r"first_layer_index=2: must be 0 or 1"),
        ({"cmap": "not-a-map"}, ValueError, r"cmap='not-a-map': must be a matplotlib colour map name"),
        ({"color_limits": (1.0, 0.0)}, ValueError, r"color_limits=\(1.0, 0.0\): must be \(vmin, vmax\) with vmin < vmax"),
        ({"color_limits": (0.0, 1.0), "log_scale": True}, ValueError, "log colour scale needs vmin > 0"),
    ],
)
def test_activation_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ActivationHeatmap(**kwargs)


def test_gradient_metric_names():
    with pytest.raises(ValueError, match=r"metrics='rms': must be one or more distinct names from \['grad_norm'"):
        GradientHeatmap(metrics="rms")
    assert GradientHeatmap(metrics=["update_ratio", "weight_drift"]).metric_names == ["update_ratio", "weight_drift"]


def test_unmatched_pattern_fails_at_setup(tmp_path):
    from conftest import TokenModel, make_trainer, tiny_llama, token_loader

    trainer = make_trainer(tmp_path, [ActivationHeatmap(modules={r"\.wq$": "attn.q"})], max_steps=1)
    with pytest.raises(ValueError, match=r"match no module of TokenModel. Some module names: model.model.embed_tokens"):
        trainer.fit(TokenModel(tiny_llama(2)), token_loader())
