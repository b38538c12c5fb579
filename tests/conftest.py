"""Shared test helpers: tiny real models, a real Trainer, an independent reference, event-file readers."""

from __future__ import annotations

import io
import math
import warnings
from collections import defaultdict
from collections.abc import Callable

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")

VOCAB = 48


def tiny_llama(layers: int = 2, **extra):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, **extra,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(layers: int = 2):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tiny_neox(layers: int = 2):
    import transformers

    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(config)


def tiny_bert(layers: int = 2):
    import transformers

    config = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.BertForMaskedLM(config)


class TokenModel(L.LightningModule):
    """A LightningModule around a Hugging Face model trained on random tokens (labels = inputs)."""

    def __init__(self, model: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def predict_step(self, batch, batch_idx):
        return self.model(input_ids=batch).logits

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class EncoderModel(L.LightningModule):
    """``nn.TransformerEncoder`` on random vectors, regressing to zero."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                                             num_layers=layers, enable_nested_tensor=False)

    def training_step(self, batch, batch_idx):
        return self.encoder(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def token_loader(batches: int = 8, batch_size: int = 4, length: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (batches * batch_size, length), generator=generator)
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def vector_loader(batches: int = 8, batch_size: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.randn(batches * batch_size, 5, 16, generator=generator), batch_size=batch_size)


def make_trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    options = dict(default_root_dir=tmp_path, max_steps=5, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, log_every_n_steps=1, accelerator="cpu", devices=1)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


class ReferenceActivations(Callback):
    """Independent reference: sum of squares and element count of chosen module outputs per sampled step.

    ``targets`` maps a key to ``(module name, slicer)``; the slicer takes ``(args, output)`` and returns
    the tensor the component's activation should be. Only training forwards before backward count.
    """

    def __init__(self, every_n_steps: int, targets: dict[str, tuple[str, Callable]]) -> None:
        self.every_n_steps = every_n_steps
        self.targets = targets
        self.sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0, 0.0]))
        self.step: int | None = None
        self.handles = []

    def on_train_start(self, trainer, pl_module):
        modules = dict(pl_module.named_modules())
        for key, (name, slicer) in self.targets.items():
            def hook(module, args, output, key=key, slicer=slicer):
                if self.step is None:
                    return
                value = slicer(args, output).detach().double()
                entry = self.sums[self.step][key]
                entry[0] += float(value.square().sum())
                entry[1] += value.numel()
                entry[2] = max(entry[2], float(value.abs().max()))
            self.handles.append(modules[name].register_forward_hook(hook))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.step = step if step % self.every_n_steps == 0 else None

    def on_before_backward(self, trainer, pl_module, loss):
        self.step = None

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()

    def rms(self, step: int, keys: list[str]) -> float:
        total = sum(self.sums[step][k][0] for k in keys)
        count = sum(self.sums[step][k][1] for k in keys)
        return math.sqrt(total / count)


class ReferenceGradients(Callback):
    """Independent reference: per key, the gradients and weights of chosen parameter slices per sampled step."""

    def __init__(self, every_n_steps: int, targets: dict[str, list[tuple[str, Callable]]]) -> None:
        self.every_n_steps = every_n_steps
        self.targets = targets
        self.grad_sq: dict[int, dict[str, float]] = defaultdict(dict)
        self.weight_sq: dict[int, dict[str, float]] = defaultdict(dict)
        self.update_sq: dict[int, dict[str, float]] = defaultdict(dict)
        self.drift_sq: dict[int, dict[str, float]] = defaultdict(dict)
        self.initial_sq: dict[str, float] = {}
        self.numel: dict[str, int] = {}

    def _each(self, pl_module, tensor_of):
        params = dict(pl_module.named_parameters())
        result = {}
        for key, refs in self.targets.items():
            result[key] = sum(float(slicer(tensor_of(name, params[name])).double().square().sum()) for name, slicer in refs)
            self.numel[key] = sum(slicer(params[name]).numel() for name, slicer in refs)
        return result

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.initial_sq = self._each(pl_module, lambda n, p: self.initial[n])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        self.grad_sq[step] = self._each(pl_module, lambda n, p: p.grad)
        self.weight_sq[step] = self._each(pl_module, lambda n, p: p.detach())
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.before_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(self, "before", None) is None:
            return
        step = self.before_step
        self.update_sq[step] = self._each(pl_module, lambda n, p: p.detach() - self.before[n])
        self.drift_sq[step] = self._each(pl_module, lambda n, p: p.detach() - self.initial[n])
        self.before = None


def read_events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def magenta_pixels(rgb: np.ndarray) -> int:
    """Pixels of the renderer's non-finite colour (#e6007e)."""
    return int(np.sum((np.abs(rgb[..., 0].astype(int) - 0xE6) < 8) & (rgb[..., 1] < 12) & (np.abs(rgb[..., 2].astype(int) - 0x7E) < 8)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
