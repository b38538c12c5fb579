"""Where results go: tag names, the custom-scalars layout, other loggers, no logger, disk files."""

import csv
import glob
import os

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap

from conftest import TokenModel, decode_png, make_trainer, read_events, tiny_llama, token_loader

import lightning as L


class DeepMLP(L.LightningModule):
    """Twelve repeated blocks with two Linear layers each (generic block fallback)."""

    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(depth))

    def training_step(self, batch, batch_idx):
        x = batch
        for block in self.blocks:
            x = x + block(x)
        return x.square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _vectors():
    return torch.utils.data.DataLoader(torch.randn(32, 8), batch_size=4)


def test_tags_are_zero_padded_and_layout_groups_components(tmp_path):
    trainer = make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=1), GradientHeatmap(every_n_steps=1, first_layer_index=1)],
                           max_steps=2)
    trainer.fit(DeepMLP(), _vectors())
    events = read_events(trainer.logger.log_dir)
    scalars = set(events.Tags()["scalars"])
    assert {"activation_rms/layer_00/0", "activation_rms/layer_11/2", "activation_rms/layer_07/all"} <= scalars
    assert {"grad_norm/layer_01/0", "grad_norm/layer_12/all"} <= scalars and "grad_norm/layer_00/0" not in scalars
    assert len([t for t in scalars if t.startswith("activation_rms/")]) == 12 * 3  # 2 components + all, 12 layers

    # One custom-scalars layout holds both callbacks' charts (TensorBoard shows the last one written).
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    categories = {category.title: [chart.title for chart in category.chart] for category in layout.category}
    assert categories["heatmaps/activation_rms"] == ["0", "2", "all"]
    assert categories["heatmaps/grad_norm"] == ["0", "2", "all"]
    chart = layout.category[0].chart[0]
    assert chart.multiline.tag[0] == r"^activation_rms/layer_\d+/0$"


def test_other_logger_gets_scalars_and_pngs_go_to_disk(tmp_path):
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [GradientHeatmap(every_n_steps=2, min_render_interval_seconds=0, render_every_n_samples=1)],
                           max_steps=5, logger=logger)
    trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as file:
        rows = list(csv.DictReader(file))
    values = {int(row["step"]): float(row["grad_norm/layer_1/mlp.up"]) for row in rows if row.get("grad_norm/layer_1/mlp.up")}
    assert sorted(values) == [0, 2, 4] and all(v > 0 for v in values.values())
    pngs = sorted(glob.glob(os.path.join(logger.log_dir, "heatmaps", "grad_norm", "layer_x_step", "*.png")))
    assert [os.path.basename(p) for p in pngs][-1] == "step_000000004.png"
    image = decode_png(open(pngs[-1], "rb").read())
    assert image.shape[0] > 200 and image.shape[1] > 300
    saved = np.load(os.path.join(logger.log_dir, "heatmaps", "grad_norm", "layer_x_component.npz"))
    assert saved["values"][1, 4] == pytest.approx(values[4], rel=1e-6)  # mlp.up is column 4


def test_no_logger_warns_and_writes_to_disk(tmp_path):
    with pytest.warns(UserWarning, match=r"no logger \(logger=False\).*heatmaps go to disk"):
        trainer = make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=1)], max_steps=2, logger=False)
        trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    assert glob.glob(os.path.join(tmp_path, "heatmaps", "activation_rms", "layer_x_component", "step_*.png"))
    saved = np.load(os.path.join(tmp_path, "heatmaps", "activation_rms", "layer_x_step.npz"))
    assert saved["steps"].tolist() == [0, 1] and np.isfinite(saved["values"]).all()


def test_per_component_images_and_whole_run_history(tmp_path):
    callback = ActivationHeatmap(every_n_steps=1, capacity=4, history="whole_run", per_component_images=True)
    trainer = make_trainer(tmp_path, [callback], max_steps=12)
    trainer.fit(TokenModel(tiny_llama(2)), token_loader(batches=12))
    events = read_events(trainer.logger.log_dir)
    assert "heatmaps/activation_rms/layer_x_step/mlp.gate" in events.Tags()["images"]
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "activation_rms", "layer_x_step.npz"))
    assert saved["steps"].tolist() == [0, 4, 8]  # 12 samples thinned evenly into capacity 4
