"""Both callbacks configured from a LightningCLI YAML file, trained, and read back."""

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from conftest import read_events, scalar_series

pytest.importorskip("jsonargparse")


class Stack(L.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(3))

    def training_step(self, batch, batch_idx):
        x = batch
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x.square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(32, 8), batch_size=4)


def test_yaml_configures_both_callbacks(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path}
  max_steps: 4
  enable_progress_bar: false
  enable_checkpointing: false
  callbacks:
    - class_path: lightning_heatmaps.ActivationHeatmap
      init_args:
        every_n_steps: 2
        metrics: [rms, max_abs]
        modules: {{'blocks\\.(?P<layer>\\d+)$': 'linear'}}
        first_layer_index: 1
        color_limits: [0.0, 2.0]
    - class_path: lightning_heatmaps.GradientHeatmap
      init_args:
        every_n_steps: 1
        metrics: grad_norm
"""
    )
    cli = LightningCLI(Stack, args=["fit", "--config", str(config)])
    events = read_events(cli.trainer.logger.log_dir)
    assert sorted(scalar_series(events, "activation_max_abs/layer_3/linear")) == [0, 2]
    assert sorted(scalar_series(events, "grad_norm/layer_2/linear")) == [0, 1, 2, 3]
