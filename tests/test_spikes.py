"""SpikeAlert: the robust-z rule against numpy/scipy, and real runs read back from alerts.jsonl and the events."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import scipy.stats
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.util import tensor_util

from conftest import TokenModel, make_trainer, read_events, scalar_series, tiny_llama, token_loader
from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, RobustBaseline, Sample, SpikeAlert, SpikeMonitor
from lightning_heatmaps.spikes import first_departures, rank_departures
from lightning_heatmaps_tensorboard.metadata import ALERT_TAG, decode_alert

# --- the rule, against an independent computation -----------------------------------------------------


def reference_z(series, window, warmup, threshold, floor):
    """The README's rule, written plainly with scipy: z of each value, and whether it was a spike."""
    accepted, zs, spikes = [], [], []
    for value in series:
        x = math.log(max(abs(value), 1e-12)) if math.isfinite(value) else math.nan
        base = np.array(accepted[-window:])
        if len(base) and math.isfinite(x):
            mad = scipy.stats.median_abs_deviation(base)  # unscaled: median(|b - median(b)|)
            z = (x - np.median(base)) / (1.4826 * max(mad, floor))
        else:
            z = math.nan
        ready = len(base) >= warmup
        spike = ready and z > threshold
        zs.append(z)
        spikes.append(spike)
        if math.isfinite(x) and (not ready or not spike):
            accepted.append(x)
    return np.array(zs), np.array(spikes)


def test_rule_matches_scipy_on_series_with_spikes_trends_zeros_and_nans():
    rng = np.random.default_rng(0)
    steps = 400
    series = [
        np.exp(rng.normal(0, 0.1, steps)),  # noise
        np.exp(np.linspace(0, 2, steps) + rng.normal(0, 0.05, steps)),  # a trend
        np.full(steps, 3.0),  # constant: the MAD floor keeps z finite
        np.exp(rng.normal(0, 0.1, steps)) * 1e-3,
    ]
    series[0][[100, 101, 250]] *= [20, 30, 5]
    series[1][300] = math.nan
    series[2][200] = 3.6
    series[3][50] = 0.0  # log floor
    values = np.stack(series, axis=1)
    baseline = RobustBaseline(size=4, window=32, warmup=8, mad_floor=0.02)
    got = np.stack([baseline.update(row, threshold=6.0) for row in values])
    for column in range(4):
        expected, spikes = reference_z(values[:, column], 32, 8, 6.0, 0.02)
        np.testing.assert_allclose(got[:, column], expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    _, spikes = reference_z(values[:, 0], 32, 8, 6.0, 0.02)
    assert np.flatnonzero(spikes).tolist() == [100, 101, 250]  # spikes stay out of the baseline: 101 is one too
    assert np.isfinite(got[8:, 2]).all() and got[200, 2] > 6  # constant series, then a 20 % jump alerts (1.19 is the least)


def test_attribution_names_the_earliest_departure_above_the_threshold():
    steps = np.array([10, 11, 12, 13])
    z = np.array([[0.0, 0.0, 4.0], [3.5, 1.0, 4.0], [9.0, 7.0, 4.0], [2.0, 20.0, 4.0]])
    peak, first = first_departures(steps, z, lower=3.0)
    assert peak.tolist() == [9.0, 20.0, 4.0] and first.tolist() == [11, 12, 10]
    # 2 left its baseline first but never passed the threshold: it comes after those that did.
    assert rank_departures(peak, first, threshold=6.0, lower=3.0).tolist() == [0, 1, 2]


def test_monitor_reports_a_nan_loss_during_warmup_and_respects_the_cooldown():
    monitor = SpikeMonitor(warmup=50, cooldown_steps=5)
    monitor.observe_losses([0, 1, 2], [2.0, math.nan, 2.0])
    record = monitor.check(2)
    assert record["signal"] == "loss" and record["step"] == 1 and record["nonfinite"] and record["value"] is None
    monitor.observe_losses([3], [math.inf])
    assert monitor.check(3) is None  # same kind within the cool-down
    monitor.observe_losses([6], [math.nan])
    assert monitor.check(6)["step"] == 6


def test_a_sampled_signal_alerts_only_when_its_spike_lasts_confirm_samples_samples():
    """One transient sample of a layer series or of the gradient norm raises nothing; a lasting one does."""
    rng = np.random.default_rng(0)
    monitor = SpikeMonitor(warmup=8, window=16)  # confirm_samples=2 by default
    labels = dict(layer_labels=["0", "1"], column_labels=["mlp.up", "all"])
    none = np.zeros((2, 1), dtype=bool)
    values = np.exp(rng.normal(0.0, 0.05, (40, 2)))
    values[20, 0] *= 30.0  # one transient sample of layer 0
    values[30:, 1] *= 30.0  # layer 1 stays up from step 30
    grad = np.exp(rng.normal(0.0, 0.05, 40))
    grad[20] *= 30.0  # one transient gradient norm
    records = {}
    for step in range(40):
        table = np.concatenate([values[step][:, None], values[step][:, None]], axis=1)  # + the pooled column
        monitor.observe_series(step, {"activation_rms": table}, none, none, **labels)
        monitor.observe_grad_norm(step, grad[step])
        record = monitor.check(step)
        if record is not None:
            records[step] = record
    assert list(records) == [31]  # confirmed at the second sample, dated at the first
    record = records[31]
    assert (record["step"], record["signal"], record["series"]["layer"]) == (30, "series", "1")
    assert record["z"] == pytest.approx(float(dict(monitor.groups["activation_rms"].history)[30][1]))  # the first sample's
    assert [(cell["layer"], cell["first_step"]) for cell in record["layers"]][:1] == [("1", 30)]
    one = SpikeMonitor(warmup=8, window=16, confirm_samples=1)  # the rule without confirmation: both alert
    for step in range(21):
        one.observe_grad_norm(step, grad[step])
    assert one.check(20)["signal"] == "grad_norm"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": -1.0}, r"threshold=-1.0: must be a number > 0"),
        ({"warmup": 0}, r"warmup=0: must be an integer >= 1"),
        ({"mad_floor": float("inf")}, r"mad_floor=inf: must be a number > 0"),
        ({"attribution_samples": 0}, r"attribution_samples=0: must be an integer >= 1"),
        ({"confirm_samples": 0}, r"confirm_samples=0: must be an integer >= 1"),
        ({"confirm_samples": 2.0}, r"confirm_samples=2.0: must be an integer >= 1"),
    ],
)
def test_the_core_validates_its_own_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpikeMonitor(**kwargs)
    with pytest.raises(ValueError, match=message):  # the adapter passes them through: the same message
        SpikeAlert(**kwargs)


# --- real runs ---------------------------------------------------------------------------------------


class PlantFault(Callback):
    """At ``step``, before its forward: multiply a layer's weight, or make one weight NaN."""

    def __init__(self, step, kind="weight", layer=1, factor=20.0):
        self.step, self.kind, self.layer, self.factor = step, kind, layer, factor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            weight = pl_module.model.model.layers[self.layer].mlp.up_proj.weight
            with torch.no_grad():
                if self.kind == "weight":
                    weight.mul_(self.factor)
                else:
                    weight[0, 0] = math.nan


class LossRecorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def _alerts(trainer):
    path = os.path.join(trainer.logger.log_dir, "heatmaps", "alerts.jsonl")
    with open(path) as file:
        return [json.loads(line) for line in file]


SMALL = dict(warmup=16, window=32)


def test_planted_layer_fault_is_named_first_in_alerts_jsonl_events_and_scalars(tmp_path):
    alert, recorder = SpikeAlert(**SMALL, dense_capture_steps=0), LossRecorder()
    callbacks = [alert, ActivationHeatmap(every_n_steps=2), GradientHeatmap(every_n_steps=2), PlantFault(41), recorder]
    trainer = make_trainer(tmp_path, callbacks, max_steps=50)
    trainer.fit(TokenModel(tiny_llama(2), lr=1e-3), token_loader(batches=50))
    records = _alerts(trainer)
    assert len(records) == 1, records
    record = records[0]
    assert record["step"] in (41, 42) and record["checked_at"] == 42  # loss at 41, or the layer sample at 42
    first = record["layers"][0]
    # The planted layer first; its mlp.up and the mlp.down fed by it leave at the same sample (ranked by z).
    assert first["layer"] == "1" and first["first_step"] == 42 and first["z"] > 6, record["layers"]
    assert ("1", "mlp.up") in [(cell["layer"], cell["component"]) for cell in record["layers"][:3]]
    assert {"step", "signal", "value", "baseline", "z", "layers"} <= set(record)
    assert {"layer", "component", "metric", "z", "first_step"} <= set(first)
    assert record["batches"] and all(b["step"] <= 42 for b in record["batches"])
    events = read_events(trainer.logger.log_dir)
    text = events.Tensors("spike/alerts/text_summary")
    assert [event.step for event in text] == [record["step"]]
    markdown = text[0].tensor_proto.string_val[0].decode()
    assert f"| 1 | 1 | {first['component']} | {first['metric']} |" in markdown
    assert scalar_series(events, "spike/alerts") == {record["step"]: 1.0}
    (event,) = events.Tensors(ALERT_TAG)  # the dashboard's alert marker carries the same record
    assert event.step == record["step"]
    assert [decode_alert(e) for e in tensor_util.make_ndarray(event.tensor_proto).tolist()] == [(record, 1)]
    # spike/loss_z: the rule on the losses the run really had, computed independently.
    losses = [recorder.losses[step] for step in sorted(recorder.losses)]
    expected, _ = reference_z(losses, 32, 16, 6.0, 0.02)
    logged = scalar_series(events, "spike/loss_z")
    assert sorted(logged) == [s for s in range(50) if math.isfinite(expected[s])]
    for step, value in logged.items():
        assert value == pytest.approx(expected[step], rel=1e-5, abs=1e-5), step


def test_a_nan_loss_always_alerts_even_in_warmup_and_without_heatmap_callbacks(tmp_path):
    alert = SpikeAlert()  # warm-up 64: far longer than the run
    trainer = make_trainer(tmp_path, [alert, PlantFault(3, kind="nan")], max_steps=6, log_every_n_steps=2)
    trainer.fit(TokenModel(tiny_llama(2), lr=1e-3), token_loader(batches=8))
    (record,) = _alerts(trainer)
    assert (record["step"], record["signal"], record["nonfinite"], record["z"], record["checked_at"]) == (3, "loss", True, None, 4)


def test_a_planted_nan_is_located_at_the_first_non_finite_cell_in_forward_order(tmp_path):
    """A NaN weight in layer 1's mlp.up at a sampled step: every gradient and every later activation is NaN too,
    but the alert names layer 1 mlp.up (the first non-finite value computed) first."""
    alert = SpikeAlert(**SMALL)  # warm-up far longer than the fault's step: a NaN alerts anyway
    heatmaps = [GradientHeatmap(every_n_steps=2), ActivationHeatmap(every_n_steps=2)]  # gradients listed first
    seen = []

    class Probe(Callback):
        def setup(self, trainer, pl_module, stage):
            for callback in heatmaps:
                callback.add_sample_listener(seen.append)

    trainer = make_trainer(tmp_path, [*heatmaps, alert, Probe(), PlantFault(6, kind="nan")], max_steps=8)
    trainer.fit(TokenModel(tiny_llama(2), lr=1e-3), token_loader(batches=8))
    record = _alerts(trainer)[0]
    assert record["step"] == 6 and record["nonfinite"], record
    cells = [(cell["metric"], cell["layer"], cell["component"], cell["first_step"], cell["nonfinite"])
             for cell in record["layers"]]
    assert cells[0] == ("activation_rms", "1", "mlp.up", 6, True), cells
    # Independently: the activations that step are finite up to layer 1's mlp.gate, and every gradient is NaN.
    samples = {sample.callback: sample for sample in seen if sample.step == 6}
    activation, gradient = samples["ActivationHeatmap"], samples["GradientHeatmap"]
    up = activation.column_labels.index("mlp.up")
    assert not activation.nonfinite[0].any() and activation.nonfinite[1, up]
    assert gradient.nonfinite[~gradient.missing].all()


def test_dense_capture_samples_every_step_after_an_alert_then_returns_to_the_schedule(tmp_path):
    activation = ActivationHeatmap(every_n_steps=4)
    alert = SpikeAlert(warmup=8, window=16, dense_capture_steps=5)  # 12 samples before the fault
    trainer = make_trainer(tmp_path, [activation, alert, PlantFault(45)], max_steps=64)
    trainer.fit(TokenModel(tiny_llama(2), lr=1e-3), token_loader(batches=64))
    (record,) = _alerts(trainer)
    # The layer left its baseline at the sample of step 48; confirmed by the next sample (confirm_samples=2).
    assert (record["step"], record["checked_at"]) == (48, 52)
    saved = np.load(os.path.join(trainer.logger.log_dir, "heatmaps", "activation_rms", "layer_x_step.npz"))
    assert saved["steps"].tolist() == [*range(0, 53, 4), 53, 54, 55, 56, 57, 60]
    assert activation.sample_history("activation_rms")[0].tolist() == saved["steps"].tolist()


def test_stop_ends_the_run_after_the_spiking_step_and_lightning_saves_a_checkpoint(tmp_path):
    alert = SpikeAlert(**SMALL, on_spike="stop")
    trainer = make_trainer(tmp_path, [ActivationHeatmap(every_n_steps=2), alert, PlantFault(41)], max_steps=60,
                           enable_checkpointing=True)
    trainer.fit(TokenModel(tiny_llama(2), lr=1e-3), token_loader(batches=60))
    (record,) = _alerts(trainer)
    assert record["action"] == "stop" and trainer.global_step == record["checked_at"] + 1
    (checkpoint,) = glob.glob(os.path.join(trainer.logger.log_dir, "checkpoints", "*.ckpt"))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == trainer.global_step


def test_state_resumes_exactly(tmp_path):
    def fit(epochs, checkpoint=None, root="resumed"):
        alert = SpikeAlert(**SMALL)
        trainer = make_trainer(tmp_path / root, [ActivationHeatmap(every_n_steps=2), alert], max_steps=-1,
                               max_epochs=epochs, enable_checkpointing=True)
        L.seed_everything(0)
        trainer.fit(TokenModel(tiny_llama(2), lr=1e-3), token_loader(batches=12), ckpt_path=checkpoint)
        return trainer, alert

    first, _ = fit(2)
    (checkpoint,) = glob.glob(os.path.join(first.logger.log_dir, "checkpoints", "*.ckpt"))
    _, resumed = fit(4, checkpoint)
    _, straight = fit(4, root="straight")
    assert resumed.alerts == [alert for alert in straight.alerts if alert["checked_at"] >= 24]  # attribution too
    got, expected = resumed.monitor.state_dict(), straight.monitor.state_dict()
    assert int(got["loss"]["accepted"][0]) == int(expected["loss"]["accepted"][0]) >= 46  # the first run's came back
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(got[key]["values"], expected[key]["values"], equal_nan=True)
        torch.testing.assert_close(got[key]["accepted"], expected[key]["accepted"])
    assert list(got["groups"]) == ["activation_rms"]
    for key in ("history_steps", "history_z"):
        torch.testing.assert_close(got["groups"]["activation_rms"][key], expected["groups"]["activation_rms"][key])
    torch.testing.assert_close(got["groups"]["activation_rms"]["baseline"]["values"],
                               expected["groups"]["activation_rms"]["baseline"]["values"], equal_nan=True)
    assert got["cooldown_until"] == expected["cooldown_until"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0}, "threshold=0: must be a number > 0"),
        ({"threshold": float("nan")}, "threshold=nan"),
        ({"window": 1}, "window=1: must be an integer >= 2"),
        ({"warmup": 200}, "warmup=200: must be <= window=128"),
        ({"lower_threshold": 7.0}, "lower_threshold=7.0: must be <= threshold=6.0"),
        ({"mad_floor": 0}, "mad_floor=0: must be a number > 0"),
        ({"cooldown_steps": -1}, "cooldown_steps=-1: must be an integer >= 0"),
        ({"dense_capture_steps": 1.5}, "dense_capture_steps=1.5"),
        ({"check_every_n_steps": 0}, "check_every_n_steps=0"),
        ({"on_spike": "raise"}, r"on_spike='raise': must be one of \('warn', 'stop'\)"),
        ({"top_k": 0}, "top_k=0"),
    ],
)
def test_bad_arguments_are_refused_with_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpikeAlert(**kwargs)


def test_sample_listener_gets_the_tables_on_the_step_they_were_taken(tmp_path):
    activation = ActivationHeatmap(every_n_steps=3)
    seen = []

    class Probe(Callback):
        def setup(self, trainer, pl_module, stage):
            activation.add_sample_listener(lambda sample: seen.append((trainer.global_step, sample)))

    trainer = make_trainer(tmp_path, [activation, Probe()], max_steps=7)
    trainer.fit(TokenModel(tiny_llama(2)), token_loader())
    assert [(step, sample.step) for step, sample in seen] == [(1, 0), (4, 3), (7, 6)]  # delivered right after the step
    sample = seen[-1][1]
    assert isinstance(sample, Sample) and sample.callback == "ActivationHeatmap" and sample.column_axis == "component"
    steps, values = activation.sample_history("activation_rms")
    assert steps.tolist() == [0, 3, 6]
    np.testing.assert_array_equal(values[-1], sample.metrics["activation_rms"])
    with pytest.raises(ValueError, match="metric='grad_norm'"):
        activation.sample_history("grad_norm")
    with pytest.raises(ValueError, match="for_steps=0"):
        activation.sample_every_step(0)


# --- DDP ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["warn", "stop"])
def test_ddp_an_alert_on_one_ranks_nan_is_seen_by_all_ranks(tmp_path, mode):
    script = os.path.join(os.path.dirname(__file__), "spike_ddp_script.py")
    done = subprocess.run([sys.executable, script, str(tmp_path), mode], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # a rank out of step would hang in a collective: TimeoutExpired
    ranks = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # the same alerts, series watched and last step on both ranks
    (record,), last_step = ranks[0]["alerts"], ranks[0]["global_step"]
    assert ranks[1]["series"] == ["activation_rms", "grad_norm"]  # samples reach the listener on rank 1 too
    assert (record["step"], record["signal"], record["nonfinite"], record["checked_at"]) == (5, "loss", True, 8)
    written = glob.glob(str(tmp_path / "**" / "alerts.jsonl"), recursive=True)
    assert len(written) == 1 and [json.loads(line)["step"] for line in open(written[0])] == [5]
    assert len(glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)) == 1  # rank zero writes
    if mode == "stop":
        assert last_step == 9  # both ranks stopped after the checked step
        return
    assert last_step == 16
    (npz,) = glob.glob(str(tmp_path / "**" / "activation_rms" / "layer_x_step.npz"), recursive=True)
    assert np.load(npz)["steps"].tolist() == [0, 4, 8, 9, 10, 11, 12]  # dense capture on every rank, no hang
    # Collectives per step, counted in each rank's process (the broadcast on every step, sampled or not, is not
    # the sampling path's): a sampled step has the ActivationHeatmap sample's one all-gather, which also carries
    # SpikeAlert's losses (GradientHeatmap's DDP gradients are replicated: no collective); other steps none.
    assert _our_collectives(ranks) == {step: ["all_gather_into_tensor"] for step in (0, 4, 8, 9, 10, 11, 12)}


def _our_collectives(ranks):
    """Per step, the collectives of the sampling path and SpikeAlert (the same on both ranks)."""
    found = [{int(step): [name for name in names if name != "broadcast"] for step, names in rank["collectives"].items()}
             for rank in ranks]
    assert found[0] == found[1]
    return {step: names for step, names in found[0].items() if names}


def test_ddp_spike_alert_alone_uses_one_all_reduce_per_check(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "spike_ddp_script.py")
    done = subprocess.run([sys.executable, script, str(tmp_path), "alone"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    assert ranks[0]["alerts"] == ranks[1]["alerts"]
    (record,) = ranks[0]["alerts"]
    assert (record["step"], record["signal"], record["nonfinite"], record["checked_at"]) == (5, "loss", True, 8)
    assert _our_collectives(ranks) == {step: ["all_reduce"] for step in (0, 4, 8, 12)}  # every log_every_n_steps


def _comparable(record):
    """An alert record with its floats rounded to 4 significant digits (sharded sums add in another order)."""
    def rounded(value):
        return None if value is None else float(f"{value:.4g}")
    return {**record, "value": rounded(record["value"]), "baseline": rounded(record["baseline"]), "z": rounded(record["z"]),
            "layers": [{**cell, "z": rounded(cell["z"])} for cell in record["layers"]]}


def test_fsdp2_alerts_equal_the_one_process_run_on_the_same_global_batch(tmp_path):
    """ModelParallelStrategy(data_parallel_size=2) with fully_shard, gloo: a planted layer fault gives, on both
    ranks, the alert of one process on the same global batch (layers, first steps, z to 4 digits)."""
    script = os.path.join(os.path.dirname(__file__), "spike_sharded_script.py")
    for mode in ("single", "fsdp2"):
        done = subprocess.run([sys.executable, script, str(tmp_path), mode], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    single = json.load(open(tmp_path / "single" / "rank0.json"))["alerts"]
    ranks = [json.load(open(tmp_path / "fsdp2" / f"rank{rank}.json"))["alerts"] for rank in (0, 1)]
    assert len(single) == 1 and single[0]["step"] == 14 and single[0]["layers"][0]["layer"] == "1", single
    assert ranks[0] == ranks[1]
    assert [_comparable(record) for record in ranks[0]] == [_comparable(record) for record in single]
