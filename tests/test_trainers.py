"""The same heatmaps under every trainer: Lightning, a plain loop, Fabric and the Hugging Face Trainer (one process
and DDP), read back from event files."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import read_events, scalar_series

SCRIPT = os.path.join(os.path.dirname(__file__), "trainers_script.py")


def _run(out_dir, mode, *extra, timeout=240, command=None):
    command = command or [sys.executable, SCRIPT]
    # A hang (a collective only some ranks join) ends with every thread's traceback instead of the timeout alone.
    env = {**os.environ, "TRAINERS_SCRIPT_TRACEBACK_AFTER": str(timeout - 60)}
    result = subprocess.run([*command, str(out_dir), mode, *extra], capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (directory,) = sorted({os.path.dirname(p) for p in glob.glob(f"{out_dir}/**/events.out.tfevents.*", recursive=True)})
    return directory


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("lightning"), "lightning")


METRICS = ("activation_rms", "grad_norm", "update_ratio")


def _assert_same_heatmaps(expected_dir, actual_dir, rel, shift=0):
    """``actual``'s sample at step ``s + shift`` equals ``expected``'s at ``s`` (the Hugging Face Trainer numbers an
    optimizer step by the ``global_step`` after it, Lightning by the one before), for every sample of ``expected``."""
    expected, actual = read_events(expected_dir), read_events(actual_dir)
    tags = [t for t in expected.Tags()["scalars"] if t.split("/")[0] in ("activation_rms", "grad_norm", "update_ratio")]
    assert len(tags) == 3 * 2 * 8  # 3 metrics x 2 layers x (7 components + all)
    assert sorted(t for t in actual.Tags()["scalars"] if t.split("/")[0] in ("activation_rms", "grad_norm", "update_ratio")) == sorted(tags)
    for tag in tags:
        want, got = scalar_series(expected, tag), scalar_series(actual, tag)
        assert sorted(want) == [0, 2, 4], tag
        assert sorted(got) == ([0, 2, 4] if not shift else [1, 2, 3, 4, 5]), tag
        for step in want:
            assert got[step + shift] == pytest.approx(want[step], rel=rel), (tag, step)
    import numpy as np

    for metric in ("activation_rms", "grad_norm", "update_ratio"):
        a = np.load(f"{expected_dir}/heatmaps/{metric}/layer_x_step.npz")
        b = np.load(f"{actual_dir}/heatmaps/{metric}/layer_x_step.npz")
        assert a["steps"].tolist() == [0, 2, 4]
        assert b["steps"].tolist() == ([0, 2, 4] if not shift else [1, 2, 3, 4, 5])
        np.testing.assert_allclose(b["values"][:, ::2] if shift else b["values"], a["values"], rtol=rel)
    images = {t for t in expected.Tags()["images"] if "attention" not in t}  # only Lightning and Fabric runs have it
    assert images and {t for t in actual.Tags()["images"] if "attention" not in t} == images


def _assert_same_attention(expected_dir, actual_dir, rel, shift=0):
    expected, actual = read_events(expected_dir), read_events(actual_dir)
    tags = [t for t in expected.Tags()["scalars"] if t.startswith(("attention_", "output_logits/"))]
    assert len(tags) == 2 * 2 + 2  # (max_logit, entropy) x 2 layers (pooled over heads), log Z mean and max |logit|
    assert sorted(t for t in actual.Tags()["scalars"] if t.startswith(("attention_", "output_logits/"))) == sorted(tags)
    for tag in tags:
        want, got = scalar_series(expected, tag), scalar_series(actual, tag)
        assert sorted(want) == [0, 2, 4] and sorted(got) == ([0, 2, 4] if not shift else [1, 2, 3, 4, 5]), tag
        assert [got[step + shift] for step in want] == pytest.approx([want[step] for step in want], rel=rel), tag
    for metric in ("attention_max_logit", "attention_entropy"):
        a = np.load(f"{expected_dir}/heatmaps/{metric}/layer_x_head.npz")
        b = np.load(f"{actual_dir}/heatmaps/{metric}/layer_x_head.npz")
        np.testing.assert_allclose(b["values"], a["values"], rtol=rel)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("loop"), "loop")


@pytest.fixture(scope="module")
def fabric_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fabric"), "fabric")


def test_plain_loop_equals_lightning(loop_run, lightning_run):
    _assert_same_heatmaps(lightning_run, loop_run, rel=1e-6)


def test_plain_loop_ddp_two_processes_equals_one(tmp_path, lightning_run):
    _assert_same_heatmaps(lightning_run, _run(tmp_path, "loop_ddp"), rel=2e-4)


def test_fabric_equals_lightning(fabric_run, lightning_run):
    directory = fabric_run
    _assert_same_heatmaps(lightning_run, directory, rel=1e-6)
    _assert_same_attention(lightning_run, directory, rel=1e-6)


def test_fabric_ddp_two_processes_equals_lightning(tmp_path, lightning_run):
    directory = _run(tmp_path, "fabric_ddp")
    _assert_same_heatmaps(lightning_run, directory, rel=2e-4)
    _assert_same_attention(lightning_run, directory, rel=2e-4)


def test_core_imports_neither_lightning_nor_transformers():
    code = ("import sys, lightning_heatmaps.core, lightning_heatmaps.loop, lightning_heatmaps.core.lens, "
            "lightning_heatmaps.core.logit_lens, lightning_heatmaps.core.probe, lightning_heatmaps.core.intervention; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'lightning_fabric', "
            "'pytorch_lightning', 'transformers')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


# --- Hugging Face Trainer ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("hf"), "hf")


def test_hf_trainer_equals_lightning_one_writer_per_directory(hf_run, lightning_run):
    directory = hf_run
    assert len(glob.glob(f"{directory}/events.out.tfevents.*")) == 1  # the TensorBoardCallback's writer, reused
    events = read_events(directory)
    assert sorted(scalar_series(events, "train/loss")) == [1, 2, 3, 4, 5]  # aligned with the Trainer's own scalars
    _assert_same_heatmaps(lightning_run, directory, rel=1e-5, shift=1)
    _assert_same_attention(lightning_run, directory, rel=1e-5, shift=1)


def test_hf_ddp_two_processes_equals_one(tmp_path, lightning_run, hf_run):
    """torchrun, 2 gloo ranks, each half of the same global batch (accelerate splits the iterable's batches)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT]
    directory = _run(tmp_path, "hf", command=torchrun)
    assert len(glob.glob(f"{directory}/events.out.tfevents.*")) == 1  # rank zero writes, through the callback's writer
    _assert_same_heatmaps(lightning_run, directory, rel=2e-4, shift=1)
    _assert_same_attention(lightning_run, directory, rel=2e-4, shift=1)
    one, two = read_events(hf_run), read_events(directory)  # and every step (1..5) equals the one-process run's
    tags = [t for t in one.Tags()["scalars"] if t.split("/")[0] in METRICS]
    assert tags and sorted(t for t in two.Tags()["scalars"] if t.split("/")[0] in METRICS) == sorted(tags)
    for tag in tags:
        want, got = scalar_series(one, tag), scalar_series(two, tag)
        assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5], tag
        assert [got[step] for step in want] == pytest.approx([want[step] for step in want], rel=2e-4), tag


def test_hf_gradients_are_read_before_clipping(tmp_path):
    """With max_grad_norm=1e-5 the first step's gradients equal the unclipped run's and an independent reference."""
    import torch

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import trainers_script

    model, _ = trainers_script.model_and_optimizer()
    batch = trainers_script.DATA[:4]
    model(input_ids=batch, labels=batch).loss.backward()
    layer = model.model.layers[1]
    reference = {"attn.q": layer.self_attn.q_proj.weight.grad.norm().item(),
                 "mlp.down": layer.mlp.down_proj.weight.grad.norm().item()}
    assert min(reference.values()) > 1e-3  # 100 times what clipping to 1e-5 in total would leave
    clipped = read_events(_run(tmp_path / "clip", "hf", "clip"))
    assert scalar_series(clipped, "train/grad_norm")[1] > 1e-3  # the Trainer did clip this run (pre-clip norm)
    for component, expected in reference.items():
        assert scalar_series(clipped, f"grad_norm/layer_1/{component}")[1] == pytest.approx(expected, rel=1e-5)


def test_hf_gradient_accumulation_equals_one_batch(tmp_path, lightning_run):
    _assert_same_heatmaps(lightning_run, _run(tmp_path, "hf", "accumulation"), rel=2e-4, shift=1)


def test_hf_peft_lora_adapters_monitored_frozen_base_shown_frozen(tmp_path):
    import numpy as np

    directory = _run(tmp_path, "hf", "peft")
    events = read_events(directory)
    grads = [t for t in events.Tags()["scalars"] if t.startswith("grad_norm/")]
    saved = np.load(f"{directory}/heatmaps/grad_norm/layer_x_component.npz")
    print(grads, {k: saved[k] for k in saved.files})
    assert any(t.endswith("attn.q") for t in grads) and any(t.endswith("attn.v") for t in grads)
    assert not any(t.endswith(("attn.k", "mlp.up")) for t in grads)  # frozen: no scalar, never a 0


# --- Lightning Fabric: resume and misuse, in this process (one device) --------------------------------------------


def _fabric_steps(root, model, optimizer, callbacks, batches):
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger

    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=callbacks, loggers=TensorBoardLogger(str(root)))
    wrapped, wrapped_optimizer = fabric.setup(model, optimizer)
    for batch in batches:
        fabric.call("on_train_batch_start")
        fabric.backward(wrapped(input_ids=batch, labels=batch).loss)
        fabric.call("on_before_optimizer_step")
        wrapped_optimizer.step()
        wrapped_optimizer.zero_grad()
    fabric.call("on_train_end")
    return fabric.logger.log_dir


def test_fabric_state_dict_resumes_the_history_and_the_step_count(tmp_path):
    """3 steps, state_dict, a new Fabric and callback loading it, 2 more steps: the history equals 5 steps at once."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import trainers_script
    from lightning_heatmaps.fabric import GradientHeatmap

    batches = list(trainers_script.loader(0, 1))

    def callback():
        return GradientHeatmap(metrics="grad_norm", every_n_steps=2, min_render_interval_seconds=0)

    model, optimizer = trainers_script.model_and_optimizer()
    whole = _fabric_steps(tmp_path / "whole", model, optimizer, [callback()], batches)
    model, optimizer = trainers_script.model_and_optimizer()
    first = callback()
    _fabric_steps(tmp_path / "first", model, optimizer, [first], batches[:3])
    state = first.state_dict()
    assert state["global_step"] == 3
    second = callback()
    second.load_state_dict(state)
    resumed = _fabric_steps(tmp_path / "second", model, optimizer, [second], batches[3:])
    assert sorted(scalar_series(read_events(resumed), "grad_norm/layer_1/all")) == [4]  # step numbers go on
    a = np.load(f"{whole}/heatmaps/grad_norm/layer_x_step.npz")
    b = np.load(f"{resumed}/heatmaps/grad_norm/layer_x_step.npz")
    assert a["steps"].tolist() == b["steps"].tolist() == [0, 2, 4]
    np.testing.assert_allclose(b["values"], a["values"], rtol=1e-6)


def test_fabric_misuse_is_refused_with_a_message():
    from lightning_heatmaps.fabric import ActivationHeatmap

    with pytest.raises(ValueError, match="start_step=-1"):
        ActivationHeatmap(start_step=-1)
    with pytest.raises(RuntimeError, match=r"is not attached: call fabric.setup\(model, optimizer\)"):
        ActivationHeatmap().on_train_batch_start()


# --- the HEATMAPS dashboard ---------------------------------------------------------------------------------------


def test_the_dashboard_reads_every_trainer(tmp_path, lightning_run, loop_run, fabric_run, hf_run):
    """TensorBoard, with the HEATMAPS plugin as ``tensorboard`` loads it, serves every trainer's run: the same
    matrices, described alike, with the same values as the Lightning run's (the Trainer's one step later)."""
    import shutil
    import time

    from tensorboard import default, program
    from tensorboard.backend import application
    from werkzeug.test import Client

    from lightning_heatmaps_tensorboard.metadata import PLUGIN_NAME
    from lightning_heatmaps_tensorboard.plugin import decode_values

    runs = {"lightning": lightning_run, "loop": loop_run, "fabric": fabric_run, "hf": hf_run}
    for name, directory in runs.items():
        shutil.copytree(directory, tmp_path / name, ignore=shutil.ignore_patterns("*.npz", "*.png", "*.jsonl"))
    board = program.TensorBoard(plugins=default.get_plugins())
    board.configure(argv=["", "--logdir", str(tmp_path), "--load_fast", "false", "--samples_per_plugin", f"{PLUGIN_NAME}=0"])
    data_provider, multiplexer = board._make_data_provider()
    client = Client(application.TensorBoardWSGIApp(board.flags, board.plugin_loaders, data_provider,
                                                   board.assets_zip_provider, multiplexer))
    base = f"/data/plugin/{PLUGIN_NAME}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = client.get(f"{base}/runs").json
        if set(listing) == set(runs) and len({len(v) for v in listing.values()}) == 1 and listing["lightning"]:
            break
        time.sleep(0.2)
    assert set(listing) == set(runs), listing.keys()
    want = listing["lightning"]
    assert {"matrices/grad_norm", "matrices/activation_rms", "matrices/update_ratio"} <= set(want)
    described = ("callback", "metric", "kind", "row_labels", "column_labels", "missing")
    for name in ("loop", "fabric", "hf"):
        got = listing[name]
        expected = {tag for tag in want if name != "loop" or "attention" not in tag}  # the loop run has no attention
        assert set(got) == expected, name
        for tag in got:
            expected = {k: want[tag].get(k) for k in described}
            if name == "loop":  # the dashboard names the class the user wrote: the loop's core monitor
                expected["callback"] = expected["callback"].replace("Heatmap", "Monitor")
            assert {k: got[tag].get(k) for k in described} == expected, (name, tag)
            steps, values = decode_values(client.get(f"{base}/values", query_string={"run": "lightning", "tag": tag}).data)
            their_steps, theirs = decode_values(client.get(f"{base}/values", query_string={"run": name, "tag": tag}).data)
            assert steps.tolist() == [0, 2, 4], tag
            shift = 1 if name == "hf" else 0  # the Trainer numbers a step by the global_step after it
            chosen = [their_steps.tolist().index(step + shift) for step in steps.tolist()]
            np.testing.assert_allclose(theirs[chosen], values, rtol=1e-5, err_msg=f"{name} {tag}")
