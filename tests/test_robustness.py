"""Bad values and interrupted runs: NaN/Inf recorded and marked, resumed runs continue their history."""

import math
import os
import warnings

import lightning as L
import numpy as np
import torch
from torch import nn

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap

from conftest import TokenModel, decode_png, magenta_pixels, make_trainer, read_events, scalar_series, tiny_llama, token_loader


class PoisonableLinear(nn.Linear):
    poison = False

    def forward(self, x):
        y = super().forward(x)
        if self.poison:
            y = y.clone()
            y[..., 0] = float("nan")
        return y


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = PoisonableLinear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.nan_to_num(self.up(x)).relu())  # NaN stays local to the monitored output


class Poisoned(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def on_train_batch_start(self, batch, batch_idx):
        self.blocks[1].up.poison = self.trainer.global_step == 2

    def training_step(self, batch, batch_idx):
        x = batch
        for block in self.blocks:
            x = block(x)
        return x.square().mean()

    def on_after_backward(self):
        if self.trainer.global_step == 4:
            self.blocks[0].down.weight.grad[0, 0] = float("inf")

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():  # the callbacks have read the gradients; keep training finite
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_nan_and_inf_are_recorded_marked_and_warned_once(tmp_path):
    callbacks = [ActivationHeatmap(every_n_steps=1), GradientHeatmap(every_n_steps=1)]
    trainer = make_trainer(tmp_path, callbacks, max_steps=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Poisoned(), torch.utils.data.DataLoader(torch.randn(64, 8), batch_size=4))
    assert trainer.global_step == 7  # training went on
    messages = [str(w.message) for w in caught if "NaN or infinite" in str(w.message)]
    assert len(messages) == 2
    assert any("activation_rms is NaN or infinite at step 2 (layer 1 up)" in m for m in messages)
    assert any("grad_norm is NaN or infinite at step 4 (layer 0 down)" in m for m in messages)

    events = read_events(trainer.logger.log_dir)
    up = scalar_series(events, "activation_rms/layer_1/up")
    assert math.isnan(up[2]) and all(math.isfinite(up[s]) for s in (0, 1, 3, 4, 5, 6))  # nothing lost around it
    assert math.isnan(scalar_series(events, "activation_rms/layer_1/all")[2])
    assert math.isinf(scalar_series(events, "grad_norm/layer_0/down")[4])
    image = events.Images("heatmaps/activation_rms/layer_x_step")[-1]
    assert magenta_pixels(decode_png(image.encoded_image_string)) > 50
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "grad_norm", "layer_x_step.npz"))
    assert np.isinf(saved["values"][0, 4]) and np.isfinite(saved["values"][1:]).all()


def test_resumed_run_continues_the_history(tmp_path):
    def trainer_for(steps, **kwargs):
        return make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=2)], max_steps=steps, enable_checkpointing=True,
                            logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", version=0), **kwargs)

    first = trainer_for(5)
    first.fit(TokenModel(tiny_llama(2)), token_loader(batches=16))
    checkpoint = first.checkpoint_callback.best_model_path or first.checkpoint_callback.last_model_path
    assert checkpoint
    second = trainer_for(10)
    second.fit(TokenModel(tiny_llama(2)), token_loader(batches=16), ckpt_path=checkpoint)
    saved = np.load(os.path.join(second.logger.log_dir, "heatmaps", "activation_rms", "layer_x_step.npz"))
    assert saved["steps"].tolist() == [0, 2, 4, 6, 8]  # before and after the resume, none twice, none missing
    assert np.isfinite(saved["values"]).all()


def test_a_resume_in_a_new_process_continues_the_history_of_a_callable_selection(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "resume_script.py")

    def fit(*arguments):
        done = subprocess.run([sys.executable, script, str(tmp_path), *arguments], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    checkpoint = fit("5")
    assert os.path.isfile(checkpoint)
    fit("10", checkpoint)
    saved = np.load(os.path.join(tmp_path, "run", "version_0", "heatmaps", "activation_rms", "layer_x_step.npz"))
    assert saved["steps"].tolist() == [0, 2, 4, 6, 8]  # the first process's samples came back with the checkpoint
    assert np.isfinite(saved["values"]).all()
