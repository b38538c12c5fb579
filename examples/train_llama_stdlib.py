"""Train a small Llama-style model on the Python standard library's own source, with layer heatmaps.

The model is built from a ``transformers.LlamaConfig`` with random weights and trained byte by byte
on the ``.py`` files that ship with Python, for about two minutes on 2 CPU cores. TensorBoard starts
beside the training (``--no-tensorboard`` to skip) so the heatmaps can be watched filling in.

    python examples/train_llama_stdlib.py                 # ~2 minutes, TensorBoard on :6006
    python examples/train_llama_stdlib.py --minutes 0.5 --no-tensorboard
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_heatmaps import GRADIENT_METRICS, ActivationHeatmap, GradientHeatmap, heatmap_figure
from lightning_heatmaps.render import figure_to_rgb, rgb_to_png


def standard_library_bytes(limit: int = 8_000_000) -> np.ndarray:
    """The bytes of the standard library's ``.py`` files (sorted, so every run sees the same text)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py"))):
        if "site-packages" in path or "test" in os.path.basename(os.path.dirname(path)):
            continue
        with open(path, "rb") as file:
            data = file.read()
        chunks.append(np.frombuffer(data, dtype=np.uint8))
        total += len(data)
        if total >= limit:
            break
    return np.concatenate(chunks)


class ByteWindows(torch.utils.data.Dataset):
    """Random windows of ``length + 1`` bytes (inputs and next-byte targets)."""

    def __init__(self, data: np.ndarray, length: int, count: int, seed: int) -> None:
        self.data = torch.from_numpy(data.astype(np.int64))
        self.length = length
        self.offsets = torch.randint(0, len(data) - length - 1, (count,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(self.offsets[index])
        return self.data[start : start + self.length + 1]


class ByteLlama(L.LightningModule):
    def __init__(self, hidden: int, layers: int, lr: float) -> None:
        super().__init__()
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
        self.model = transformers.LlamaForCausalLM(config)
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        return optimizer


def start_tensorboard(logdir: str, port: int) -> subprocess.Popen | None:
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--port", str(port),
               "--samples_per_plugin", "images=100", "--reload_interval", "5"]
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as error:
        print(f"Could not start TensorBoard ({error}); run: {' '.join(command)}")
        return None
    print(f"TensorBoard: http://localhost:{port}/  (IMAGES tab for the heatmaps, SCALARS for per-layer values)")
    return process


def rerender_offline(heatmap_dir: str, out_dir: str) -> list[str]:
    """Re-render every saved matrix (``.npz``) into PNG files: figures can be remade without the run."""
    written = []
    for path in sorted(glob.glob(os.path.join(heatmap_dir, "*", "*.npz"))):
        saved = np.load(path)
        metric, name = str(saved["metric"]), os.path.splitext(os.path.basename(path))[0]
        style = {"log_scale": metric in {d.name for d in GRADIENT_METRICS.values()}}
        if "steps" in saved:
            figure = heatmap_figure(saved["values"], row_labels=list(saved["layer_labels"]), column_steps=saved["steps"],
                                    xlabel="step", colorbar_label=metric, title=f"{metric}: layer x step", **style)
        else:
            figure = heatmap_figure(saved["values"], row_labels=list(saved["layer_labels"]),
                                    column_labels=list(saved["component_labels"]), missing=saved["missing"],
                                    xlabel="component", colorbar_label=metric,
                                    title=f"{metric}: layer x component (step {int(saved['step'])})", **style)
        target = os.path.join(out_dir, f"{metric}_{name}.png")
        os.makedirs(out_dir, exist_ok=True)
        with open(target, "wb") as file:
            file.write(rgb_to_png(figure_to_rgb(figure)))
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="training time (default: 2)")
    parser.add_argument("--logdir", default="runs", help="TensorBoard log directory (default: runs)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--every-n-steps", type=int, default=5)
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--no-tensorboard", action="store_true", help="do not start TensorBoard")
    parser.add_argument("--keep-tensorboard", action="store_true", help="keep TensorBoard running after training")
    args = parser.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    L.seed_everything(0, verbose=False)
    data = standard_library_bytes()
    split = int(len(data) * 0.95)
    train = torch.utils.data.DataLoader(ByteWindows(data[:split], 128, 200_000, seed=0), batch_size=8, shuffle=False)
    val = torch.utils.data.DataLoader(ByteWindows(data[split:], 128, 64, seed=1), batch_size=16)
    print(f"Training on {len(data) / 1e6:.1f} MB of standard-library source for {args.minutes:g} minutes.")

    logger = TensorBoardLogger(args.logdir, name="llama_stdlib")
    tensorboard = None if args.no_tensorboard else start_tensorboard(args.logdir, args.port)
    callbacks = [
        ActivationHeatmap(every_n_steps=args.every_n_steps, metrics=["rms", "max_abs"], min_render_interval_seconds=15),
        GradientHeatmap(every_n_steps=args.every_n_steps, metrics=["grad_norm", "update_ratio"], min_render_interval_seconds=15),
    ]
    trainer = L.Trainer(
        max_time={"seconds": int(args.minutes * 60)}, logger=logger, callbacks=callbacks, log_every_n_steps=5,
        val_check_interval=100, limit_val_batches=4, enable_checkpointing=False, accelerator="cpu", devices=1,
    )
    started = time.time()
    trainer.fit(ByteLlama(args.hidden, args.layers, lr=3e-3), train, val)
    heatmaps = os.path.join(logger.log_dir, "heatmaps")
    figures = rerender_offline(heatmaps, os.path.join(logger.log_dir, "figures"))
    print(f"Trained {trainer.global_step} steps in {time.time() - started:.0f} s.")
    print(f"Heatmap matrices (.npz): {heatmaps}")
    print(f"Re-rendered from them: {len(figures)} PNG files in {os.path.join(logger.log_dir, 'figures')}")
    if tensorboard is not None:
        if args.keep_tensorboard:
            print(f"TensorBoard keeps running at http://localhost:{args.port}/ ; Ctrl+C to stop.")
            try:
                tensorboard.wait()
            except KeyboardInterrupt:
                pass
        tensorboard.terminate()
        print(f"To look again: tensorboard --logdir {args.logdir} --samples_per_plugin images=100")


if __name__ == "__main__":
    main()
