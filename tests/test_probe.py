"""Linear probes: AUC against scikit-learn on the same features and split; the callback in a real run."""

import os

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lightning_heatmaps import ProbeHeatmap
from lightning_heatmaps.probes import accuracy, fit_logistic, roc_auc, standardize

from conftest import VOCAB, TokenModel, make_trainer, read_events, scalar_series, tiny_llama, token_loader


def test_batched_auc_matches_sklearn_with_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (4, 30), generator=generator).float()  # many ties
    labels = torch.randint(0, 2, (30,), generator=generator)
    ours = roc_auc(scores, labels)
    for row in range(4):
        assert float(ours[row]) == pytest.approx(roc_auc_score(labels.numpy(), scores[row].numpy()), abs=1e-6)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(scores, torch.zeros(30, dtype=torch.long))


def test_batched_logistic_regression_matches_sklearn():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 60, 12, generator=generator)
    labels = (x[0, :, 0] + 0.5 * torch.randn(60, generator=generator) > 0).long()
    x_train, x_test = standardize(x[:, :40], x[:, 40:])
    weights, bias = fit_logistic(x_train, labels[:40], c=0.5)
    for probe in range(3):
        reference = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(x_train[probe].numpy(), labels[:40].numpy())
        np.testing.assert_allclose(weights[probe].numpy(), reference.coef_[0], atol=2e-3)
        assert float(bias[probe]) == pytest.approx(reference.intercept_[0], abs=2e-3)
        ours = roc_auc((x_test[probe] @ weights[probe] + bias[probe])[None], labels[40:])
        expected = roc_auc_score(labels[40:].numpy(), reference.decision_function(x_test[probe].numpy()))
        assert float(ours[0]) == pytest.approx(expected, abs=0.01)
    assert accuracy(torch.tensor([[1.0, -1.0]]), torch.tensor([1, 0])).tolist() == [1.0]


def _probe_set(examples=64, length=10):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(6, VOCAB, (examples, length), generator=generator)
    labels = torch.arange(examples) % 2
    ids[labels == 1, 4] = 5  # the label is token 5 at position 4: readable from position 4 on, not before
    return ids, labels


def test_callback_auc_matches_sklearn_on_the_same_features(tmp_path):
    ids, labels = _probe_set()
    callback = ProbeHeatmap(ids, labels, positions={"second": [1] * 64, "fifth": torch.full((64,), 4)}, offsets=[-1],
                            every_n_steps=3, c=1.0)
    model = TokenModel(tiny_llama(2))
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(model, token_loader())
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "probe_auc", "layer_x_position.npz"))
    assert saved["column_labels"].tolist() == ["second", "fifth", "-1"] and int(saved["step"]) == 3
    events = read_events(trainer.logger.log_dir)
    assert sorted(scalar_series(events, "probe_auc/layer_1/best_score")) == [0, 3]
    assert "heatmaps/probe_auc/layer_x_position" in events.Tags()["images"]

    # Independent: each decoder layer's raw output, captured by the test's own hooks (Hugging Face's last
    # hidden state is final-normed, so it is not the last layer's output), sklearn on the same split.
    lm = model.model.eval()
    hidden = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: hidden.__setitem__(i, out if torch.is_tensor(out) else out[0]))
               for i, layer in enumerate(lm.model.layers)]
    with torch.no_grad():
        lm(input_ids=ids)
    for handle in handles:
        handle.remove()
    train, test = callback.train_index.numpy(), callback.test_index.numpy()
    for layer in range(2):
        for column, position in enumerate([1, 4, 9]):
            features = hidden[layer][:, position].numpy().astype(np.float64)
            mean, std = features[train].mean(0), features[train].std(0) + 1e-12
            scaled = (features - mean) / std
            reference = LogisticRegression(C=1.0, max_iter=5000).fit(scaled[train], labels.numpy()[train])
            expected = roc_auc_score(labels.numpy()[test], reference.decision_function(scaled[test]))
            assert saved["values"][layer, column] == pytest.approx(expected, abs=0.01), (layer, position)
    assert saved["values"][:, 1].min() > 0.8 and saved["values"][:, 0].max() < 0.75  # the label lives at position 4


def test_mlp_down_input_site_accuracy_and_callable_positions(tmp_path):
    ids, labels = _probe_set()
    callback = ProbeHeatmap(ids, labels, positions={"after_fourth": lambda row: 5}, offsets=[-1, -6],
                            site="mlp.down.input", score="accuracy", every_n_steps=5)
    assert callback.positions[:, 0].tolist() == [5] * 64 and callback.position_names == ["after_fourth", "-1", "-6"]
    trainer = make_trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "probe_accuracy", "layer_x_position.npz"))
    assert saved["values"].shape == (2, 3) and saved["column_labels"].tolist() == ["after_fourth", "-1", "-6"]
    assert saved["values"][:, 2].min() > 0.7  # offset -6 of 10 tokens is position 4


def test_bad_probe_data(tmp_path):
    ids, labels = _probe_set(8)
    with pytest.raises(ValueError, match="need at least 2 examples of each class, got 8 of 0 and 0 of 1"):
        ProbeHeatmap(ids, torch.zeros(8))
    with pytest.raises(ValueError, match=r"Invalid position '-11' for example 0: index -1 is outside its 10 tokens"):
        ProbeHeatmap(ids, torch.tensor([0, 1] * 4), offsets=[-11])
    with pytest.raises(ValueError, match=r"positions\['x'\]: 3 indices for 8 examples"):
        ProbeHeatmap(ids, torch.tensor([0, 1] * 4), positions={"x": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"score='f1'"):
        ProbeHeatmap(ids, torch.tensor([0, 1] * 4), score="f1")
    trainer = make_trainer(tmp_path, [ProbeHeatmap(ids, torch.tensor([0, 1] * 4), site="mlp.sideways")], max_steps=1)
    with pytest.raises(ValueError, match=r"site='mlp.sideways': no component 'mlp.sideways'; components: \['attn.q'"):
        trainer.fit(TokenModel(tiny_llama(2)), token_loader())
