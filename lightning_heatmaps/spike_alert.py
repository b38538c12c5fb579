"""``SpikeAlert``: says when a spike happened and where in the model it started.

A thin Lightning adapter around :class:`~lightning_heatmaps.spikes.SpikeMonitor`: it keeps the recent
training losses on the device, receives the heatmap callbacks' samples through their public listeners,
feeds both to the monitor at each check, and writes and acts on the alerts it returns.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_heatmaps.base import HeatmapCallback, Sample
from lightning_heatmaps.distributed import distributed_world, local_grad_sumsq, mean_over_ranks
from lightning_heatmaps.gradient import GradientHeatmap
from lightning_heatmaps.sinks import RunOutputs, open_run_outputs
from lightning_heatmaps.spikes import CONFIRM_SAMPLES, MAD_FLOOR, THRESHOLD, WARMUP, WINDOW, SpikeMonitor

ACTIONS = ("warn", "stop")


def _check_steps(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """The adapter's own arguments (the rule's are checked by :class:`SpikeMonitor`)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid value for {name}={value!r}: must be an integer >= {minimum}.")


class SpikeAlert(Callback):
    """Alerts on spikes of the training loss, the global gradient norm and every sampled layer series.

    Each signal is compared, on a log scale, with a robust baseline of its own previous values (median and
    MAD of the last ``window`` values that were not spikes; see :mod:`lightning_heatmaps.spikes` for the
    exact rule). Every series that :class:`~lightning_heatmaps.ActivationHeatmap`,
    :class:`~lightning_heatmaps.GradientHeatmap` (or any other heatmap callback in the Trainer) samples is
    watched: each layer x component cell of each metric has its own baseline. An alert names the step and
    signal, the first layer and component to leave its baseline, the top cells, and the lag between them.

    No host sync on ordinary steps: the loss of each batch is copied into a device tensor, and the losses are
    read at checks: every sampled step of the heatmap callbacks (every step during dense capture), or every
    ``check_every_n_steps``. A check reads the losses once (one sync); under DDP/FSDP2 it also joins one small
    all-reduce that averages them over ranks (a NaN on any rank is a NaN everywhere), so every rank takes the
    same decision at the same step; rank zero writes.

    Outputs: ``<log_dir>/heatmaps/alerts.jsonl`` (one JSON object per alert), ``spike_batches.json`` beside
    it, a markdown table as a TensorBoard text summary (``spike/alerts``), scalars ``spike/loss_z``,
    ``spike/grad_norm``, ``spike/grad_norm_z``, ``spike/max_layer_z`` and ``spike/alerts``, and a warning.

    Args:
        threshold: robust z above which a value is a spike (default 6).
        window: values in each baseline (default 128).
        warmup: values a baseline needs before its series can spike (default 64). NaN/Inf always alerts.
        lower_threshold: robust z at which a series counts as having left its baseline (attribution).
        mad_floor: the smallest MAD, in natural-log units (default :data:`~lightning_heatmaps.spikes.MAD_FLOOR`).
        cooldown_steps: after an alert, no new alert of the same kind (spike, or NaN/Inf) for this many steps.
        dense_capture_steps: after an alert, the heatmap callbacks sample every step for this many steps
            (0: never), then return to their ``every_n_steps``.
        check_every_n_steps: also check every this many steps (default: at the heatmap callbacks' samples
            only; without heatmap callbacks, every ``log_every_n_steps``).
        on_spike: ``"warn"`` (report and go on) or ``"stop"`` (also set ``trainer.should_stop``).
        top_k: layer cells named in an alert.
        attribution_samples: recent samples per series searched for the first departure.
        confirm_samples: the gradient norm and each layer series alert only when they spike on this many
            consecutive samples of their own (default 2); the loss alerts on one value; NaN/Inf at once.

    Example:
        >>> import lightning
        >>> from lightning_heatmaps import ActivationHeatmap, GradientHeatmap
        >>> trainer = lightning.Trainer(callbacks=[ActivationHeatmap(), GradientHeatmap(), SpikeAlert()])
    """

    def __init__(
        self,
        threshold: float = THRESHOLD,
        window: int = WINDOW,
        warmup: int = WARMUP,
        lower_threshold: float = 3.0,
        mad_floor: float = MAD_FLOOR,
        cooldown_steps: int = 100,
        dense_capture_steps: int = 32,
        check_every_n_steps: int | None = None,
        on_spike: str = "warn",
        top_k: int = 5,
        attribution_samples: int = 16,
        confirm_samples: int = CONFIRM_SAMPLES,
    ) -> None:
        # The rule's arguments are validated by the core (the same messages with or without Lightning).
        self._monitor_arguments = dict(
            threshold=threshold, window=window, warmup=warmup, mad_floor=mad_floor, lower_threshold=lower_threshold,
            cooldown_steps=cooldown_steps, top_k=top_k, attribution_samples=attribution_samples,
            confirm_samples=confirm_samples,
        )
        self.monitor = SpikeMonitor(**self._monitor_arguments)
        _check_steps("dense_capture_steps", dense_capture_steps, 0)
        _check_steps("check_every_n_steps", check_every_n_steps, 1, allow_none=True)
        if on_spike not in ACTIONS:
            raise ValueError(f"Invalid value for on_spike={on_spike!r}: must be one of {ACTIONS}.")
        self.confirm_samples = confirm_samples
        self.threshold, self.window, self.warmup = float(threshold), window, warmup
        self.lower_threshold, self.mad_floor = float(lower_threshold), float(mad_floor)
        self.cooldown_steps, self.dense_capture_steps = cooldown_steps, dense_capture_steps
        self.check_every_n_steps, self.on_spike, self.top_k = check_every_n_steps, on_spike, top_k
        self.attribution_samples = attribution_samples
        #: Every alert record of this fit, as written to alerts.jsonl (on every rank).
        self.alerts: list[dict[str, Any]] = []
        self._heatmaps: list[HeatmapCallback] = []
        self._samples: list[Sample] = []
        self._losses: torch.Tensor | None = None  # device buffer of the losses since the last check
        self._loss_steps: list[int] = []
        self._restored: list[tuple[int, float]] = []  # unchecked losses that came back with a checkpoint
        self._batches: deque[tuple[int, int, int]] = deque(maxlen=4096)  # (epoch, batch_idx, step), host ints
        self._batch_step = -1
        self._grad_sumsq: tuple[torch.Tensor, bool] | None = None
        self._own_grad_norm = False
        self._outputs: RunOutputs | None = None
        self._period = 1
        # (step, losses, their mean over ranks once the sample's collective returned it)
        self._carried: tuple[int, int, torch.Tensor | None] | None = None
        self._world = 1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, window=self.window, warmup=self.warmup,
                                        mad_floor=self.mad_floor, check_every_n_steps=self.check_every_n_steps)

    @override
    def state_dict(self) -> dict[str, Any]:
        # Losses not checked yet go with the checkpoint (a host read at checkpoint time): this rank's values.
        count = len(self._loss_steps)
        pending = self._restored + list(zip(self._loss_steps, self._losses[:count].tolist() if count else []))
        return {"monitor": self.monitor.state_dict(), "pending_losses": [[int(s), float(v)] for s, v in pending],
                "batches": [list(batch) for batch in self._batches]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict["monitor"])
        self._restored = [(int(step), float(value)) for step, value in state_dict.get("pending_losses", [])]
        self._batches.extend(tuple(int(v) for v in batch) for batch in state_dict.get("batches", []))

    # --- setup ----------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        callbacks = trainer.callbacks
        self._heatmaps = [callback for callback in callbacks if isinstance(callback, HeatmapCallback)]
        for callback in self._heatmaps:
            callback.add_sample_listener(self._on_sample)
            callback.add_collective_contributor(self)  # the check's values ride in the sample's collective
        if self._heatmaps:
            # Run after the heatmap callbacks in each hook, so a step's samples have arrived when it is checked.
            last = max(callbacks.index(callback) for callback in self._heatmaps)
            if callbacks.index(self) < last:
                callbacks.remove(self)
                callbacks.insert(last, self)
        self._own_grad_norm = not any(
            isinstance(callback, GradientHeatmap) and any(m.endswith("grad_norm") for m in callback.metric_names)
            for callback in self._heatmaps
        )
        self._period = self.check_every_n_steps or (None if self._heatmaps else trainer.log_every_n_steps) or 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outputs = open_run_outputs(trainer, type(self).__name__)
        self._losses, self._loss_steps, self._samples = None, [], []
        if self._outputs.active:
            self._outputs.add_chart_layout({"spike": {"z": [r"^spike/.*_z$"], "alerts": [r"^spike/alerts$"]}})
        watched = ", ".join(f"{type(c).__name__} ({', '.join(c.metric_names)})" for c in self._heatmaps) or "no heatmap callback"
        rank_zero_info(f"SpikeAlert watches the loss, the gradient norm and {watched}.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for callback in self._heatmaps:
            callback.remove_sample_listener(self._on_sample)
            callback.remove_collective_contributor(self)
        if self._outputs is not None:
            self._outputs.close()
            self._outputs = None

    # --- events ---------------------------------------------------------------------------------------

    def _on_sample(self, sample: Sample) -> None:
        self._samples.append(sample)

    def _is_check_step(self, step: int) -> bool:
        if self._period and step % self._period == 0:
            return True
        return any(callback.samples_step(step) for callback in self._heatmaps)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_step = trainer.global_step
        self._batches.append((trainer.current_epoch, batch_idx, trainer.global_step))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Without a GradientHeatmap that reads grad_norm, the global gradient norm is computed here, on checked
        # steps only (device ops; read at the check, with the losses).
        if self._own_grad_norm and self._grad_sumsq is None and self._is_check_step(trainer.global_step):
            sumsq, sharded = local_grad_sumsq(list(pl_module.parameters()))
            if sumsq is not None:
                self._grad_sumsq = (sumsq, sharded)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Automatic optimization: the loss is recorded here, before the heatmap callbacks' sample (and its
        # collective) in on_train_batch_end, so the step's own loss can ride in that collective.
        if pl_module.automatic_optimization and loss.numel() == 1:
            self._record_loss(loss.detach().reshape(()))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs if isinstance(outputs, torch.Tensor) else outputs.get("loss") if isinstance(outputs, Mapping) else None
        if not pl_module.automatic_optimization and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._record_loss(loss.detach().reshape(()))
        step = self._batch_step
        if trainer.global_step == step:  # gradient accumulation: the optimizer step has not happened yet
            return
        full = self._losses is not None and len(self._loss_steps) >= 4096
        if self._is_check_step(step) or full:
            self._check(trainer, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # What arrived since the last check (the last steps, the heatmaps' final sample) is checked too.
        if self._loss_steps or self._samples or self._restored:
            self._check(trainer, self._batch_step)
        if self._outputs is not None:
            self._outputs.flush()

    def _record_loss(self, loss: torch.Tensor) -> None:
        count = len(self._loss_steps)
        if self._losses is None or count == len(self._losses):
            grown = torch.full((max(64, 2 * count),), math.nan, dtype=torch.float32, device=loss.device)
            if self._losses is not None:
                grown[:count] = self._losses[:count]
            self._losses = grown
        self._losses[count].copy_(loss)  # on the device: no sync
        self._loss_steps.append(self._batch_step)

    # --- the check ------------------------------------------------------------------------------------

    def _check_values(self) -> torch.Tensor:
        """This rank's losses since the last check, then (if computed here) the gradient's sum of squares."""
        count = len(self._loss_steps)
        parts = [self._losses[:count].float()] if self._losses is not None and count else []
        if self._grad_sumsq is not None:
            sumsq, sharded = self._grad_sumsq
            # Sharded gradients add up over ranks, replicated ones are equal: scaled so the mean gives either.
            world = distributed_world()
            parts.append((sumsq * world if sharded else sumsq).float().reshape(1).to(parts[0].device if parts else sumsq.device))
        return torch.cat(parts) if parts else torch.zeros(0)

    def collective_values(self, step: int) -> torch.Tensor | None:
        """A heatmap callback's sample at ``step`` runs a collective: the check's values ride along (public
        :class:`~lightning_heatmaps.base.CollectiveContributor` protocol). Once per step, on checked steps."""
        if step != self._batch_step or (self._carried is not None and self._carried[0] == step):
            return None
        if not self._is_check_step(step):
            return None
        self._carried = (step, len(self._loss_steps), None)
        return self._check_values()

    def collective_result(self, step: int, summed: torch.Tensor) -> None:
        self._carried = (step, self._carried[1], summed / distributed_world())

    def _check(self, trainer: pl.Trainer, step: int) -> None:
        count = len(self._loss_steps)
        grad = self._grad_sumsq
        carried, self._carried = self._carried, None
        if carried is not None and carried[0] == step and carried[1] == count and carried[2] is not None:
            combined = carried[2]  # the mean over ranks, from the heatmap sample's collective: none of our own
        else:
            combined = self._check_values()
            if distributed_world() > 1:
                combined = mean_over_ranks(combined)  # alone: the check's one collective; every rank joins
        self._grad_sumsq = None
        values = combined.tolist()  # the check's one host read
        losses, steps = values[:count], self._loss_steps
        self._loss_steps = []
        if self._restored:
            steps, losses = [s for s, _ in self._restored] + steps, [v for _, v in self._restored] + losses
            self._restored = []
        scalars: dict[str, tuple[float, int]] = {}
        for loss_step, z in zip(steps, self.monitor.observe_losses(steps, losses)):
            if math.isfinite(z):
                self._log_scalars({"spike/loss_z": z}, loss_step)
        if grad is not None:
            norm = math.sqrt(values[-1]) if values[-1] >= 0 else math.nan
            self._observe_grad_norm(step, norm)
        samples, self._samples = self._samples, []
        for sample in sorted(samples, key=lambda s: s.step):
            largest = self.monitor.observe_series(sample.step, sample.metrics, sample.missing, sample.nonfinite,
                                                  sample.layer_labels, sample.column_labels,
                                                  backward=sample.callback == GradientHeatmap.__name__)
            if math.isfinite(largest):
                scalars["spike/max_layer_z"] = (largest, sample.step)
            if self._own_grad_norm:
                continue
            for metric, table in sample.metrics.items():
                if sample.callback == GradientHeatmap.__name__ and metric.endswith("grad_norm"):
                    pooled = table[:, -1]
                    self._observe_grad_norm(sample.step, float(np.sqrt(np.square(pooled[~np.isnan(pooled)]).sum()))
                                            if not np.isnan(pooled).all() else math.nan)
                    break
        for name, (value, at) in scalars.items():
            self._log_scalars({name: value}, at)
        record = self.monitor.check(step)
        if record is not None:
            self._alert(trainer, record)

    def _observe_grad_norm(self, step: int, norm: float) -> None:
        z = self.monitor.observe_grad_norm(step, norm)
        values = {"spike/grad_norm": norm, "spike/grad_norm_z": z}
        self._log_scalars({k: v for k, v in values.items() if math.isfinite(v)}, step)

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        if self._outputs is not None and values:
            self._outputs.log_scalars(values, step)

    # --- alerts ---------------------------------------------------------------------------------------

    def _alert(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        first = min([record["step"], *(cell["first_step"] for cell in record["layers"][:1])])
        record["batches"] = [{"epoch": e, "batch_idx": b, "step": s} for e, b, s in self._batches
                             if first <= s <= record["checked_at"]]
        record["action"] = self.on_spike
        self.alerts.append(record)
        for callback in self._heatmaps:  # every rank takes the same decision: the collectives stay in step
            if self.dense_capture_steps:
                callback.sample_every_step(self.dense_capture_steps)
        if self.on_spike == "stop":
            trainer.should_stop = True
        outputs = self._outputs
        if outputs is not None and outputs.active:
            os.makedirs(outputs.directory, exist_ok=True)
            with open(os.path.join(outputs.directory, "alerts.jsonl"), "a") as file:
                file.write(json.dumps(record) + "\n")
            batches = [batch for alert in self.alerts for batch in alert["batches"]]
            with open(os.path.join(outputs.directory, "spike_batches.json"), "w") as file:
                json.dump({"batches": batches}, file, indent=1)
            outputs.log_scalars({"spike/alerts": float(self.monitor.alerts)}, record["step"])
            outputs.log_text("spike/alerts", alert_markdown(record), record["step"])
            outputs.log_alert(record, record["step"])  # the dashboard's alert markers
        rank_zero_warn(alert_message(record, self.dense_capture_steps))


def _number(value: float | None, digits: int = 4) -> str:
    return "NaN/Inf" if value is None else f"{value:.{digits}g}"


def alert_message(record: Mapping[str, Any], dense_capture_steps: int = 0) -> str:
    """The console line of an alert record: what spiked, when, where it started, and what happens now.

    Example:
        >>> alert_message({"step": 7, "signal": "loss", "value": 9.0, "baseline": 2.0, "z": 41.1, "nonfinite": False,
        ...                "series": None, "layers": [], "lag_steps": None, "action": "warn"})
        'SpikeAlert: loss spiked at step 7: 9 against a baseline of 2 (robust z 41.1). No layer series left its baseline. Training goes on.'
    """
    what = record["signal"] if record.get("series") is None else (
        f"{record['series']['metric']} of layer {record['series']['layer']} {record['series']['component']}")
    if record["nonfinite"]:
        text = f"SpikeAlert: {what} is NaN or infinite at step {record['step']}."
    else:
        text = (f"SpikeAlert: {what} spiked at step {record['step']}: {_number(record['value'])} against a baseline of "
                f"{_number(record['baseline'])} (robust z {record['z']:.1f}).")
    layers = record["layers"]
    if layers:
        first = layers[0]
        lag = record["lag_steps"]
        when = "" if lag is None else (f", {lag} steps before" if lag > 0 else f", {-lag} steps after" if lag < 0 else ", at the same step")
        text += (f" First to leave its baseline: layer {first['layer']} {first['component']} ({first['metric']}, "
                 f"z {_number(first['z'], 3)}) at step {first['first_step']}{when}.")
        if len(layers) > 1:
            text += " Then: " + "; ".join(f"layer {c['layer']} {c['component']} ({c['metric']}, z {_number(c['z'], 3)})" for c in layers[1:]) + "."
    else:
        text += " No layer series left its baseline."
    if dense_capture_steps:
        text += f" Heatmaps sample every step for the next {dense_capture_steps} steps."
    text += " Stopping the run (on_spike='stop')." if record.get("action") == "stop" else " Training goes on."
    return text


def alert_markdown(record: Mapping[str, Any]) -> str:
    """The TensorBoard text summary of an alert: a line on the signal and a markdown table of the named layers.

    Example:
        >>> print(alert_markdown({"step": 7, "signal": "loss", "value": 9.0, "baseline": 2.0, "z": 41.1,
        ...                       "nonfinite": False, "series": None, "layers": [], "lag_steps": None}))
        **loss** at step 7: value 9, baseline 2, robust z 41.1
        <BLANKLINE>
        | rank | layer | component | metric | z | first step |
        |---|---|---|---|---|---|
    """
    z = "NaN/Inf" if record["z"] is None else f"{record['z']:.1f}"
    signal = record["signal"] if record.get("series") is None else (
        f"{record['series']['metric']} layer {record['series']['layer']} {record['series']['component']}")
    lines = [f"**{signal}** at step {record['step']}: value {_number(record['value'])}, "
             f"baseline {_number(record['baseline'])}, robust z {z}", "",
             "| rank | layer | component | metric | z | first step |", "|---|---|---|---|---|---|"]
    for rank, cell in enumerate(record["layers"], start=1):
        lines.append(f"| {rank} | {cell['layer']} | {cell['component']} | {cell['metric']} | {_number(cell['z'], 3)} | {cell['first_step']} |")
    return "\n".join(lines)
