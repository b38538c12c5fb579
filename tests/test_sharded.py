"""Sharded training on 2 CPU ranks (gloo): FSDP2 gives one process's numbers; what cannot be right is refused.

Each mode runs tests/sharded_script.py in a subprocess with a timeout (a collective mismatch would hang
until the 60 s process-group timeout; the subprocess timeout catches anything longer). The last tests run in
this process on a 1-rank gloo group: which sharded layouts a lens callback accepts, and its gathering.
"""

import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import read_events, scalar_series

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_script.py")
ARCHITECTURES = ("llama", "gpt2", "neox")


def _run(out_dir, mode, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, str(out_dir), mode], capture_output=True, text=True, timeout=timeout)


def _log_dirs(root):
    return sorted({os.path.dirname(p) for p in glob.glob(f"{root}/**/events.out.tfevents.*", recursive=True)})


def _layer_scalars(log_dir):
    events = read_events(log_dir)
    return {tag: scalar_series(events, tag) for tag in events.Tags()["scalars"] if "/layer_" in tag}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    for mode in ("single", "fsdp2"):
        result = _run(root / mode, mode)
        assert result.returncode == 0, result.stderr[-4000:]
        (root / f"{mode}.log").write_text(result.stdout + result.stderr)
    return root


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fsdp2_equals_one_process_for_every_scalar(runs, architecture):
    (single_dir,) = _log_dirs(runs / "single" / architecture)
    (sharded_dir,) = _log_dirs(runs / "fsdp2" / architecture)
    assert len(glob.glob(f"{sharded_dir}/events.out.tfevents.*")) == 1  # rank zero writes alone
    expected, actual = _layer_scalars(single_dir), _layer_scalars(sharded_dir)
    metrics = {tag.split("/")[0] for tag in expected}
    assert len(metrics) == 10  # all five activation and all five gradient metrics
    assert sorted(actual) == sorted(expected)
    for tag, series in expected.items():
        assert sorted(actual[tag]) == [0, 1, 2, 3], tag
        for step, value in series.items():
            assert math.isfinite(value), (tag, step)
            # grad_norm exactly 0 everywhere was the bug: sharded parameters replaced the ones found at setup
            assert actual[tag][step] == pytest.approx(value, rel=1e-4), (tag, step)
    assert any(value > 0 for value in actual["grad_norm/layer_0/attn.q"].values())


def test_frozen_parameters_are_missing_not_zero(runs):
    for mode in ("single", "fsdp2"):
        assert "Frozen (no gradient, shown as missing): 0/mlp.gate." in (runs / f"{mode}.log").read_text()
        (log_dir,) = _log_dirs(runs / mode / "llama")
        scalars = _layer_scalars(log_dir)
        assert "grad_norm/layer_0/mlp.gate" not in scalars and "weight_drift/layer_0/mlp.gate" not in scalars
        assert "grad_norm/layer_1/mlp.gate" in scalars
        assert "activation_rms/layer_0/mlp.gate" in scalars  # it still runs forward
        matrix = np.load(os.path.join(log_dir, "heatmaps", "grad_norm", "layer_x_component.npz"))
        gate = list(matrix["component_labels"]).index("mlp.gate")
        assert matrix["missing"][0, gate] and np.isnan(matrix["values"][0, gate])  # grey, NaN
        assert np.isfinite(matrix["values"][1, gate])


def test_tensor_parallel_is_refused_without_hanging(tmp_path):
    result = _run(tmp_path, "tp", timeout=150)
    assert result.returncode != 0
    assert "does not support tensor parallelism (ModelParallelStrategy with tensor_parallel_size=2)" in result.stderr


def test_tensor_parallel_is_refused_for_attention_heatmap_without_hanging(tmp_path):
    result = _run(tmp_path, "tp-attention", timeout=150)
    assert result.returncode != 0
    assert "AttentionHeatmap does not support tensor parallelism (ModelParallelStrategy with tensor_parallel_size=2)" in result.stderr


LENS_FILES = ["intervention_jsd/layer_x_site.npz", "intervention_jsd/layer_x_step.npz", "logit_lens/layer_x_step.npz",
              "logit_lens/prompt_0.npz", "logit_lens/prompt_1.npz", "probe_auc/layer_x_position.npz",
              "probe_auc/layer_x_step.npz"]


def test_lens_callbacks_under_fsdp2_equal_one_process(tmp_path):
    """One 2-rank FSDP2 run with the three lens callbacks against one process: every rank runs every
    evaluation's forwards (none hangs), rank zero alone writes, and what it writes is one process's values."""
    stdout = {}
    for mode in ("lens-single", "lens-fsdp2"):
        result = _run(tmp_path / mode, mode, timeout=240)
        assert result.returncode == 0, result.stderr[-4000:]
        stdout[mode] = result.stdout
    counts = "evaluations: LogitLensHeatmap=3 ProbeHeatmap=3 InterventionHeatmap=3"  # steps 0, 2 and 4
    assert f"rank 0 {counts}" in stdout["lens-single"]
    assert f"rank 0 {counts}" in stdout["lens-fsdp2"] and f"rank 1 {counts}" in stdout["lens-fsdp2"]
    (single_dir,) = _log_dirs(tmp_path / "lens-single" / "llama")
    (sharded_dir,) = _log_dirs(tmp_path / "lens-fsdp2" / "llama")
    assert len(glob.glob(f"{sharded_dir}/events.out.tfevents.*")) == 1  # rank zero writes alone

    def written(log_dir):
        return sorted(os.path.relpath(path, os.path.join(log_dir, "heatmaps"))
                      for path in glob.glob(f"{log_dir}/heatmaps/**/*.npz", recursive=True))

    assert written(single_dir) == written(sharded_dir) == LENS_FILES
    for name in LENS_FILES:
        expected = np.load(os.path.join(single_dir, "heatmaps", name))
        actual = np.load(os.path.join(sharded_dir, "heatmaps", name))
        assert sorted(actual.files) == sorted(expected.files), name
        for key in expected.files:
            if expected[key].dtype.kind in "fc":
                assert np.isfinite(expected[key]).all(), (name, key)
                np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=f"{name}: {key}")
            else:
                np.testing.assert_array_equal(actual[key], expected[key], err_msg=f"{name}: {key}")
    assert np.load(os.path.join(sharded_dir, "heatmaps", "logit_lens", "layer_x_step.npz"))["steps"].tolist() == [0, 2, 4]

    # Every scalar of every evaluation (steps 0, 2 and 4), not only the last one the files hold.
    lens_scalars = []
    for log_dir in (single_dir, sharded_dir):
        events = read_events(log_dir)
        tags = [tag for tag in events.Tags()["scalars"] if tag.split("/")[0] in ("logit_lens", "probe_auc", "intervention_jsd")]
        lens_scalars.append({tag: scalar_series(events, tag) for tag in tags})
    expected, actual = lens_scalars
    assert len(expected) >= 3 * 2 + 4 and sorted(actual) == sorted(expected)
    for tag, series in expected.items():
        assert sorted(actual[tag]) == sorted(series) == [0, 2, 4], tag
        for step, value in series.items():
            assert actual[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-6), (tag, step)


def test_resume_from_a_distributed_checkpoint_continues_the_history(tmp_path):
    result = _run(tmp_path, "resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert os.path.isdir(tmp_path / "checkpoints" / "last.ckpt")  # a distributed (sharded) checkpoint
    first, resumed = _log_dirs(tmp_path / "llama")
    for metric in ("grad_norm", "activation_rms", "weight_drift"):
        before = np.load(os.path.join(first, "heatmaps", metric, "layer_x_step.npz"))
        after = np.load(os.path.join(resumed, "heatmaps", metric, "layer_x_step.npz"))
        assert before["steps"].tolist() == [0, 1, 2, 3]
        assert after["steps"].tolist() == list(range(8))  # none lost, none twice
        np.testing.assert_array_equal(after["values"][:, :4], before["values"])
    assert sorted(scalar_series(read_events(resumed), "grad_norm/layer_1/all")) == [4, 5, 6, 7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) needs CUDA: Lightning refuses it on CPU")
def test_fsdp1_with_orig_params_equals_one_process(runs, tmp_path):
    result = _run(tmp_path, "fsdp1")
    assert result.returncode == 0, result.stderr[-4000:]
    for architecture in ARCHITECTURES:
        (single_dir,), (sharded_dir,) = _log_dirs(runs / "single" / architecture), _log_dirs(tmp_path / architecture)
        expected, actual = _layer_scalars(single_dir), _layer_scalars(sharded_dir)
        assert sorted(actual) == sorted(expected), architecture
        for tag, series in expected.items():
            for step, value in series.items():
                assert actual[tag][step] == pytest.approx(value, rel=1e-4), (architecture, tag, step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) needs CUDA: Lightning refuses it on CPU")
def test_fsdp1_without_orig_params_is_refused(tmp_path):
    result = _run(tmp_path, "fsdp1-flat", timeout=150)
    assert result.returncode != 0
    assert "needs FSDPStrategy(use_orig_params=True)" in result.stderr


def test_fused_qkv_layouts_are_confirmed_on_sharded_ranks(runs):
    """The layout probe rebuilds the attention on CPU from the config: FSDP2's DTensors neither stop it nor hang it."""
    log = (runs / "fsdp2").parent.joinpath("fsdp2.log").read_text()
    for architecture in ("gpt2", "gpt_neox"):
        assert f"architecture: {architecture}): attn.q, attn.k, attn.v, attn.o" in log, architecture
    assert "not confirmed" not in log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) needs CUDA: Lightning refuses it on CPU")
def test_lens_callback_under_fsdp1_is_refused(tmp_path):
    result = _run(tmp_path, "lens-fsdp1", timeout=150)
    assert result.returncode != 0
    assert "LogitLensHeatmap does not support FSDPStrategy (FSDP1)" in result.stderr


# --- In this process, on a 1-rank gloo group: which layouts a lens callback evaluates, and gathering -----


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_lens_sharding_accepts_fsdp2_and_gathers_the_decoder_outside_a_forward(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from conftest import tiny_llama
    from lightning_heatmaps.distributed import check_lens_sharding, fsdp2_units_of, gathered

    model = tiny_llama(2)
    assert check_lens_sharding(model, "LogitLensHeatmap") is False  # whole: rank zero evaluates alone
    mesh = init_device_mesh("cpu", (1,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    assert check_lens_sharding(model, "LogitLensHeatmap") is True
    units = fsdp2_units_of(model, [model.model.norm, model.lm_head, torch.nn.Linear(2, 2), lambda state: state])
    assert units == [model]  # the root unit holds both; an outside module and a function add none
    assert fsdp2_units_of(model, [model.model.layers[1].mlp]) == [model.model.layers[1]]
    assert type(model.lm_head.weight).__name__ == "DTensor"
    with gathered(units):
        assert type(model.lm_head.weight).__name__ == "Parameter"
        assert model.lm_head(model.model.norm(torch.randn(3, 32))).shape == (3, 48)
    assert type(model.lm_head.weight).__name__ == "DTensor"  # resharded


def test_lens_sharding_refuses_what_cannot_be_exact(one_rank_group):
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lightning_heatmaps.distributed import check_lens_sharding

    tensor_parallel = nn.Sequential(nn.Linear(4, 4))
    parallelize_module(tensor_parallel[0], init_device_mesh("cpu", (1,)), ColwiseParallel())
    with pytest.raises(ValueError, match=r"ProbeHeatmap does not support tensor parallelism: parameter 0.weight is a "
                                         r"DTensor \(Shard\(dim=0\),\) that no `fully_shard` manages.*FSDP2"):
        check_lens_sharding(tensor_parallel, "ProbeHeatmap")

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    both = nn.Sequential(nn.Linear(4, 4))
    parallelize_module(both[0], mesh["tensor_parallel"], ColwiseParallel())
    fully_shard(both, mesh=mesh["data_parallel"])
    with pytest.raises(ValueError, match=r"does not support tensor parallelism with FSDP2: parameter 0.weight is "
                                         r"sharded as \(Shard\(dim=0\), Shard\(dim=0\)\)"):
        check_lens_sharding(both, "InterventionHeatmap")

    fsdp1 = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 4)), device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"LogitLensHeatmap does not support FSDPStrategy \(FSDP1\).*FSDP2 \(`fully_shard`"):
        check_lens_sharding(fsdp1, "LogitLensHeatmap")
