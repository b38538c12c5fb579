"""The ring buffer: order, overwrite, whole-run thinning, state round trip."""

import numpy as np
import pytest

from lightning_heatmaps import RingBuffer


def test_recent_keeps_the_last_capacity_samples_in_order():
    buffer = RingBuffer(4, (2,))
    for step in range(0, 70, 10):
        buffer.append(step, np.array([step, -step]))
    steps, values = buffer.ordered()
    assert steps.tolist() == [30, 40, 50, 60]
    assert values[:, 0].tolist() == [30, 40, 50, 60]
    assert buffer.latest()[0] == 60 and len(buffer) == 4


def test_whole_run_thins_evenly_and_keeps_the_start():
    buffer = RingBuffer(8, (1,), policy="whole_run")
    for step in range(100):
        buffer.append(step * 5, np.array([step]))
    steps, values = buffer.ordered()
    assert steps[0] == 0 and len(steps) <= 8
    assert len(set(np.diff(steps).tolist())) == 1  # evenly spaced
    assert steps[-1] >= 99 * 5 - buffer.stride * 5
    assert values[:, 0].tolist() == (steps / 5).tolist()


@pytest.mark.parametrize("policy", ["recent", "whole_run"])
def test_state_round_trip_continues_the_history(policy):
    first = RingBuffer(6, (1,), policy=policy)
    for step in range(20):
        first.append(step, np.array([step]))
    second = RingBuffer(6, (1,), policy=policy)
    second.load_state_dict(first.state_dict())
    for step in range(20, 30):
        first.append(step, np.array([step]))
        second.append(step, np.array([step]))
    assert first.ordered()[0].tolist() == second.ordered()[0].tolist()


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"capacity=1: must be an integer >= 2"):
        RingBuffer(1, (1,))
    with pytest.raises(ValueError, match=r"policy='all'"):
        RingBuffer(4, (1,), policy="all")
    with pytest.raises(ValueError, match="does not match the buffer's shape"):
        RingBuffer(4, (2,)).append(0, np.zeros(3))
    with pytest.raises(ValueError, match="Saved sample shape"):
        RingBuffer(4, (2,)).load_state_dict(RingBuffer(4, (3,)).state_dict())
