"""AttentionHeatmap's cost: a sampled step against an unsampled step, and against the attention itself.

    python benchmarks/attention.py            # tiny Llama (GQA, sdpa), sequence 1024 (about a minute on 2 cores)
    python benchmarks/attention.py --quick    # sequence 128, a few steps: a smoke test (< 60 s), not a measurement

One training run with ``AttentionHeatmap(every_n_steps=2)``: sampled and unsampled steps alternate, so the two
medians are paired (the same process, the same load, interleaved). Reported:

- the median step time of unsampled and sampled steps, and their ratio;
- the amortised ratio at ``every_n_steps=50``: ``(49 * unsampled + sampled) / (50 * unsampled)``;
- beside it, in the same process on the same q/k/v shapes: the model's attention itself (``sdpa`` forward and
  backward of every layer) and :func:`~lightning_heatmaps.attention_statistics` on every layer.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
import transformers
from lightning.pytorch.callbacks import Callback

from lightning_heatmaps import AttentionHeatmap, attention_statistics

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Model(L.LightningModule):
    def __init__(self, layers: int, hidden: int, heads: int) -> None:
        super().__init__()
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=256,
                                          max_position_embeddings=4096)
        self.model = transformers.LlamaForCausalLM(config)
        self.model.set_attn_implementation("sdpa")

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times[trainer.global_step - 1] = time.perf_counter() - self._start


def attention_alone(batch: int, heads: int, kv_heads: int, length: int, dim: int, layers: int, device: str, repeats: int):
    """Median seconds of every layer's sdpa forward+backward, and of attention_statistics on every layer (paired)."""
    q = torch.randn(batch, heads, length, dim, device=device, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, device=device, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, dim, device=device, requires_grad=True)
    sdpa, stats = [], []
    for _ in range(repeats):
        for arm, times in (("sdpa", sdpa), ("stats", stats)):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(layers):
                if arm == "sdpa":
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    out.sum().backward()
                else:
                    attention_statistics(q, k, dim ** -0.5, causal=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(sdpa), statistics.median(stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    length, steps = (128, 6) if args.quick else (args.length, args.steps)
    layers, hidden, heads, batch = 2, 64, 4, 2
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = "cuda" if accelerator == "gpu" else "cpu"
    torch.manual_seed(0)
    data = torch.randint(0, 256, (steps * batch, length))
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
                        callbacks=[timer, AttentionHeatmap(every_n_steps=2, min_render_interval_seconds=0)])
    trainer.fit(Model(layers, hidden, heads), torch.utils.data.DataLoader(data, batch_size=batch))
    measured = {step: t for step, t in timer.times.items() if step >= 2}  # steps 0 and 1 warm up
    sampled = statistics.median(t for step, t in measured.items() if step % 2 == 0)
    unsampled = statistics.median(t for step, t in measured.items() if step % 2 == 1)
    sdpa, stats = attention_alone(batch, heads, heads // 2, length, hidden // heads, layers, device, 5 if args.quick else 9)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; tiny Llama {layers} layers, "
          f"{heads} heads ({heads // 2} kv), head dim {hidden // heads}, batch {batch}, sequence {length}")
    print(f"step time median: unsampled {unsampled * 1e3:.1f} ms, sampled {sampled * 1e3:.1f} ms, "
          f"ratio {sampled / unsampled:.3f}")
    print(f"amortised ratio at every_n_steps=50: {(49 * unsampled + sampled) / (50 * unsampled):.4f}")
    print(f"attention itself (sdpa forward+backward, all layers): {sdpa * 1e3:.1f} ms; "
          f"attention_statistics (all layers): {stats * 1e3:.1f} ms ({stats / sdpa:.2f}x the attention)")


if __name__ == "__main__":
    main()
