"""Train a small Llama-style model on the Python standard library's own source, with layer heatmaps.

The model is built from a ``transformers.LlamaConfig`` with random weights and trained byte by byte
on the ``.py`` files that ship with Python, for about two minutes on 2 CPU cores. TensorBoard starts
beside the training (``--no-tensorboard`` to skip), on the HEATMAPS dashboard, so the heatmaps can be watched
filling in.

    python examples/train_llama_stdlib.py                 # ~2 minutes, TensorBoard on :6006
    python examples/train_llama_stdlib.py --minutes 0.5 --no-tensorboard
"""

from __future__ import annotations

import argparse
import os
import time

import lightning as L
import torch
from _common import ByteLlama, ByteWindows, rerender_offline, standard_library_bytes, start_tensorboard
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap


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
        print(f"To look again: tensorboard --logdir {args.logdir} --samples_per_plugin images=100,lightning_heatmaps=0 "
              f"and open http://localhost:6006/#lightning_heatmaps")


if __name__ == "__main__":
    main()
