"""Heatmaps under the Hugging Face ``transformers.Trainer`` (and trainers built on it, e.g. ``trl``'s).

``ActivationHeatmap``, ``GradientHeatmap``, ``ExpertHeatmap`` and ``AttentionHeatmap`` here are ``TrainerCallback``s with the same
arguments as the Lightning callbacks, over the same core monitors::

    from lightning_heatmaps.hf import ActivationHeatmap, GradientHeatmap
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[ActivationHeatmap(), GradientHeatmap(metrics=["grad_norm", "update_ratio"])])

How the Trainer's events map onto the core (transformers >= 4.46, the first with ``on_pre_optimizer_step``):

- **Steps.** A sample is logged at the ``state.global_step`` the Trainer gives the optimizer step it belongs to
  after taking it, the step its own ``train/loss`` of that step is logged at; a step is sampled when that number
  is a multiple of ``every_n_steps`` (default: ``args.logging_steps``, so samples and ``train/*`` scalars share
  steps). With gradient accumulation, the micro-batches of the sampled step are pooled exactly.
- **Gradients before clipping.** The Trainer clips (``accelerator.clip_grad_norm_``, which also unscales fp16
  gradients) before its ``on_pre_optimizer_step``. At ``on_train_begin`` each callback wraps that public method
  of this Trainer's own accelerator (an instance attribute, removed at ``on_train_end``) and reads the gradients at
  its entry: accumulated, before clipping; with fp16 the scaler's scale is divided out. Recent Trainers call it at
  every optimizer step (with ``max_norm=inf`` when ``max_grad_norm=0``); where it is not called,
  ``on_pre_optimizer_step`` reads the (then unclipped) gradients. A step the fp16 scaler skips is not a sample.
- **Outputs.** Rank zero writes into the run of the Trainer's ``TensorBoardCallback`` (``report_to`` includes
  ``tensorboard``) through its own ``SummaryWriter``, never a second writer on its directory; without it, into
  ``<output_dir>/heatmaps``. All ranks measure and join the collectives (DDP).
- **Refused:** DeepSpeed and FSDP (one process and DDP are supported); ``ActivationHeatmap`` and
  ``AttentionHeatmap`` with ``gradient_checkpointing`` (the Trainer has no hook before backward, so re-run
  forwards would count twice).

The Trainer is found at ``on_train_begin`` as the ``Trainer`` whose method called the hook (the callback keeps
no reference before); checkpoint state of the histories is not saved with the Trainer's checkpoints.
"""

from __future__ import annotations

import inspect
import math
import os
from importlib.metadata import version
from typing import Any

from packaging.version import Version

from lightning_heatmaps.core.activation import ActivationMonitor
from lightning_heatmaps.core.attention import AttentionMonitor
from lightning_heatmaps.core.context import RunContext
from lightning_heatmaps.core.expert import ExpertMonitor
from lightning_heatmaps.core.gradient import GradientMonitor
from lightning_heatmaps.core.monitor import HeatmapMonitor

#: The oldest transformers with the hooks this needs (``on_pre_optimizer_step``, ``on_optimizer_step``).
TRANSFORMERS_FLOOR = "4.46.0"

try:
    _installed = version("transformers")
except Exception:  # not installed
    _installed = None
if _installed is None or Version(_installed) < Version(TRANSFORMERS_FLOOR):
    raise ImportError(
        f"lightning_heatmaps.hf needs transformers>={TRANSFORMERS_FLOOR} (found {_installed or 'none'}): "
        "install it with `pip install 'lightning-heatmaps[hf]'`."
    )

from transformers import Trainer, TrainerCallback  # noqa: E402

__all__ = ["ActivationHeatmap", "AttentionHeatmap", "ExpertHeatmap", "GradientHeatmap", "TRANSFORMERS_FLOOR"]

# accelerator id -> (the original bound clip_grad_norm_, the callbacks reading at its entry)
_CLIP_READERS: dict[int, tuple[Any, list[_TrainerAdapter]]] = {}


def _calling_trainer() -> Trainer | None:
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _install_clip_reader(accelerator: Any, callback: _TrainerAdapter) -> None:
    key = id(accelerator)
    if key not in _CLIP_READERS:
        original = accelerator.clip_grad_norm_
        readers: list[_TrainerAdapter] = []

        def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2, **kwargs: Any) -> Any:
            parameters = list(parameters)  # may be a generator: read and clip the same ones
            for reader in readers:
                reader._read_before_clipping()
            return original(parameters, max_norm, norm_type, **kwargs)

        accelerator.clip_grad_norm_ = clip_grad_norm_
        _CLIP_READERS[key] = (original, readers)
    _CLIP_READERS[key][1].append(callback)


def _remove_clip_reader(accelerator: Any, callback: _TrainerAdapter) -> None:
    entry = _CLIP_READERS.get(id(accelerator))
    if entry is None:
        return
    original, readers = entry
    if callback in readers:
        readers.remove(callback)
    if not readers:
        del accelerator.clip_grad_norm_  # the instance attribute: the class's method shows through again
        del _CLIP_READERS[id(accelerator)]


class _TrainerAdapter(HeatmapMonitor, TrainerCallback):
    """Translates the Trainer's events into the core monitor's (see the module docstring)."""

    _trainer: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        trainer = _calling_trainer()
        if trainer is None:
            raise RuntimeError(f"{type(self).__name__} (lightning_heatmaps.hf) must be called by a transformers.Trainer.")
        accelerator = trainer.accelerator
        distributed = str(getattr(accelerator, "distributed_type", "")).upper()
        if getattr(args, "deepspeed", None) or "DEEPSPEED" in distributed:
            raise RuntimeError(f"{type(self).__name__} does not support DeepSpeed; supported: one process and DDP.")
        if getattr(args, "fsdp", None) or "FSDP" in distributed:
            raise RuntimeError(f"{type(self).__name__} under the Hugging Face Trainer does not support FSDP; "
                               "supported: one process and DDP (FSDP is supported with Lightning).")
        self._check_trainer(args)
        self._trainer = trainer
        default_every = args.logging_steps
        if default_every < 1:  # a ratio of the run's steps, as the Trainer reads it
            default_every = math.ceil(state.max_steps * default_every)
        board = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback"), None)
        writer = getattr(board, "tb_writer", None) if board is not None else None
        if writer is not None:
            context = RunContext.for_directory(writer.log_dir, writer=writer, default_every_n_steps=int(default_every),
                                               trainer="Trainer")
        else:
            directory = os.path.join(args.output_dir, "heatmaps")
            context = RunContext.for_directory(directory, default_every_n_steps=int(default_every), trainer="Trainer",
                                               files_dir=directory)
        self._hf_context = context
        self.attach(trainer.model_wrapped if trainer.model_wrapped is not None else model, context)
        self.begin_training()
        _install_clip_reader(accelerator, self)

    def _check_trainer(self, args: Any) -> None:
        """Refuse a Trainer setting this monitor cannot measure correctly."""

    def _read_before_clipping(self) -> None:
        if self._sample_step is None:
            return  # not a sampled step: no read, and no host sync for the scale
        scaler = getattr(self._trainer.accelerator, "scaler", None)
        # At the entry of clip_grad_norm_, fp16 gradients still carry the loss scale (it unscales inside).
        self.before_optimizer_step(scaler.get_scale() if scaler is not None and scaler.is_enabled() else None)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin_micro_batch(state.global_step + 1)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end_micro_batch(state.global_step + 1)
        self.begin_micro_batch(state.global_step + 1)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.before_backward()  # no hook before backward: collection stops here at the latest
        if getattr(self._trainer.accelerator, "scaler", None) is None:
            self.before_optimizer_step()  # only if clip_grad_norm_ was not called (then nothing clipped)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer.accelerator.optimizer_step_was_skipped:
            self.skip_sample()  # the fp16 scaler skipped it: the weights did not change, no sample

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end_micro_batch(state.global_step + 1)  # the sampled step (state.global_step) is over
        if control.should_training_stop or state.global_step >= state.max_steps:
            # Before the TensorBoardCallback closes its writer in its on_train_end (it runs before ours).
            self.end_training()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer is None:
            return
        try:
            if self._sample_step is not None or self._pending:
                self.end_training()
        finally:
            _remove_clip_reader(self._trainer.accelerator, self)
            self.close()
            self._hf_context.close()
            self._trainer = None


def _refuse_gradient_checkpointing(callback: HeatmapMonitor, args: Any) -> None:
    if getattr(args, "gradient_checkpointing", False):
        raise RuntimeError(
            f"{type(callback).__name__} (lightning_heatmaps.hf) does not support gradient_checkpointing=True: the "
            "Trainer offers no hook before backward, so forwards re-run during backward would be counted twice."
        )


class ActivationHeatmap(ActivationMonitor, _TrainerAdapter):
    """:class:`lightning_heatmaps.ActivationHeatmap` for the Hugging Face ``Trainer`` (same arguments).

    Example:
        >>> callback = ActivationHeatmap(every_n_steps=10)  # Trainer(..., callbacks=[callback])
    """

    def _check_trainer(self, args: Any) -> None:
        _refuse_gradient_checkpointing(self, args)


class GradientHeatmap(GradientMonitor, _TrainerAdapter):
    """:class:`lightning_heatmaps.GradientHeatmap` for the Hugging Face ``Trainer`` (same arguments);
    gradients are read before the Trainer clips them (see :mod:`lightning_heatmaps.hf`).

    Example:
        >>> callback = GradientHeatmap(metrics=["grad_norm", "update_ratio"])  # Trainer(..., callbacks=[callback])
    """


class ExpertHeatmap(ExpertMonitor, _TrainerAdapter):
    """:class:`lightning_heatmaps.ExpertHeatmap` for the Hugging Face ``Trainer`` (same arguments).

    Example:
        >>> callback = ExpertHeatmap(every_n_steps=10)  # Trainer(..., callbacks=[callback])
    """


class AttentionHeatmap(AttentionMonitor, _TrainerAdapter):
    """:class:`lightning_heatmaps.AttentionHeatmap` for the Hugging Face ``Trainer`` (same arguments).

    Example:
        >>> callback = AttentionHeatmap(every_n_steps=10)  # Trainer(..., callbacks=[callback])
    """

    def _check_trainer(self, args: Any) -> None:
        _refuse_gradient_checkpointing(self, args)
