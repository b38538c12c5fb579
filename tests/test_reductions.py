"""The pure maths, against numpy."""

import numpy as np
import pytest
import torch

from lightning_heatmaps.reductions import (
    ACTIVATION_METRICS, GRADIENT_METRICS, activation_partials, metric_table, pool_partials, squared_norms,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_partials_match_numpy(dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    x[0, 0, :3] = 0
    reference = x.float().numpy().astype(np.float64)
    l2, l1, linf, nonzero = activation_partials(x, ["sumsq", "sumabs", "maxabs", "nonzero"])
    assert float(l2) == pytest.approx(np.sqrt((reference**2).sum()), rel=1e-5)
    assert float(l1) == pytest.approx(np.abs(reference).sum(), rel=1e-5)
    assert float(linf) == pytest.approx(np.abs(reference).max(), rel=1e-6)
    assert int(nonzero) == np.count_nonzero(reference)


def test_pool_partials_combines_micro_batches_exactly():
    a, b = torch.randn(10), torch.randn(6)
    partials = torch.stack([torch.stack(activation_partials(t, ["sumsq"])) for t in (a, b)]).T  # (1 slot, 2 calls)
    pooled = pool_partials(partials, "sumsq")
    assert float(pooled[0]) == pytest.approx(float(torch.cat([a, b]).square().sum()), rel=1e-5)
    maxes = pool_partials(torch.tensor([[1.0, 3.0, 2.0]]), "maxabs")
    assert maxes.tolist() == [3.0]


def test_squared_norms_of_strided_views():
    weight = torch.randn(8, 12)
    views = [weight[:, 4:8], weight.unflatten(0, (2, 4)).select(1, 1), torch.randn(3)]
    expected = [float(v.double().square().sum()) for v in views]
    assert squared_norms(views).tolist() == pytest.approx(expected, rel=1e-5)


def test_all_column_pools_exactly_not_average_of_averages():
    # Layer 0 has two components of very different sizes: the pooled RMS weights by element count.
    stats = {"sumsq": np.array([4.0, 400.0, 9.0]), "count": np.array([1, 100, 1])}
    table = metric_table(ACTIVATION_METRICS["rms"], stats, np.array([0, 0, 1]), np.array([0, 1, 0]), 2, 2)
    assert table[0, :2].tolist() == pytest.approx([2.0, 2.0])
    assert table[0, 2] == pytest.approx(np.sqrt(404 / 101))
    assert np.isnan(table[1, 1])  # layer 1 has no component 1
    assert table[1, 2] == pytest.approx(3.0)


def test_max_pool_propagates_nan_and_zero_fraction_uses_counts():
    stats = {"maxabs": np.array([1.0, np.nan]), "count": np.array([4, 4])}
    table = metric_table(ACTIVATION_METRICS["max_abs"], stats, np.array([0, 0]), np.array([0, 1]), 1, 2)
    assert table[0, 0] == 1.0 and np.isnan(table[0, 1]) and np.isnan(table[0, 2])
    stats = {"nonzero": np.array([3.0, 4.0]), "count": np.array([4, 4])}
    table = metric_table(ACTIVATION_METRICS["zero_fraction"], stats, np.array([0, 0]), np.array([0, 1]), 1, 2)
    assert table[0].tolist() == pytest.approx([0.25, 0.0, 0.125])


def test_gradient_ratios_pool_numerators_and_denominators():
    stats = {"grad_sumsq": np.array([1.0, 3.0]), "weight_sumsq": np.array([4.0, 12.0]), "count": np.array([2, 6])}
    table = metric_table(GRADIENT_METRICS["grad_to_weight"], stats, np.array([0, 0]), np.array([0, 1]), 1, 2)
    assert table[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    table = metric_table(GRADIENT_METRICS["grad_rms"], stats, np.array([0, 0]), np.array([0, 1]), 1, 2)
    assert table[0].tolist() == pytest.approx([np.sqrt(0.5), np.sqrt(0.5), np.sqrt(4 / 8)])


def test_a_module_that_did_not_run_is_nan_not_zero():
    stats = {"sumsq": np.array([0.0, 8.0]), "count": np.array([0, 2])}
    table = metric_table(ACTIVATION_METRICS["rms"], stats, np.array([0, 0]), np.array([0, 1]), 1, 2)
    assert np.isnan(table[0, 0]) and table[0, 1] == pytest.approx(2.0) and table[0, 2] == pytest.approx(2.0)
