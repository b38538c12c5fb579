"""Run by tests/test_spikes.py in a subprocess: SpikeAlert on one process or under FSDP2 on 2 CPU ranks (gloo).

    python tests/spike_sharded_script.py OUT_DIR single|fsdp2

The llama of ``sharded_script.py`` (``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` and
``fully_shard`` on every block and the root in ``configure_model`` for ``fsdp2``), the same global batch of 8
rows in both modes, ``ActivationHeatmap`` and ``GradientHeatmap`` at every step and ``SpikeAlert``; layer 1's
``mlp.up`` weight (a sharded DTensor under FSDP2) is multiplied by 20 at step 14. Each rank writes
``<OUT_DIR>/<mode>/rank<r>.json`` with the alerts it took.
"""

import json
import os
import sys

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharded_script import blocks, fit  # noqa: E402

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, SpikeAlert  # noqa: E402

FAULT_STEP = 14


class PlantWeight(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == FAULT_STEP:
            with torch.no_grad():
                blocks(pl_module.model)[1].mlp.up_proj.weight.mul_(20.0)  # a DTensor: each rank scales its shard


class Report(Callback):
    def __init__(self, out_dir, alert):
        self.out_dir, self.alert = out_dir, alert

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as file:
            json.dump({"alerts": self.alert.alerts, "global_step": trainer.global_step}, file)


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    alert = SpikeAlert(warmup=6, window=12, dense_capture_steps=0)
    callbacks = [ActivationHeatmap(every_n_steps=1), GradientHeatmap(every_n_steps=1), alert, PlantWeight(),
                 Report(os.path.join(out_dir, mode), alert)]
    fit(os.path.join(out_dir, mode), "llama", 1 if mode == "single" else 2, callbacks, max_steps=20,
        enable_checkpointing=False)


if __name__ == "__main__":
    main()
