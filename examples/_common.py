"""Shared by the examples: standard-library text as bytes, a byte-level Llama, TensorBoard, offline figures."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig

import lightning as L
import numpy as np
import torch

from lightning_heatmaps import GRADIENT_METRICS, heatmap_figure
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
    """Start TensorBoard on ``logdir`` in the background, keeping every sample of the HEATMAPS dashboard
    (``lightning_heatmaps=0``) and 100 images per tag; its output goes to ``<logdir>/tensorboard.log``."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--port", str(port),
               "--samples_per_plugin", "images=100,lightning_heatmaps=0", "--reload_interval", "5"]
    os.makedirs(logdir, exist_ok=True)
    log = open(os.path.join(logdir, "tensorboard.log"), "w")
    try:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError as error:
        print(f"Could not start TensorBoard ({error}); run: {' '.join(command)}")
        return None
    print(f"TensorBoard, on the HEATMAPS dashboard: http://localhost:{port}/#lightning_heatmaps\n"
          f"  (it fills in at every sample; hover a cell for its value, click it for its curve. IMAGES has the PNGs, "
          f"SCALARS the per-layer values; TensorBoard's log: {log.name})")
    return process


def rerender_offline(heatmap_dir: str, out_dir: str) -> list[str]:
    """Re-render every saved matrix (``.npz``) into PNG files: figures can be remade without the run."""
    written = []
    for path in sorted(glob.glob(os.path.join(heatmap_dir, "*", "*.npz"))):
        saved = np.load(path)
        metric, name = str(saved["metric"]), os.path.splitext(os.path.basename(path))[0]
        style = {"log_scale": metric in {d.name for d in GRADIENT_METRICS.values()}}
        if "row_labels" in saved:  # a lens heatmap (token x layer, layer x position, layer x site)
            figure = heatmap_figure(saved["values"], row_labels=list(saved["row_labels"]), column_labels=list(saved["column_labels"]),
                                    xlabel="", colorbar_label=metric, title=f"{metric}: {name} (step {int(saved['step'])})")
        elif "steps" in saved:
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


def byte_tokenizer(text: str) -> list[int]:
    """Bytes are the tokens of the examples' model (vocabulary 256)."""
    return list(text.encode("utf-8"))


def byte_labels(ids: list[int]) -> list[str]:
    return [repr(chr(i))[1:-1] if 32 <= i < 127 else f"\\x{i:02x}" for i in ids]


def train_byte_llama(callbacks: list, minutes: float, logdir: str, name: str, layers: int = 6) -> tuple[L.Trainer, str]:
    """Train the examples' byte-level Llama on standard-library source with ``callbacks``; return the trainer
    and the directory of its heatmap files."""
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    L.seed_everything(0, verbose=False)
    data = standard_library_bytes()
    loader = torch.utils.data.DataLoader(ByteWindows(data, 128, 200_000, seed=0), batch_size=8)
    logger = TensorBoardLogger(logdir, name=name)
    trainer = L.Trainer(max_time={"seconds": int(minutes * 60)}, logger=logger, callbacks=callbacks, log_every_n_steps=10,
                        enable_checkpointing=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer.fit(ByteLlama(128, layers, lr=3e-3), loader)
    return trainer, os.path.join(logger.log_dir, "heatmaps")
