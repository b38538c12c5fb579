"""Cost of a sampled step on 2 CPU ranks (gloo), under DDP and FSDP2, measured in-process.

    python benchmarks/distributed.py            # the workload of RESULTS.md (a few minutes on 2 cores)
    python benchmarks/distributed.py --quick    # tiny model, few steps: a smoke test, not a measurement

Method (the in-process A/B of ``overhead.py``): ``ActivationHeatmap`` + ``GradientHeatmap`` sample every
other step; rank zero times each step from one batch start to the next (all hooks included, the
sample's collectives too); the marginal cost of a sampled step is the median of
``t(sampled) - mean(t(unsampled neighbours))``, and its ratio is taken against the unsampled step time
of the same run. Each rank runs with one thread (2 ranks on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap

warnings.filterwarnings("ignore")


class Workload(L.LightningModule):
    def __init__(self, args: argparse.Namespace, shard: bool) -> None:
        super().__init__()
        self.args, self.shard, self.model = args, shard, None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=self.args.hidden, intermediate_size=self.args.intermediate,
                                          num_hidden_layers=self.args.layers, num_attention_heads=self.args.heads,
                                          num_key_value_heads=self.args.heads, vocab_size=self.args.vocab,
                                          max_position_embeddings=512)
        self.model = transformers.LlamaForCausalLM(config)
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.model.layers:
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.wall: dict[int, float] = {}
        self._last: tuple[int, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.wall[self._last[0]] = now - self._last[1]
        self._last = (trainer.global_step, now)


def measure(args: argparse.Namespace, strategy_name: str) -> None:
    torch.set_num_threads(1)
    timeout = timedelta(seconds=120)
    if strategy_name == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo",
                                         timeout=timeout)
    else:
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timeout)
    timer = StepTimer()
    steps = args.warmup + args.steps + 1
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=L.pytorch.loggers.TensorBoardLogger(tempfile.mkdtemp()),
        callbacks=[timer, ActivationHeatmap(every_n_steps=2), GradientHeatmap(every_n_steps=2)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=50,
    )
    data = torch.randint(0, args.vocab, ((steps + 2) * args.batch * 2, args.length), generator=torch.Generator().manual_seed(0))
    trainer.fit(Workload(args, shard=strategy_name == "fsdp2"), torch.utils.data.DataLoader(data, batch_size=args.batch))
    if trainer.global_rank != 0:
        return
    wall = {s: t for s, t in timer.wall.items() if s >= args.warmup}
    diffs = [wall[s] - (wall[s - 1] + wall[s + 1]) / 2 for s in wall if s % 2 == 0 and s - 1 in wall and s + 1 in wall]
    unsampled = statistics.median(t for s, t in wall.items() if s % 2)
    marginal = statistics.median(diffs)
    quartiles = statistics.quantiles(diffs, n=4)
    print(f"| {strategy_name} | {1e3 * unsampled:.1f} | {1e3 * marginal:.2f} | {1e3 * quartiles[0]:.1f} … {1e3 * quartiles[2]:.1f} | "
          f"{1 + marginal / unsampled:.3f} | {1 + marginal / unsampled / 50:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default=None, help="one strategy (default: both, one after the other)")
    args = parser.parse_args()
    sizes = dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=256, batch=2, length=32, warmup=2, steps=6) if args.quick else \
        dict(hidden=256, intermediate=688, layers=8, heads=8, vocab=2048, batch=4, length=128, warmup=5, steps=80)
    for key, value in sizes.items():
        setattr(args, key, value)
    if args.strategy is None:
        # Each strategy in its own processes: the launcher re-runs this script for the other rank.
        import subprocess

        print(f"torch {torch.__version__}, lightning {L.__version__}, 2 ranks x 1 thread (gloo); Llama {args.layers}x{args.hidden} "
              f"(ffn {args.intermediate}, vocab {args.vocab}), per-rank batch {args.batch}x{args.length}, AdamW, "
              f"{args.steps} timed steps, sampling every other step\n")
        print("| strategy | unsampled step (ms) | marginal wall of a sampled step, median (ms) | paired differences, quartiles (ms) | "
              "ratio at every step | amortised at every_n_steps=50 |")
        print("|---|---|---|---|---|---|", flush=True)
        for name in ("ddp", "fsdp2"):
            command = [sys.executable, os.path.abspath(__file__), "--strategy", name] + (["--quick"] if args.quick else [])
            subprocess.run(command, check=True, timeout=1200)
        return
    measure(args, args.strategy)


if __name__ == "__main__":
    main()
