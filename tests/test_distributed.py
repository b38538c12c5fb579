"""DDP on 2 CPU processes (gloo): the same heatmaps as one process on the same global batch."""

import glob
import os
import subprocess
import sys

import pytest

from conftest import read_events, scalar_series

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")


def _run(out_dir, mode, *extra, timeout=240):
    return subprocess.run([sys.executable, SCRIPT, str(out_dir), mode, *map(str, extra)], capture_output=True,
                          text=True, timeout=timeout)


def _event_dirs(out_dir):
    return sorted({os.path.dirname(p) for p in glob.glob(f"{out_dir}/**/events.out.tfevents.*", recursive=True)})


def test_ddp_matches_single_process_and_only_rank_zero_writes(tmp_path):
    single = _run(tmp_path / "single", "single")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run(tmp_path / "ddp", "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (single_dir,), (ddp_dir,) = _event_dirs(tmp_path / "single"), _event_dirs(tmp_path / "ddp")
    assert len(glob.glob(f"{ddp_dir}/events.out.tfevents.*")) == 1  # one writer: rank zero
    single_events, ddp_events = read_events(single_dir), read_events(ddp_dir)
    tags = [t for t in single_events.Tags()["scalars"] if t.startswith(("activation_", "grad_norm/"))]
    assert len(tags) == 2 * 2 * 8 + 2 * 8
    # Lens callbacks evaluate on rank zero alone (the other rank goes on), with the same weights.
    tags += ["logit_lens/layer_0/mean_divergence", "intervention_jsd/layer_1/mean_divergence"]
    for tag in tags:
        expected, actual = scalar_series(single_events, tag), scalar_series(ddp_events, tag)
        assert sorted(actual) == sorted(expected), tag
        for step in expected:
            # Activations pool over ranks into the global batch's value; gradients are DDP's averaged ones.
            assert actual[step] == pytest.approx(expected[step], rel=2e-4), (tag, step)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    result = _run(tmp_path, "ddp", 2, timeout=180)  # a hang would raise TimeoutExpired
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
