"""The same heatmaps under every trainer: Lightning, a plain loop (one process and DDP), read back from event files."""

import glob
import os
import subprocess
import sys

import pytest

from conftest import read_events, scalar_series

SCRIPT = os.path.join(os.path.dirname(__file__), "trainers_script.py")


def _run(out_dir, mode, timeout=240):
    result = subprocess.run([sys.executable, SCRIPT, str(out_dir), mode], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    (directory,) = sorted({os.path.dirname(p) for p in glob.glob(f"{out_dir}/**/events.out.tfevents.*", recursive=True)})
    return directory


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("lightning"), "lightning")


def _assert_same_heatmaps(expected_dir, actual_dir, rel):
    expected, actual = read_events(expected_dir), read_events(actual_dir)
    tags = [t for t in expected.Tags()["scalars"] if t.split("/")[0] in ("activation_rms", "grad_norm", "update_ratio")]
    assert len(tags) == 3 * 2 * 8  # 3 metrics x 2 layers x (7 components + all)
    assert sorted(t for t in actual.Tags()["scalars"] if t.split("/")[0] in ("activation_rms", "grad_norm", "update_ratio")) == sorted(tags)
    for tag in tags:
        want, got = scalar_series(expected, tag), scalar_series(actual, tag)
        assert sorted(got) == sorted(want) == [0, 2, 4], tag
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=rel), (tag, step)
    import numpy as np

    for metric in ("activation_rms", "grad_norm", "update_ratio"):
        a = np.load(f"{expected_dir}/heatmaps/{metric}/layer_x_step.npz")
        b = np.load(f"{actual_dir}/heatmaps/{metric}/layer_x_step.npz")
        assert b["steps"].tolist() == a["steps"].tolist() == [0, 2, 4]
        np.testing.assert_allclose(b["values"], a["values"], rtol=rel)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: F401

    assert set(actual.Tags()["images"]) == set(expected.Tags()["images"])


def test_plain_loop_equals_lightning(tmp_path, lightning_run):
    _assert_same_heatmaps(lightning_run, _run(tmp_path, "loop"), rel=1e-6)


def test_plain_loop_ddp_two_processes_equals_one(tmp_path, lightning_run):
    _assert_same_heatmaps(lightning_run, _run(tmp_path, "loop_ddp"), rel=2e-4)


def test_core_imports_neither_lightning_nor_transformers():
    code = ("import sys, lightning_heatmaps.core, lightning_heatmaps.loop; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'lightning_fabric', "
            "'pytorch_lightning', 'transformers')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
