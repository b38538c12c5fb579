"""Where a sampled step's extra time goes on the training thread: wall time inside each part of the callbacks.

    python benchmarks/profile_sampled_step.py            # every step sampled, rendering off
    python benchmarks/profile_sampled_step.py --every 2  # every other step

Wraps the callbacks' methods and the activation reduction with timers (this script only; the package
is not changed) and prints milliseconds per training step.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import overhead  # noqa: E402

import lightning_heatmaps.activation as activation  # noqa: E402
from lightning_heatmaps import ActivationHeatmap, GradientHeatmap  # noqa: E402
from lightning_heatmaps.base import HeatmapCallback  # noqa: E402

TOTALS: dict[str, float] = {}


def timed(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TOTALS[name] = TOTALS.get(name, 0.0) + time.perf_counter() - started
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    options = parser.parse_args()
    args = argparse.Namespace(hidden=256, intermediate=688, layers=8, heads=8, vocab=2048, batch=8, length=128, warmup=5)
    torch.set_num_threads(2)
    for name in ("on_train_batch_end", "_finish_sample", "_ingest"):
        setattr(HeatmapCallback, name, timed(f"batch end: {name}", getattr(HeatmapCallback, name)))
    GradientHeatmap.on_before_optimizer_step = timed("gradients: on_before_optimizer_step", GradientHeatmap.on_before_optimizer_step)
    activation.activation_partials = timed("activations: reductions in forward hooks", activation.activation_partials)
    quiet = {"render_every_n_samples": 10**6, "min_render_interval_seconds": 1e9}
    result = overhead.run(lambda: [ActivationHeatmap(every_n_steps=options.every, **quiet),
                                   GradientHeatmap(every_n_steps=options.every, **quiet)], args, options.steps)
    steps = len(result["timed"]) + args.warmup
    print(f"every_n_steps={options.every}: median step {1e3 * statistics.median(t for _, t in result['timed']):.1f} ms")
    for name, seconds in sorted(TOTALS.items()):
        print(f"  {name}: {1e3 * seconds / steps:.2f} ms per step")


if __name__ == "__main__":
    main()
