"""Interventions: exact when nothing is changed; each site equals a manual patched forward."""

import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from lightning_heatmaps import InterventionHeatmap

from conftest import TokenModel, make_trainer, read_events, scalar_series, tiny_llama, token_loader

PROMPT, SPAN = [7, 8, 9, 10, 11, 12, 13], (2, 4)


def _model(implementation="eager", layers=2):
    torch.manual_seed(0)
    return TokenModel(tiny_llama(layers, attn_implementation=implementation))


def _evaluate(callback, model, tmp_path):
    trainer = make_trainer(tmp_path, [callback], max_steps=0)
    callback.setup(trainer, model, "fit")
    callback.on_fit_start(trainer, model)  # resolution happens at fit start, after configure_model
    model.eval()
    with torch.no_grad():
        return callback._evaluate(model).images[0].values


def block_subject_to_last(module, args, kwargs):
    """Attention pre-hook: the causal mask with the subject -> last-token edges of PROMPT removed."""
    subject, last = list(range(*SPAN)), len(PROMPT) - 1
    mask = torch.full((len(PROMPT), len(PROMPT)), torch.finfo(torch.float32).min).triu(1)
    mask[last, subject] = torch.finfo(torch.float32).min
    kwargs["attention_mask"] = mask[None, None]
    return args, kwargs


def _next_token(lm, ids, block_hooks=(), attention_hooks=()):
    handles = [lm.model.layers[i].register_forward_hook(h) for i, h in block_hooks]
    handles += [lm.model.layers[i].self_attn.register_forward_pre_hook(h, with_kwargs=True) for i, h in attention_hooks]
    try:
        with torch.no_grad():
            return torch.softmax(lm(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    finally:
        for handle in handles:
            handle.remove()


def test_nothing_changed_gives_exactly_zero(tmp_path):
    values = _evaluate(InterventionHeatmap([PROMPT], [SPAN], noise_scale=0.0, window=0), _model(), tmp_path)
    assert values.shape == (2, 3) and np.all(values == 0.0)


def test_each_site_equals_a_manual_patched_forward(tmp_path):
    model = _model("eager", layers=2)
    values = _evaluate(InterventionHeatmap([PROMPT], [SPAN], noise_scale=3.0, window=1, seed=5), model, tmp_path)
    lm = model.model
    clean = _next_token(lm, PROMPT)
    with torch.no_grad():
        scale = 3.0 * lm.model.embed_tokens(torch.tensor([PROMPT])).float().std()
    noise = torch.randn(len(PROMPT), 32, generator=torch.Generator().manual_seed(5)) * scale
    subject, last = list(range(*SPAN)), len(PROMPT) - 1

    def add_noise(positions):
        def hook(module, args, output):
            states = output if torch.is_tensor(output) else output[0]
            states = states.clone()
            states[0, positions] += noise[positions]
            return states if torch.is_tensor(output) else (states, *output[1:])
        return hook

    for layer in range(2):
        subj = _next_token(lm, PROMPT, [(layer, add_noise(subject))])
        last_token = _next_token(lm, PROMPT, [(layer, add_noise([last]))])
        attn = _next_token(lm, PROMPT, attention_hooks=[(layer, block_subject_to_last)])  # window 1: this layer only
        expected = [jensenshannon(clean, q, base=2) ** 2 for q in (subj, attn, last_token)]
        np.testing.assert_allclose(values[layer], expected, atol=2e-5)
    # The interventions do change the output, except where nothing can flow: the subject's states after the
    # last layer never reach the last position.
    assert values[0, 0] > 0 and values[1, 0] == 0 and values[:, 1].min() > 0 and values[:, 2].min() > 0


def test_sdpa_equals_eager_and_flash_attention_is_refused(tmp_path):
    eager = _evaluate(InterventionHeatmap([PROMPT], [SPAN], corruption="zero", window=3), _model("eager"), tmp_path / "e")
    sdpa = _evaluate(InterventionHeatmap([PROMPT], [SPAN], corruption="zero", window=3), _model("sdpa"), tmp_path / "s")
    np.testing.assert_allclose(sdpa, eager, atol=1e-5)
    model = _model("eager")
    model.model.config._attn_implementation = "flash_attention_2"
    trainer = make_trainer(tmp_path / "f", [InterventionHeatmap([PROMPT], [SPAN])], max_steps=1)
    with pytest.raises(ValueError, match="cannot block attention edges with attn_implementation='flash_attention_2'"):
        trainer.fit(model, token_loader())


def test_callback_in_a_real_run(tmp_path):
    prompts = [PROMPT, [20, 21, 22, 23, 24]]
    callback = InterventionHeatmap(prompts, [SPAN, (0, 2)], corruption="mean", every_n_steps=2)
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(_model("sdpa", layers=3), token_loader())
    events = read_events(trainer.logger.log_dir)
    assert {"heatmaps/intervention_jsd/layer_x_site", "heatmaps/intervention_jsd/layer_x_step"} <= set(events.Tags()["images"])
    assert sorted(scalar_series(events, "intervention_jsd/layer_2/mean_divergence")) == [0, 2]
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "intervention_jsd", "layer_x_site.npz"))
    assert saved["values"].shape == (3, 3) and saved["column_labels"].tolist() == ["Subj.", "Attn.", "Last."]
    assert np.all((saved["values"] >= 0) & (saved["values"] <= 1))


def test_bad_spans():
    with pytest.raises(ValueError, match="need one \\(start, end\\) span per prompt"):
        InterventionHeatmap([PROMPT], None)
    with pytest.raises(ValueError, match=r"Invalid subject span \(3, 7\) for prompt 0 of 7 tokens: need 0 <= start < end <= 6"):
        InterventionHeatmap([PROMPT], [(3, 7)])
    with pytest.raises(ValueError, match=r"corruption='blur'"):
        InterventionHeatmap([PROMPT], [SPAN], corruption="blur")


@pytest.mark.parametrize("window", [2, 3])
def test_window_blocks_exactly_window_layers(tmp_path, window):
    model = _model("eager", layers=4)
    values = _evaluate(InterventionHeatmap([PROMPT], [SPAN], window=window), model, tmp_path)
    lm = model.model
    clean = _next_token(lm, PROMPT)

    for layer in range(4):
        # Documented: layers layer - window // 2 .. layer + (window - 1) // 2, clipped (window 2: layer - 1 and layer).
        blocked = [i for i in range(layer - window // 2, layer + (window - 1) // 2 + 1) if 0 <= i < 4]
        assert len(blocked) == window or layer in (0, 3)
        attn = _next_token(lm, PROMPT, attention_hooks=[(i, block_subject_to_last) for i in blocked])
        assert values[layer, 1] == pytest.approx(jensenshannon(clean, attn, base=2) ** 2, abs=2e-5), (layer, blocked)
