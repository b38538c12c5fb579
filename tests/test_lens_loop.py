"""A lens monitor in a plain loop (:class:`lightning_heatmaps.loop.Monitor`) writes what the Lightning callback writes."""

import os

import numpy as np
import pytest
import torch

from conftest import make_trainer, read_events, scalar_series, tiny_llama, token_loader, TokenModel

PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 8, 7, 1]]
EVERY, STEPS = 2, 5
TAGS = ["logit_lens/layer_0/mean_divergence", "logit_lens/layer_1/mean_divergence", "logit_lens/deep_thinking_share",
        "logit_lens/mean_settling_depth"]
FILES = ["prompt_0.npz", "prompt_1.npz", "layer_x_step.npz"]


def _loop_run(log_dir, lens, validate_after=()):
    from lightning_heatmaps.loop import Monitor

    torch.manual_seed(0)
    model = tiny_llama(2)  # as TokenModel(tiny_llama(2)) below: the same initial weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = Monitor(model, [lens], log_dir=log_dir)
    for step, batch in zip(range(STEPS), token_loader()):
        with monitor.step():
            monitor.backward(model(input_ids=batch, labels=batch).loss)
            monitor.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
        if step + 1 in validate_after:
            monitor.validation_end()
    monitor.close()
    assert model.training  # the evaluations restored train mode
    return model


def test_logit_lens_monitor_in_a_plain_loop_equals_the_lightning_callback(tmp_path):
    from lightning_heatmaps import LogitLensHeatmap
    from lightning_heatmaps.core import LogitLensMonitor

    torch.manual_seed(0)
    trainer = make_trainer(tmp_path / "lightning", [LogitLensHeatmap(PROMPTS, every_n_steps=EVERY)], max_steps=STEPS)
    trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    loop_dir = str(tmp_path / "loop")
    lens = LogitLensMonitor(PROMPTS, every_n_steps=EVERY)
    _loop_run(loop_dir, lens)

    assert lens.evaluations == 3
    expected, got = read_events(trainer.logger.log_dir), read_events(loop_dir)
    for tag in TAGS:
        want, have = scalar_series(expected, tag), scalar_series(got, tag)
        assert sorted(want) == sorted(have) == [0, 2, 4], tag  # the start, then after steps 2 and 4
        np.testing.assert_allclose([have[s] for s in sorted(have)], [want[s] for s in sorted(want)], rtol=1e-6, err_msg=tag)
    layer_0 = scalar_series(got, TAGS[0])
    assert layer_0[0] != layer_0[4]  # training moved the lens: the comparison is not of constants
    for name in FILES:
        want = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "logit_lens", name))
        have = np.load(os.path.join(loop_dir, "heatmaps", "logit_lens", name))
        last = have["steps"][-1] if "steps" in have else have["step"]
        assert int(last) == 4, name
        np.testing.assert_allclose(have["values"], want["values"], rtol=1e-6, err_msg=name)
    steps, history = lens.sample_history()
    assert steps.tolist() == [0, 2, 4] and history.shape == (3, 2, 1)
    np.testing.assert_allclose(history[:, 0, 0], [layer_0[s] for s in (0, 2, 4)], rtol=1e-6)


def test_plain_loop_validation_end_and_lens_only_schedule(tmp_path):
    from lightning_heatmaps.core import LogitLensMonitor
    from lightning_heatmaps.loop import Monitor

    lens = LogitLensMonitor(PROMPTS, every_n_steps=None, on_validation_end=True)
    _loop_run(str(tmp_path / "run"), lens, validate_after=(3,))
    assert lens.sample_history()[0].tolist() == [3] and lens.evaluations == 1
    with pytest.raises(ValueError, match=r"Invalid value for monitors=\[\]: must be one or more core monitors.*LogitLensMonitor"):
        Monitor(torch.nn.Linear(2, 2), [], log_dir=str(tmp_path / "none"))
