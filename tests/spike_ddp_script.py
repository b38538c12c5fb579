"""Run by tests/test_spikes.py in a subprocess: 2-rank DDP (gloo) with SpikeAlert; rank 1's loss is NaN at step 5.

    python tests/spike_ddp_script.py OUT_DIR warn|stop|alone

``alone``: SpikeAlert without heatmap callbacks (it checks every ``log_every_n_steps``), ``on_spike="warn"``.

The NaN is added to the loss's value only (a detached term): the gradients stay finite, so only rank 1's
reported loss is bad. Each rank writes ``rank<r>.json`` with the alerts it took, its last step and the
collectives it issued at each step (``torch.distributed``'s Python collectives, counted by wrapping them in
this process: a measurement, the results are untouched; DDP's own gradient all-reduce is not among them).
"""

import json
import os
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TokenModel, VOCAB, tiny_llama  # noqa: E402

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, SpikeAlert  # noqa: E402

warnings.filterwarnings("ignore")
DATA = torch.randint(0, VOCAB, (96, 12), generator=torch.Generator().manual_seed(0))
COLLECTIVES: dict[int, list[str]] = {}  # step -> the collectives issued during its batch
STEP = [None]


def _counted(name):
    original = getattr(torch.distributed, name)

    def collective(*args, **kwargs):
        if STEP[0] is not None:
            COLLECTIVES.setdefault(STEP[0], []).append(name)
        return original(*args, **kwargs)
    return collective


for _name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier"):
    setattr(torch.distributed, _name, _counted(_name))


class NanOnRankOne(TokenModel):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(DATA[self.global_rank :: 2], batch_size=4, shuffle=False)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.trainer.global_step == 5:
            loss = loss + torch.tensor(float("nan"))  # the value only: no gradient flows through the constant
        return loss


class StepMarker(Callback):
    """First in the callbacks: collectives from this batch's start until the next one's count for this step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        STEP[0] = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        STEP[0] = None


class Report(Callback):
    def __init__(self, out_dir, alert):
        self.out_dir, self.alert = out_dir, alert

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as file:
            json.dump({"alerts": self.alert.alerts, "global_step": trainer.global_step,
                       "series": sorted(self.alert.monitor.groups), "collectives": COLLECTIVES}, file)


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    alert = SpikeAlert(on_spike="warn" if mode == "alone" else mode, dense_capture_steps=3)
    activation = ActivationHeatmap(every_n_steps=4)
    heatmaps = [] if mode == "alone" else [activation, GradientHeatmap(every_n_steps=4)]
    trainer = L.Trainer(
        default_root_dir=out_dir, max_steps=16, accelerator="cpu", devices=2, strategy="ddp_spawn",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=4,
        use_distributed_sampler=False,
        callbacks=[StepMarker(), alert, *heatmaps, Report(out_dir, alert)],
    )
    trainer.fit(NanOnRankOne(tiny_llama(2), lr=1e-3))


if __name__ == "__main__":
    main()
