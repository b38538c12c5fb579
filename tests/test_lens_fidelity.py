"""Lens heatmaps never show a broken model as a plausible one, and two instances never overwrite each other."""

import os
import warnings

import numpy as np
import pytest
import torch

from lightning_heatmaps import ActivationHeatmap, InterventionHeatmap, LogitLensHeatmap, ProbeHeatmap
from lightning_heatmaps.lens import divergence
from lightning_heatmaps.probes import accuracy, roc_auc

from conftest import VOCAB, TokenModel, make_trainer, read_events, tiny_llama, token_loader


def _probe_set(examples=32, length=8, token=5):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(6, VOCAB, (examples, length), generator=generator)
    labels = torch.arange(examples) % 2
    ids[labels == 1, 3] = token
    return ids, labels


def test_nan_propagates_through_the_lens_maths():
    log_p = torch.log_softmax(torch.randn(2, 6), -1)
    broken = log_p.clone()
    broken[1, 2] = float("nan")
    for kind in ("jsd", "kl", "top1"):
        values = divergence(log_p, broken, kind)
        assert torch.isfinite(values[0]) and torch.isnan(values[1]), kind
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8], [float("nan"), 0.9, 0.2, 0.8]])
    labels = torch.tensor([0, 1, 0, 1])
    assert roc_auc(scores, labels)[0] == 1.0 and torch.isnan(roc_auc(scores, labels)[1])
    assert accuracy(scores, labels)[0] == 0.5 and torch.isnan(accuracy(scores, labels)[1])


def test_a_nan_model_reads_as_nan_not_as_perfect(tmp_path):
    model = TokenModel(tiny_llama(3))
    with torch.no_grad():
        model.model.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    ids, labels = _probe_set()
    # Evaluated at step 0 (before the NaN spreads to every weight through the optimizer) and step 2.
    callbacks = [LogitLensHeatmap([[3, 4, 5, 6]], every_n_steps=2),
                 InterventionHeatmap([[7, 8, 9, 10, 11]], [(1, 3)], every_n_steps=2),
                 ProbeHeatmap(ids, labels, offsets=[-1], every_n_steps=2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, callbacks, max_steps=2)
        trainer.fit(model, token_loader())
    root = os.path.join(trainer.logger.log_dir, "heatmaps")
    history = np.load(os.path.join(root, "probe_auc", "layer_x_step.npz"))
    assert history["steps"].tolist() == [0, 2]
    assert np.isfinite(history["values"][0, 0]) and np.isnan(history["values"][1:, 0]).all()  # step 0
    assert np.isnan(history["values"][:, 1]).all()  # step 2: the optimizer has spread the NaN everywhere
    lens = np.load(os.path.join(root, "logit_lens", "prompt_0.npz"))["values"]
    assert np.isnan(lens).all()  # the reference (final) distribution is NaN: no cell can be 0.0
    interventions = np.load(os.path.join(root, "intervention_jsd", "layer_x_site.npz"))["values"]
    assert np.isnan(interventions).all()
    for name in ("LogitLensHeatmap", "InterventionHeatmap", "ProbeHeatmap"):
        found = [w for w in caught if str(w.message).startswith(f"{name}: non-finite values")]
        assert len(found) == 1, name  # warned once, though evaluated twice


def test_two_instances_need_distinct_names_and_then_keep_apart(tmp_path):
    ids, labels = _probe_set()
    _, other_labels = _probe_set()
    other_labels = 1 - other_labels
    # (Two identical schedules already stop at Lightning: equal `state_key`s. Different ones reach our check.)
    same = [ProbeHeatmap(ids, labels, every_n_steps=2), ProbeHeatmap(ids, other_labels, every_n_steps=3)]
    with pytest.raises(ValueError, match="would write the same tags and files \\(probe_auc\\): give each a distinct `name=`"):
        make_trainer(tmp_path / "same", same, max_steps=1).fit(TokenModel(tiny_llama(2)), token_loader())

    probes = [ProbeHeatmap(ids, labels, every_n_steps=2, name="token_at_3"),
              ProbeHeatmap(ids, other_labels, every_n_steps=2, name="inverted")]
    activations = [ActivationHeatmap(every_n_steps=1, modules={r"self_attn\.(q|k)_proj": "qk"}, name="query_key"),
                   ActivationHeatmap(every_n_steps=1, modules={r"mlp\.down_proj": "down"}, name="mlp_out")]
    assert len({c.state_key for c in probes + activations}) == 4
    trainer = make_trainer(tmp_path / "named", probes + activations, max_steps=2)
    trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    root = trainer.logger.log_dir
    scalars = set(read_events(root).Tags()["scalars"])
    assert {"token_at_3/best", "inverted/best", "query_key/activation_rms/layer_0/qk",
            "mlp_out/activation_rms/layer_1/down"} <= scalars
    assert os.path.exists(os.path.join(root, "heatmaps", "query_key", "activation_rms", "layer_x_component.npz"))
    first = np.load(os.path.join(root, "heatmaps", "token_at_3", "layer_x_position.npz"))["values"]
    second = np.load(os.path.join(root, "heatmaps", "inverted", "layer_x_position.npz"))["values"]
    assert first.shape == second.shape and not np.array_equal(first, second)

    with pytest.raises(ValueError, match="Invalid value for name='a/b'"):
        ProbeHeatmap(ids, labels, name="a/b")
