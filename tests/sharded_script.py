"""Run by tests/test_sharded.py in a subprocess: training runs on one process or sharded on 2 CPU ranks (gloo).

    python tests/sharded_script.py OUT_DIR MODE

MODE:
- ``single``: one process, for each architecture (llama, gpt2, neox);
- ``fsdp2``: 2 ranks, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) with ``fully_shard``
  on every block and the root, for each architecture (gpt2 is built in ``__init__``, the others in
  ``configure_model``);
- ``fsdp1``: FSDPStrategy(use_orig_params=True) on up to 2 GPUs (CUDA only), each architecture;
  ``fsdp1-flat``: the same with use_orig_params=False, which must be refused; ``lens-fsdp1``: llama with a
  ``LogitLensHeatmap`` under FSDPStrategy(use_orig_params=True), which must be refused;
- ``tp``: 2 ranks of tensor parallelism (colwise q/k/v/up/gate, rowwise o/down): must be refused;
  ``tp-attention``: the same with an ``AttentionHeatmap`` alone, which must be refused too;
- ``lens-single`` / ``lens-fsdp2``: llama on one process / ``fsdp2`` on 2 ranks with the three lens callbacks
  (logit lens, probes, interventions), each evaluated at steps 0, 2 and 4, the root sharded with
  ``reshard_after_forward=True``; every rank prints how many evaluations it ran;
- ``resume``: ``fsdp2`` for llama, 4 steps with a distributed checkpoint, then resumed to 8 steps.

Each global batch is the same in every mode: one process takes 8 rows, rank r of 2 takes rows r, r+2, ...
"""

import os
import sys
import warnings
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import VOCAB, TokenModel  # noqa: E402

from lightning_heatmaps import (  # noqa: E402
    ActivationHeatmap, AttentionHeatmap, GradientHeatmap, InterventionHeatmap, LogitLensHeatmap, ProbeHeatmap,
)

warnings.filterwarnings("ignore")

ARCHITECTURES = ("llama", "gpt2", "neox")
DATA = torch.randint(0, VOCAB, (64, 12), generator=torch.Generator().manual_seed(0))
ACTIVATION_METRICS = ["rms", "l2", "mean_abs", "max_abs", "zero_fraction"]
GRADIENT_METRICS = ["grad_norm", "grad_rms", "grad_to_weight", "update_ratio", "weight_drift"]


def build(architecture: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if architecture == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(config)
        model.model.layers[0].mlp.gate_proj.requires_grad_(False)  # frozen: shown as missing, never 0
        return model
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    # 3 heads of 8: query_key_value has 72 rows, interleaved [q k v] per head (24 rows each). Two shards of
    # 36 rows: the boundary cuts through head 1's k rows (32..39).
    config = transformers.GPTNeoXConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                                        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(config)


def blocks(model: torch.nn.Module):
    inner = getattr(model, "model", None) or getattr(model, "transformer", None) or model.gpt_neox
    return inner.layers if hasattr(inner, "layers") else inner.h


class Sharded(TokenModel):
    def __init__(self, architecture: str, ranks: int, build_in_init: bool, tensor_parallel: bool = False,
                 reshard_root: bool | None = None) -> None:
        super().__init__(build(architecture) if build_in_init else None)
        self.architecture, self.ranks, self.tensor_parallel = architecture, ranks, tensor_parallel
        self.reshard_root = reshard_root  # None: FSDP2's default, the root stays gathered after its forward

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build(self.architecture)
        if self.ranks == 1 or getattr(self, "_sharded", False):
            return
        self._sharded = True
        if self.tensor_parallel:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                    "mlp.up_proj": ColwiseParallel(), "mlp.gate_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
            for block in blocks(self.model):
                parallelize_module(block, self.device_mesh["tensor_parallel"], plan)
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=self.reshard_root)

    def train_dataloader(self):
        rows = DATA[self.global_rank :: self.ranks]
        return torch.utils.data.DataLoader(rows, batch_size=8 // self.ranks, shuffle=False)


def fit(out_dir: str, architecture: str, ranks: int, callbacks, tensor_parallel=False, max_steps=4, ckpt_path=None,
        build_in_init=None, fsdp1=None, reshard_root=None, **options) -> L.Trainer:
    accelerator = "cpu"
    if fsdp1 is not None:
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

        accelerator, ranks = "cuda", min(2, torch.cuda.device_count())
        strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer, GPT2Block, GPTNeoXLayer}, use_orig_params=fsdp1,
                                timeout=timedelta(seconds=60))
    elif ranks == 1:
        strategy = "auto"
    elif tensor_parallel:
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2, process_group_backend="gloo",
                                         timeout=timedelta(seconds=60))
    else:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo",
                                         timeout=timedelta(seconds=60))
    trainer = L.Trainer(
        default_root_dir=os.path.join(out_dir, architecture), max_steps=max_steps, accelerator=accelerator, devices=ranks,
        strategy=strategy, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        use_distributed_sampler=False, callbacks=callbacks, **options,
    )
    if build_in_init is None:
        build_in_init = architecture == "gpt2"
    # Under FSDPStrategy, Lightning wraps the model itself: the module shards nothing on its own.
    module = Sharded(architecture, 1 if fsdp1 is not None else ranks, build_in_init, tensor_parallel, reshard_root)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def core_callbacks():
    return [ActivationHeatmap(every_n_steps=1, metrics=ACTIVATION_METRICS),
            GradientHeatmap(every_n_steps=1, metrics=GRADIENT_METRICS)]


def lens_callbacks():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(6, VOCAB, (32, 8), generator=generator)
    labels = torch.arange(32) % 2
    ids[labels == 1, 3] = 5  # readable from position 3 on
    return [LogitLensHeatmap([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12]], every_n_steps=2),
            ProbeHeatmap(ids, labels, positions={"fourth": [3] * 32}, offsets=[-1], every_n_steps=2),
            InterventionHeatmap([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]], subject_spans=[(1, 3), (0, 2)], window=2,
                                every_n_steps=2)]


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    if mode in ("single", "fsdp2"):
        for architecture in ARCHITECTURES:
            fit(out_dir, architecture, 1 if mode == "single" else 2, core_callbacks(), enable_checkpointing=False)
    elif mode in ("fsdp1", "fsdp1-flat"):  # needs CUDA: Lightning refuses FSDPStrategy on CPU
        for architecture in ARCHITECTURES:
            fit(out_dir, architecture, 2, core_callbacks(), fsdp1=mode == "fsdp1", enable_checkpointing=False)
    elif mode == "lens-fsdp1":  # needs CUDA
        fit(out_dir, "llama", 2, [LogitLensHeatmap([[3, 4, 5, 6, 7]], every_n_steps=2)], fsdp1=True, enable_checkpointing=False)
    elif mode == "tp":
        fit(out_dir, "llama", 2, core_callbacks(), tensor_parallel=True, enable_checkpointing=False)
    elif mode == "tp-attention":
        fit(out_dir, "llama", 2, [AttentionHeatmap(every_n_steps=1)], tensor_parallel=True, enable_checkpointing=False)
    elif mode in ("lens-single", "lens-fsdp2"):
        callbacks = lens_callbacks()
        # The root resharded after its forward too: the logit lens' decoder (root unit) is then gathered for it.
        trainer = fit(out_dir, "llama", 1 if mode == "lens-single" else 2, callbacks, reshard_root=True,
                      enable_checkpointing=False)
        counts = " ".join(f"{type(callback).__name__}={callback.evaluations}" for callback in callbacks)
        print(f"rank {trainer.global_rank} evaluations: {counts}", flush=True)
    elif mode == "resume":
        checkpoint = ModelCheckpoint(dirpath=os.path.join(out_dir, "checkpoints"), save_last=True)
        fit(out_dir, "llama", 2, [*core_callbacks(), checkpoint], max_steps=4)
        last = os.path.join(out_dir, "checkpoints", "last.ckpt")
        fit(out_dir, "llama", 2, core_callbacks(), max_steps=8, ckpt_path=last, enable_checkpointing=False)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
