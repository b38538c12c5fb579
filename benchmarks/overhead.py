"""Overhead of layer monitoring on a real training loop, against a no-monitoring baseline.

    python benchmarks/overhead.py            # full workload (about 10 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # small model, few steps: a smoke test, not a measurement

Three measurements, all in one process:

1. **Rounds**: every variant trains the same model (same seed) for ``--steps`` timed steps after
   warm-up; variants are interleaved A B C ... A B C ... for ``--rounds`` rounds; per variant the
   median step time over all rounds, its ratio to the baseline's, CPU seconds per step and peak RSS.
2. **In-process A/B**: each monitor samples every other step; the marginal cost of a sampled step is
   the median of ``t(sampled) - mean(t(neighbouring unsampled))``. Separate runs differ by several
   percent on this machine; this paired difference has a noise of a fraction of a millisecond.
3. **Audit**: a ``TorchFunctionMode`` counts blocking host reads (``item``, ``tolist``, ``bool``,
   ``float``, ``int``) and host conversions (``numpy``, ``cpu``, ``to('cpu')``) per step, for sampled
   and unsampled steps, minus what the baseline itself does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch.overrides import TorchFunctionMode

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap
from lightning_heatmaps._worker import BackgroundWriter
from lightning_heatmaps.render import metric_images
from lightning_heatmaps.sinks import RunOutputs, TensorBoardSink

warnings.filterwarnings("ignore")
BLOCKING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}
CONVERSIONS = {"numpy", "cpu"}


# --- workload -----------------------------------------------------------------------------------


class Workload(L.LightningModule):
    def __init__(self, hidden: int, intermediate: int, layers: int, heads: int, vocab: int) -> None:
        super().__init__()
        import transformers

        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                          max_position_embeddings=512)
        self.model = transformers.LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


# --- peers, implemented as their users write them -----------------------------------------------


class NaiveHooks(Callback):
    """Forward hooks that log ``output.norm().item()`` of every monitored Linear to TensorBoard."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps, self.active, self.handles = every_n_steps, False, []

    def on_train_start(self, trainer, pl_module):
        writer = trainer.logger.experiment
        for name, module in pl_module.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                def hook(module, args, output, name=name):
                    if self.active:
                        writer.add_scalar(f"naive/{name}", output.norm().item(), trainer.global_step)
                self.handles.append(module.register_forward_hook(hook))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = trainer.global_step % self.every_n_steps == 0

    def on_before_backward(self, trainer, pl_module, loss):
        self.active = False

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()


class LightningGradNorm(Callback):
    """Lightning's documented recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` before the step."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every_n_steps == 0:
            pl_module.log_dict(grad_norm(pl_module, norm_type=2))


def wandb_variant() -> Any:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return None

    class WandbWatch(Callback):
        def __init__(self, every_n_steps: int) -> None:
            self.every_n_steps = every_n_steps

        def on_train_start(self, trainer, pl_module):
            import wandb

            os.environ["WANDB_MODE"] = "offline"
            wandb.init(dir=tempfile.mkdtemp(), project="overhead")
            wandb.watch(pl_module, log="all", log_freq=self.every_n_steps)

        def on_train_end(self, trainer, pl_module):
            import wandb

            wandb.finish()

    return WandbWatch


def ours(every_n_steps: int) -> list[Callback]:
    return [ActivationHeatmap(every_n_steps=every_n_steps), GradientHeatmap(every_n_steps=every_n_steps)]


class WithoutDashboardMatrices(Callback):
    """For the duration of one fit, TensorBoard sinks take no matrices: ours as it was before the dashboard."""

    def setup(self, trainer, pl_module, stage):
        TensorBoardSink.takes_matrices = False

    def teardown(self, trainer, pl_module, stage):
        TensorBoardSink.takes_matrices = True


# --- measurement ------------------------------------------------------------------------------


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class StepTimer(Callback):
    """Wall and CPU time from one batch start to the next (all hooks of all callbacks included)."""

    def __init__(self) -> None:
        self.wall: list[tuple[int, float]] = []
        self.cpu: list[float] = []
        self.peak_rss = 0.0
        self._last: tuple[int, float, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now, cpu = time.perf_counter(), time.process_time()
        if self._last is not None:
            step, then, cpu_then = self._last
            self.wall.append((step, now - then))
            self.cpu.append(cpu - cpu_then)
        self._last = (trainer.global_step, now, cpu)
        self.peak_rss = max(self.peak_rss, rss_mb())


class ReadCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.step = -1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in BLOCKING:
            self.counts[(self.step, "blocking")] += 1
        elif name in CONVERSIONS or (name == "to" and any(str(a) == "cpu" for a in [*args[1:], *(kwargs or {}).values()])):
            self.counts[(self.step, "conversion")] += 1
        return func(*args, **(kwargs or {}))


class AuditStep(Callback):
    def __init__(self, counter: ReadCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.step = trainer.global_step


def run(make_callbacks, args, steps: int, audit: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Workload(args.hidden, args.intermediate, args.layers, args.heads, args.vocab)
    data = torch.randint(0, args.vocab, ((steps + args.warmup + 2) * args.batch, args.length), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch)
    timer = StepTimer()
    counter = ReadCounter() if audit else None
    callbacks = [timer, *make_callbacks()] + ([AuditStep(counter)] if audit else [])
    trainer = L.Trainer(max_steps=args.warmup + steps + 1, logger=TensorBoardLogger(tempfile.mkdtemp()), callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=50, accelerator="cpu", devices=1)
    if counter is not None:
        with counter:
            trainer.fit(model, loader)
    else:
        trainer.fit(model, loader)
    timed = [(s, t) for s, t in timer.wall if s >= args.warmup]
    heatmaps = [c for c in callbacks if hasattr(c, "background_cpu_seconds")]
    samples = sum(c.samples_recorded for c in heatmaps)
    return {"timed": timed, "cpu": timer.cpu[args.warmup:], "rss": timer.peak_rss, "first": timer.wall[0][1],
            "cpu_by_step": dict(zip([s for s, _ in timer.wall], timer.cpu)),
            "background_ms_per_sample": 1e3 * sum(c.background_cpu_seconds for c in heatmaps) / max(samples, 1) * len(heatmaps)
            if heatmaps else 0.0,
            "counts": counter.counts if counter is not None else None}


def paired_marginal(timed: list[tuple[int, float]]) -> float:
    """Median of t(sampled, even step) minus the mean of its unsampled (odd) neighbours."""
    by_step = dict(timed)
    diffs = [by_step[s] - (by_step[s - 1] + by_step[s + 1]) / 2 for s in by_step if s % 2 == 0 and s - 1 in by_step and s + 1 in by_step]
    return statistics.median(diffs)


class BlockToggle(Callback):
    """After warm-up, alternates blocks of ``block`` unsampled steps and ``block`` steps sampled at every step."""

    def __init__(self, monitors: list, warmup: int, block: int) -> None:
        self.monitors, self.warmup, self.block = monitors, warmup, block

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step - self.warmup
        sampling = step >= 0 and (step // self.block) % 2 == 1
        for monitor in self.monitors:
            monitor.every_n_steps = 1 if sampling else 10**9


def blocks(args, block: int = 20, pairs: int = 4) -> None:
    """Every-step sampling against no sampling in one run, block by block (renders at the default rate)."""
    monitors = ours(10**9)
    result = run(lambda: [*monitors, BlockToggle(monitors, args.warmup, block)], args, 2 * block * pairs)
    medians: dict[int, float] = {}
    for index in range(2 * pairs):
        times = [t for s, t in result["timed"] if (s - args.warmup) // block == index and (s - args.warmup) % block >= 2]
        medians[index] = statistics.median(times)
    print("| pair | unsampled block median (ms) | sampled-every-step block median (ms) | ratio |")
    print("|---|---|---|---|")
    for pair in range(pairs):
        off, on = medians[2 * pair], medians[2 * pair + 1]
        print(f"| {pair + 1} | {1e3 * off:.1f} | {1e3 * on:.1f} | {on / off:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and few steps (CI smoke test only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", default="rounds,ab,blocks,audit,images,dashboard",
                        help="comma-separated parts to run (default: all)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 256, 688, 8, 8, 2048
    args.batch, args.length, args.warmup = 8, 128, 5
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 64, 172, 2, 4, 256
        args.batch, args.length, args.rounds, args.steps, args.warmup = 2, 32, 1, 8, 2
    torch.set_num_threads(args.threads)

    variants: dict[str, Any] = {
        "baseline": lambda: [],
        "ours every_n_steps=1": lambda: ours(1),
        "ours every_n_steps=10": lambda: ours(10),
        "ours every_n_steps=50": lambda: ours(50),
        "naive hooks .norm().item()": lambda: [NaiveHooks(1)],
        "Lightning grad_norm log_dict": lambda: [LightningGradNorm(1)],
    }
    watch = wandb_variant()
    if watch is not None:
        variants['wandb.watch(log="all")'] = lambda: [watch(1)]
    ab_variants = {
        "ours": lambda: ours(2),
        "naive hooks .norm().item()": lambda: [NaiveHooks(2)],
        "Lightning grad_norm log_dict": lambda: [LightningGradNorm(2)],
    }
    if watch is not None:
        ab_variants['wandb.watch(log="all")'] = lambda: [watch(2)]

    print(f"torch {torch.__version__}, lightning {L.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, threads={args.threads}; Llama {args.layers}x{args.hidden} (ffn {args.intermediate}, "
          f"vocab {args.vocab}), batch {args.batch}x{args.length}, AdamW, {args.steps} timed steps x {args.rounds} rounds")

    # 1. Rounds, interleaved.
    if "rounds" in sections:
        rounds(variants, args)
    if "ab" in sections:
        paired(ab_variants, args)
    if "blocks" in sections:
        print("\n## In-process blocks (after warm-up: 20 steps unsampled, then 20 sampled at every step, ...)\n")
        blocks(args, block=4 if args.quick else 20, pairs=2 if args.quick else 4)
    if "audit" in sections:
        audit(variants, ab_variants, args)
    if "images" in sections:
        images(args)
    if "dashboard" in sections:
        # The dashboard's matrices (one tensor summary per metric and sample) against the same callbacks
        # without them, in one process; the variants alternate round by round.
        paired({"ours (with the dashboard's matrices)": lambda: ours(2),
                "ours without the matrices": lambda: [WithoutDashboardMatrices(), *ours(2)]}, args,
               title="Dashboard matrices: in-process A/B (sampled every other step; marginal cost of one sampled step)")


def rounds(variants, args) -> None:
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, make in variants.items():
            results[name].append(run(make, args, args.steps))
            print(f"  round {round_index + 1}: {name}: median {1e3 * statistics.median(t for _, t in results[name][-1]['timed']):.1f} ms",
                  file=sys.stderr)
    base = statistics.median(t for r in results["baseline"] for _, t in r["timed"])
    first_base = statistics.median(r["first"] for r in results["baseline"])
    print("\n## Rounds (median step time over all rounds)\n")
    print("| variant | median step (ms) | ratio vs baseline | CPU s / step | peak RSS (MB) | first step (ms), baseline's minus |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        median = statistics.median(t for r in runs for _, t in r["timed"])
        cpu = statistics.median(c for r in runs for c in r["cpu"])
        first = statistics.median(r["first"] for r in runs)
        print(f"| {name} | {1e3 * median:.1f} | {median / base:.3f} | {cpu:.3f} | {max(r['rss'] for r in runs):.0f} | "
              f"{1e3 * (first - first_base):+.0f} |")



def paired(ab_variants, args, title: str = "In-process A/B (sampled every other step; marginal cost of one sampled step)") -> None:
    print(f"\n## {title}\n")
    print("| monitor | unsampled step (ms) | marginal wall (ms) | marginal CPU, all threads (ms) | background thread CPU per sample (ms) | ratio at every step | amortised at every_n_steps=50 |")
    print("|---|---|---|---|---|---|---|")
    results: dict[str, list[dict]] = {name: [] for name in ab_variants}
    for _ in range(args.rounds):  # interleaved, so drift over the session hits every variant alike
        for name, make in ab_variants.items():
            results[name].append(run(make, args, args.steps))
    for name, runs in results.items():
        timed = [pair for r in runs for pair in r["timed"]]
        cpu_timed = [(s, c) for r in runs for s, c in r["cpu_by_step"].items() if s >= args.warmup]
        unsampled = statistics.median(t for s, t in timed if s % 2)
        marginal = paired_marginal(timed)
        background = statistics.median(r["background_ms_per_sample"] for r in runs)
        print(f"| {name} | {1e3 * unsampled:.1f} | {1e3 * marginal:.2f} | {1e3 * paired_marginal(cpu_timed):.2f} | "
              f"{background:.2f} | {1 + marginal / unsampled:.3f} | {1 + marginal / unsampled / 50:.4f} |")



def audit(variants, ab_variants, args) -> None:
    print("\n## Audit (per step, minus the baseline's own reads)\n")
    print("| variant | blocking reads, sampled step | conversions, sampled step | blocking reads, unsampled step | conversions, unsampled step |")
    print("|---|---|---|---|---|")
    audit_steps = 6
    baseline_counts = run(variants["baseline"], args, audit_steps, audit=True)["counts"]
    for name, make in {"ours": lambda: ours(2), **{k: v for k, v in ab_variants.items() if k != "ours"}}.items():
        counts = run(make, args, audit_steps, audit=True)["counts"]
        steps_ = range(args.warmup, args.warmup + audit_steps)
        def per(kind, parity):
            values = [counts[(s, kind)] - baseline_counts[(s, kind)] for s in steps_ if s % 2 == parity]
            return statistics.median(values)
        print(f"| {name} | {per('blocking', 0):g} | {per('conversion', 0):g} | {per('blocking', 1):g} | {per('conversion', 1):g} |")



def images(args) -> None:
    callback = ActivationHeatmap(every_n_steps=1, min_render_interval_seconds=0)
    run(lambda: [callback], args, 4)
    submit = []
    for _ in range(20):
        callback._outputs = RunOutputs(tempfile.mkdtemp(), [], BackgroundWriter("bench"))
        started = time.perf_counter()
        callback._submit_render(force=True)
        submit.append(time.perf_counter() - started)
        callback._outputs.close()
    steps_, history = callback._buffers["activation_rms"].ordered()
    history = np.repeat(history, 256 // len(history) + 1, axis=0)[:256]
    steps_ = np.arange(256) * 50
    layer_map = callback.layer_map
    draw = []
    for _ in range(5):
        started = time.perf_counter()
        metric_images("activation_rms", steps_, history, layer_labels=layer_map.layer_labels,
                      component_names=layer_map.component_names, missing=callback._missing)
        draw.append((time.perf_counter() - started) / 2)
    print("\n## Images\n")
    print(f"training-thread time per render request (snapshot + submit): median {1e3 * statistics.median(submit):.2f} ms; "
          f"drawing one image off-thread ({len(layer_map.layer_labels)} layers x 256 samples): median {1e3 * statistics.median(draw):.0f} ms")


if __name__ == "__main__":
    main()
