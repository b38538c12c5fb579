"""Peak memory of each metric on a real training loop, against no callback.

    python benchmarks/memory.py            # ~100M-parameter Llama (a few minutes on 2 cores)
    python benchmarks/memory.py --quick    # tiny model, two steps, two variants: a smoke test, not a measurement

Each variant trains the same model (same seed, same batches) in a fresh subprocess, sampling at every
step, so that one variant's allocations cannot hide in another's high-water mark. What is reported:

- on CUDA, ``torch.cuda.max_memory_allocated`` over the fit (the accelerator-side cost);
- always, the process's peak resident set over the fit: Linux's ``VmHWM`` after resetting it
  (``/proc/self/clear_refs``) just before ``fit``, so building the model does not count; elsewhere
  ``ru_maxrss`` over the whole process.

Figures are the peak above the no-callback run's, in MB and as a fraction of the bytes of the
parameters the gradient callback monitors (the decoder layers' projections; embeddings and norms are
not components).

A peak of the whole fit shows a callback's memory only where it adds to the baseline's own peak (which
is in backward, when activations are alive): a copy that lives only after the optimizer step can hide
under it. So the callback's work after the step, where ``update_ratio`` and ``weight_drift`` compare the
weights with their references, is also measured alone: the peak that torch allocates during the
callback's ``on_train_batch_end`` (a window opened by a callback just before it and closed just after),
with torch's profiler (``profile_memory``) on the CPU, with ``max_memory_allocated`` on CUDA. On the CPU
every copy is in RAM wherever it is kept; under CUDA this window is the accelerator-side cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

GRADIENT_METRICS = ["grad_norm", "grad_rms", "grad_to_weight", "update_ratio", "weight_drift"]
ACTIVATION_METRICS = ["rms", "l2", "mean_abs", "max_abs", "zero_fraction"]
VARIANTS = {
    "no callback": None,
    "grad_norm": ("gradient", ["grad_norm"]),
    "grad_to_weight": ("gradient", ["grad_to_weight"]),
    "update_ratio": ("gradient", ["update_ratio"]),
    "weight_drift": ("gradient", ["weight_drift"]),
    "all gradient metrics": ("gradient", GRADIENT_METRICS),
    "ActivationHeatmap (all 5 metrics)": ("activation", ACTIVATION_METRICS),
}
FULL = dict(hidden=768, intermediate=2048, layers=12, heads=12, vocab=8192, batch=4, length=128, steps=3)
QUICK = dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=256, batch=2, length=16, steps=2)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM, the peak resident set
        return True
    except OSError:
        return False


def _peak_rss_mb(reset: bool) -> float:
    if reset:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def child(variant: str, size: dict) -> dict:
    """Train one variant in this process and return its peaks."""
    import lightning as L
    import torch
    import transformers
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.profiler import ProfilerActivity, profile

    from lightning_heatmaps import ActivationHeatmap, GradientHeatmap

    class Workload(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.LlamaConfig(
                hidden_size=size["hidden"], intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                num_attention_heads=size["heads"], num_key_value_heads=size["heads"], vocab_size=size["vocab"],
                max_position_embeddings=512,
            )
            self.model = transformers.LlamaForCausalLM(config)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    model = Workload()
    data = torch.randint(0, size["vocab"], (size["batch"] * size["steps"], size["length"]),
                         generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_size=size["batch"])
    cuda = torch.cuda.is_available()
    window = {"peaks": [], "cuda_max": 0}

    class Window(Callback):
        """Opens (``start``) or closes (``stop``) the measurement around the callbacks listed between them."""

        def __init__(self, role: str) -> None:
            self.role = role

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
                window["cuda_max"] = max(window["cuda_max"], torch.cuda.max_memory_allocated())
                if self.role == "start":
                    window["start"] = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    window["peaks"].append(torch.cuda.max_memory_allocated() - window["start"])
                return
            if self.role == "start":
                window["profiler"] = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                window["profiler"].start()
                return
            profiler = window.pop("profiler")
            profiler.stop()
            running, peak = 0, 0
            for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
                running += event.self_cpu_memory_usage
                peak = max(peak, running)
            window["peaks"].append(peak)

    spec = VARIANTS[variant]
    callbacks = []
    if spec is not None:
        kind, metrics = spec
        cls = GradientHeatmap if kind == "gradient" else ActivationHeatmap
        callbacks += [Window("start"), cls(metrics=metrics, every_n_steps=1), Window("stop")]
    root = tempfile.mkdtemp()
    trainer = L.Trainer(
        max_steps=size["steps"], accelerator="auto", devices=1, logger=TensorBoardLogger(root), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        default_root_dir=root,
    )
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    monitored_bytes = sum(p.numel() * p.element_size() for p in model.model.model.layers.parameters() if p.dim() > 1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    trainer.fit(model, loader)
    result = {
        "variant": variant, "peak_rss_mb": _peak_rss_mb(reset), "rss_window": "fit" if reset else "process",
        "parameter_bytes": parameter_bytes, "monitored_bytes": monitored_bytes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "after_step_mb": max(window["peaks"], default=0) / 2**20,
        "largest_monitored_bytes": max(p.numel() * p.element_size() for p in model.model.model.layers.parameters()),
    }
    if cuda:
        result["cuda_max_allocated_mb"] = max(window["cuda_max"], torch.cuda.max_memory_allocated()) / 2**20
        result["device"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, two steps (CI smoke test only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    if args.child is not None:
        print(json.dumps(child(args.child, size)))
        return

    import lightning
    import torch
    import transformers

    print(f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} cores; Llama {size['layers']}x{size['hidden']} (ffn "
          f"{size['intermediate']}, vocab {size['vocab']}), batch {size['batch']}x{size['length']}, AdamW fp32, "
          f"{size['steps']} steps sampled at every step, one fresh process per variant")
    results = []
    # Quick mode runs two variants: each fresh process spends ~10 s importing, and it is only a smoke test.
    for variant in ["no callback", "all gradient metrics"] if args.quick else VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--child", variant] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"variant {variant!r} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = results[0]
    cuda = "cuda_max_allocated_mb" in base
    print(f"parameters: {base['parameters'] / 1e6:.1f} M ({base['parameter_bytes'] / 2**20:.0f} MB); monitored by "
          f"GradientHeatmap: {base['monitored_bytes'] / 2**20:.0f} MB, the largest of them "
          f"{base['largest_monitored_bytes'] / 2**20:.1f} MB; peak RSS window: {base['rss_window']}"
          + (f"; device: {base['device']}" if cuda else "; no CUDA: accelerator column absent"))
    header = ("| variant | peak RSS (MB) | RSS above no callback (MB) | / monitored parameter bytes | "
              f"allocated by the callback after the step ({'CUDA' if cuda else 'CPU'}, MB) |")
    rule = "|---|---|---|---|---|"
    if cuda:
        header += " CUDA max allocated (MB) | CUDA above no callback (MB) | / monitored parameter bytes |"
        rule += "---|---|---|"
    print(header)
    print(rule)
    monitored_mb = base["monitored_bytes"] / 2**20
    for result in results:
        extra = result["peak_rss_mb"] - base["peak_rss_mb"]
        after_step = f"{result['after_step_mb']:.1f}" if result["variant"] != "no callback" else "-"
        row = (f"| {result['variant']} | {result['peak_rss_mb']:.0f} | {extra:+.0f} | {extra / monitored_mb:+.2f} | "
               f"{after_step} |")
        if cuda:
            extra_cuda = result["cuda_max_allocated_mb"] - base["cuda_max_allocated_mb"]
            row += f" {result['cuda_max_allocated_mb']:.0f} | {extra_cuda:+.0f} | {extra_cuda / monitored_mb:+.2f} |"
        print(row)


if __name__ == "__main__":
    main()
