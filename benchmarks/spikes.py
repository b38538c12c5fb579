"""SpikeAlert on real training runs: false alarms, planted faults, peers side by side, and its cost.

    python benchmarks/spikes.py            # full (about 5 minutes on 2 cores)
    python benchmarks/spikes.py --quick    # smaller model, fewer steps: a smoke test (< 60 s), not a measurement

The examples' byte-level Llama (``examples/_common.py``) trains on the standard library's source with
``ActivationHeatmap`` (rms) and ``GradientHeatmap`` (grad_norm) sampling every ``--every`` steps and
``SpikeAlert`` with its default settings:

1. **Clean runs** (``--seeds``, each ``--clean-steps`` steps, its own initialisation and data order): alerts
   per 1000 steps (every alert is a false alarm).
2. **Planted faults**, each in its own run, at step ``--fault-step`` (odd, so not a sampled step):
   ``weight`` (one layer's ``mlp.up`` weight multiplied by ``--factor``), ``batch`` (the batch replaced by
   uniform random bytes), ``lr`` (the learning rate multiplied by 100 for that one step), ``nan`` (one weight
   of a layer's ``mlp.down`` set to NaN), and ``nan@sampled`` (the same at ``--fault-step + 1``, a sampled
   step). For each: detected (an alert within ``--horizon`` steps of the fault), step error (alert step minus
   fault step), and whether the planted layer is named first and among the top 3 (``weight`` and the NaNs).
3. **Peers, live in the same runs** (same seed, data and faults): Lightning's ``SpikeDetection`` (defaults;
   it raises ``TrainingSpikeException`` at a spike: the benchmark catches it, records the step and lets the
   run go on, so false alarms can be counted; in a real run the first one ends training) and an
   OLMo-core-style rule (``loss > mean + 6 * std`` of the previous 128 losses, read every step).
4. **Cost**: in one process, blocks of steps alternate between the heatmap callbacks alone and the same
   plus ``SpikeAlert``; the paired ratio of median step times (and the same without heatmap callbacks);
   and the time of SpikeAlert's hooks on a sampled step whose loss is NaN (the alert: records, text, warning)
   against an ordinary sampled step.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.spike import TrainingSpikeException
from lightning.pytorch.callbacks import Callback, SpikeDetection

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from _common import ByteLlama, ByteWindows, standard_library_bytes  # noqa: E402

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, SpikeAlert  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class TimedSpikeAlert(SpikeAlert):
    """SpikeAlert that adds up the wall time spent in its own hooks and sample listener (also per step)."""

    seconds = 0.0

    def _timed(name):  # noqa: N805
        def hook(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return getattr(SpikeAlert, name)(self, *args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds += spent
                if not hasattr(self, "per_step"):
                    self.per_step = {}
                self.per_step[self._batch_step] = self.per_step.get(self._batch_step, 0.0) + spent
        return hook

    on_train_batch_start = _timed("on_train_batch_start")
    on_before_backward = _timed("on_before_backward")
    on_before_optimizer_step = _timed("on_before_optimizer_step")
    on_train_batch_end = _timed("on_train_batch_end")
    _on_sample = _timed("_on_sample")


class Fault(Callback):
    """Plants one fault at ``step`` (see the module docstring); ``kind=None`` plants nothing."""

    def __init__(self, kind: str | None, step: int, layer: int, factor: float) -> None:
        self.kind, self.step, self.layer, self.factor = kind, step, layer, factor
        self._lr: list[float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step or self.kind is None:
            return
        block = pl_module.model.model.layers[self.layer]
        with torch.no_grad():
            if self.kind == "weight":
                block.mlp.up_proj.weight.mul_(self.factor)
            elif self.kind.startswith("nan"):
                block.mlp.down_proj.weight[0, 0] = math.nan
            elif self.kind == "batch":
                batch.copy_(torch.randint(0, 256, batch.shape, generator=torch.Generator().manual_seed(1)))
            elif self.kind == "lr":
                optimizer = trainer.optimizers[0]
                self._lr = [group["lr"] for group in optimizer.param_groups]
                for group in optimizer.param_groups:
                    group["lr"] *= 100.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._lr is not None:
            for group, lr in zip(trainer.optimizers[0].param_groups, self._lr):
                group["lr"] = lr
            self._lr = None


class LossRecorder(Callback):
    """Every step's loss on the host, for the fault table (a benchmark-only sync, not part of SpikeAlert)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class LiveSpikeDetection(SpikeDetection):
    """Lightning's ``SpikeDetection`` (defaults) in the run; its exception is caught and the step recorded."""

    def __init__(self, directory: str) -> None:
        super().__init__(exclude_batches_path=os.path.join(directory, "skip_batches.json"))
        self.flagged: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        except TrainingSpikeException:
            self.flagged.append(trainer.global_step - 1)  # the batch's step (the optimizer has stepped)


class OlmoSixSigma(Callback):
    """OLMo-core-style stability rule in the run: ``loss > mean + 6 std`` of the previous 128 (a sync per step)."""

    def __init__(self, window: int = 128, sigmas: float = 6.0) -> None:
        self.window, self.sigmas = window, sigmas
        self.recent: list[float] = []
        self.flagged: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = float(outputs["loss"])
        if len(self.recent) == self.window:
            previous = np.asarray(self.recent)
            if not loss <= previous.mean() + self.sigmas * previous.std():  # NaN counts
                self.flagged.append(trainer.global_step - 1)
        self.recent = (self.recent + [loss])[-self.window:]


class StepTimer(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def durations(self, skip: int) -> list[float]:
        return list(np.diff(self.starts[skip:]))


# --- runs ------------------------------------------------------------------------------------------


def train(args, callbacks: list[Callback], steps: int, seed: int = 0) -> None:
    L.seed_everything(seed, verbose=False)
    model = ByteLlama(args.hidden, args.layers, lr=args.lr)
    loader = torch.utils.data.DataLoader(ByteWindows(DATA, args.length, steps * args.batch, seed=seed), batch_size=args.batch)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=L.pytorch.loggers.TensorBoardLogger(tempfile.mkdtemp()),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, log_every_n_steps=args.every)
    trainer.fit(model, loader)


def heatmaps(args) -> list[Callback]:
    return [ActivationHeatmap(every_n_steps=args.every), GradientHeatmap(every_n_steps=args.every)]


def alert_settings(args) -> dict:
    return {} if not args.quick else {"warmup": 32, "window": 64}


def run_case(args, kind: str | None, steps: int, seed: int = 0) -> dict:
    alert, recorder = SpikeAlert(**alert_settings(args)), LossRecorder()
    lightning_rule, olmo_rule = LiveSpikeDetection(tempfile.mkdtemp()), OlmoSixSigma()
    fault_step = args.fault_step + (1 if kind == "nan@sampled" else 0)
    train(args, [*heatmaps(args), alert, recorder, lightning_rule, olmo_rule,
                 Fault(kind, fault_step, args.layer, args.factor)], steps, seed=seed)
    return {"alerts": alert.alerts, "losses": recorder.losses, "fault_step": fault_step,
            "lightning": lightning_rule.flagged, "olmo": olmo_rule.flagged}


def describe_detection(flagged: list[int], fault: int, horizon: int) -> tuple[str, str, int]:
    """(detected, step error, false alarms before the fault)"""
    after = [s for s in flagged if fault <= s <= fault + horizon]
    before = len([s for s in flagged if s < fault])
    return ("yes" if after else "no"), (f"{after[0] - fault:+d}" if after else "-"), before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clean-steps", type=int, default=700)
    parser.add_argument("--seeds", type=str, default="0,1,2")
    parser.add_argument("--fault-steps", type=int, default=420)
    parser.add_argument("--fault-step", type=int, default=361)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--cost-blocks", type=int, default=6)
    parser.add_argument("--cost-steps", type=int, default=60)
    args = parser.parse_args()
    args.hidden, args.layers, args.length, args.batch, args.lr = 64, 4, 64, 8, 3e-3
    if args.quick:
        args.hidden, args.layers, args.length = 32, 2, 32
        args.clean_steps, args.fault_steps, args.fault_step, args.cost_blocks, args.cost_steps = 120, 100, 81, 2, 20
        args.seeds = "0"
    torch.set_num_threads(1)
    global DATA
    DATA = standard_library_bytes(2_000_000)
    started = time.time()
    print(f"# SpikeAlert benchmark{' (--quick: a smoke test, figures mean nothing)' if args.quick else ''}\n")
    print(f"Byte-level Llama, hidden {args.hidden}, {args.layers} layers, {args.batch} x {args.length} bytes per batch, "
          f"AdamW lr {args.lr}; ActivationHeatmap(rms) + GradientHeatmap(grad_norm) every {args.every} steps; "
          f"SpikeAlert({', '.join(f'{k}={v}' for k, v in alert_settings(args).items()) or 'defaults'}).\n")

    seeds = [int(seed) for seed in args.seeds.split(",")]
    total = args.clean_steps * len(seeds)
    per_thousand = lambda n: 1000.0 * n / total  # noqa: E731
    flagged = {"SpikeAlert": [], "Lightning SpikeDetection (live)": [], "OLMo-style 6 sigma over 128 (live)": []}
    clean_alerts = []
    for seed in seeds:
        clean = run_case(args, None, args.clean_steps, seed=seed)
        flagged["SpikeAlert"] += [(seed, a["step"]) for a in clean["alerts"]]
        flagged["Lightning SpikeDetection (live)"] += [(seed, step) for step in clean["lightning"]]
        flagged["OLMo-style 6 sigma over 128 (live)"] += [(seed, step) for step in clean["olmo"]]
        clean_alerts += [(seed, alert) for alert in clean["alerts"]]
    print(f"## Clean runs: seeds {seeds}, {args.clean_steps} steps each ({total} steps): false alarms per 1000 steps\n")
    print("| rule | alerts | per 1000 steps | (seed, step) |\n|---|---|---|---|")
    for name, found in flagged.items():
        print(f"| {name} | {len(found)} | {per_thousand(len(found)):.2f} | {found[:8]} |")
    for seed, alert in clean_alerts:
        print(f"\n    clean-run alert (seed {seed}): step {alert['step']} {alert['signal']} {alert.get('series')} z={alert['z']}")

    print(f"\n## Planted faults at step {args.fault_step} ({args.fault_steps}-step runs; detected = an alert within "
          f"{args.horizon} steps; layer {args.layer} planted)\n")
    print("| fault | loss at fault / median of 20 before | SpikeAlert: detected | step error | signal | named first | in top 3 | "
          "first named | false alarms before | SpikeDetection: detected | step error | 6 sigma: detected | step error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in ["weight", "batch", "lr", "nan", "nan@sampled"]:
        case = run_case(args, kind, args.fault_steps)
        losses, fault_step = case["losses"], case["fault_step"]
        before = np.median(losses[fault_step - 20 : fault_step])
        ratio = losses[fault_step] / before
        steps = [a["step"] for a in case["alerts"]]
        detected, error, false_before = describe_detection(steps, fault_step, args.horizon)
        alert = next((a for a in case["alerts"] if fault_step <= a["step"] <= fault_step + args.horizon), None)
        named = [cell["layer"] for cell in alert["layers"]] if alert else []
        planted = kind in ("weight", "nan", "nan@sampled")
        first = ("yes" if named[:1] == [str(args.layer)] else "no") if planted and alert else "n/a"
        top3 = ("yes" if str(args.layer) in named[:3] else "no") if planted and alert else "n/a"
        first_named = (f"{alert['layers'][0]['layer']} {alert['layers'][0]['component']} ({alert['layers'][0]['metric']})"
                       if alert and alert["layers"] else "-")
        signal = alert["signal"] if alert is None or alert["series"] is None else alert["series"]["metric"]
        peers = []
        for peer in (case["lightning"], case["olmo"]):
            found, peer_error, _ = describe_detection(peer, fault_step, args.horizon)
            peers += [found, peer_error]
        print(f"| {kind} (step {fault_step}) | {ratio:.3f} | {detected} | {error} | {signal if alert else '-'} | {first} | {top3} | {first_named} | "
              f"{false_before} | {' | '.join(peers)} |")

    print("\n## Cost: time inside SpikeAlert's hooks (a check: the loss read, the rule on every series, outputs)\n")
    print("| set-up | steps | step time (ms, median) | SpikeAlert hooks per step (ms, mean) | share of the step |\n|---|---|---|---|---|")
    for label, base in [("heatmap callbacks every %d steps" % args.every, True), ("no heatmap callback", False)]:
        timer, alert = StepTimer(), TimedSpikeAlert(**alert_settings(args))
        steps = args.cost_steps * args.cost_blocks
        train(args, (heatmaps(args) if base else []) + [alert, timer], steps + 10)
        step_time = statistics.median(timer.durations(skip=10))
        print(f"| {label} | {steps} | {1000 * step_time:.2f} | {1000 * alert.seconds / (steps + 10):.3f} | "
              f"{alert.seconds / (steps + 10) / step_time:.2%} |")

    print("\n## Cost of a sampled step whose loss is NaN (SpikeAlert's hooks on that step: the alert's records, "
          "text summary, warning)\n")
    timed = TimedSpikeAlert(**alert_settings(args))
    nan_step = args.fault_step + 1
    train(args, [*heatmaps(args), timed, Fault("nan@sampled", nan_step, args.layer, args.factor)], nan_step + 3)
    ordinary = statistics.median(timed.per_step[step] for step in range(20, nan_step, args.every))
    print("| step | SpikeAlert hooks (ms) |\n|---|---|")
    print(f"| ordinary sampled steps before the NaN (median) | {1000 * ordinary:.3f} |")
    print(f"| the NaN step {nan_step} (alert) | {1000 * timed.per_step[nan_step]:.3f} |")
    print(f"| the next sampled step (NaN again, in cool-down) | {1000 * timed.per_step[nan_step + 2]:.3f} |")

    print(f"\n## Cost: {args.cost_blocks} alternating blocks of {args.cost_steps} steps per arm, one process\n")
    print("| arms | median step (ms) without | with SpikeAlert | ratio (paired, median of blocks) |\n|---|---|---|---|")
    for label, base in [("heatmap callbacks every %d steps" % args.every, True), ("no heatmap callback", False)]:
        ratios, without, with_alert = [], [], []
        for block in range(args.cost_blocks):
            times = {}
            for arm in ([False, True] if block % 2 == 0 else [True, False]):
                timer = StepTimer()
                callbacks = (heatmaps(args) if base else []) + ([SpikeAlert(**alert_settings(args))] if arm else []) + [timer]
                train(args, callbacks, args.cost_steps + 10, seed=block)
                times[arm] = statistics.median(timer.durations(skip=10))
            ratios.append(times[True] / times[False])
            without.append(times[False])
            with_alert.append(times[True])
        print(f"| {label} | {1000 * statistics.median(without):.2f} | {1000 * statistics.median(with_alert):.2f} | "
              f"{statistics.median(ratios):.3f} (blocks: {', '.join(f'{r:.3f}' for r in ratios)}) |")
    print(f"\nWall time: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
