"""Run by tests/test_attention.py in a subprocess: AttentionHeatmap on one process, DDP or FSDP2 (2 CPU ranks, gloo).

    python tests/attention_script.py OUT_DIR MODE      # MODE: single, ddp or fsdp2

The same global batch of 8 rows in every mode (rank r of 2 takes rows r, r+2, ...), llama with GQA under sdpa.
"""

import os
import sys
import warnings
from datetime import timedelta

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharded_script import Sharded  # noqa: E402

from lightning_heatmaps import AttentionHeatmap  # noqa: E402

warnings.filterwarnings("ignore")


class Replicated(Sharded):
    def configure_model(self) -> None:  # DDP: the model as built, nothing sharded
        if self.model is None:
            from sharded_script import build

            self.model = build(self.architecture)


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    ranks = 1 if mode == "single" else 2
    timeout = timedelta(seconds=60)
    if mode == "ddp":
        strategy, module = DDPStrategy(process_group_backend="gloo", timeout=timeout), Replicated("llama", 2, True)
    elif mode == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo",
                                         timeout=timeout)
        module = Sharded("llama", 2, False)  # built and fully_shard-ed in configure_model
    else:
        strategy, module = "auto", Sharded("llama", 1, True)
    trainer = L.Trainer(
        default_root_dir=os.path.join(out_dir, mode), max_steps=3, accelerator="cpu", devices=ranks, strategy=strategy,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, use_distributed_sampler=False,
        enable_checkpointing=False, callbacks=[AttentionHeatmap(every_n_steps=1, min_render_interval_seconds=0)],
    )
    trainer.fit(module)


if __name__ == "__main__":
    main()
