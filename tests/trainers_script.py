"""Run by tests/test_trainers.py in a subprocess: the same tiny Llama, data and seed under each trainer.

    python tests/trainers_script.py OUT_DIR lightning|loop|loop_ddp|fabric|fabric_ddp|hf [plain|clip|accumulation|peft]

Global batch b = rows 4b .. 4b+3 of DATA; one process takes all 4, rank r of 2 takes rows 4b+r and 4b+r+2.
Every run: AdamW(lr=1e-2), 5 optimizer steps, ActivationHeatmap/Monitor (rms) and GradientHeatmap/Monitor
(grad_norm, update_ratio) every 2 steps; Lightning, Fabric and the plain hf runs also AttentionHeatmap. Scalars go to the TensorBoard run under OUT_DIR.
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import VOCAB, tiny_llama  # noqa: E402

warnings.filterwarnings("ignore")

DATA = torch.randint(0, VOCAB, (20, 12), generator=torch.Generator().manual_seed(0))
STEPS, EVERY = 5, 2
GRADIENT_METRICS = ["grad_norm", "update_ratio"]


def rows(rank: int, world: int) -> torch.Tensor:
    return DATA.view(STEPS, 4, 12)[:, rank::world].reshape(-1, 12)


def loader(rank: int, world: int):
    return torch.utils.data.DataLoader(rows(rank, world), batch_size=4 // world, shuffle=False)


def model_and_optimizer():
    torch.manual_seed(0)
    model = tiny_llama(2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def run_lightning(out_dir: str) -> None:
    import lightning as L

    from lightning_heatmaps import ActivationHeatmap, AttentionHeatmap, GradientHeatmap

    from conftest import TokenModel

    class Model(TokenModel):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    model = Model(tiny_llama(2))
    trainer = L.Trainer(
        default_root_dir=out_dir, max_steps=STEPS, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        callbacks=[ActivationHeatmap(every_n_steps=EVERY, min_render_interval_seconds=0),
                   GradientHeatmap(metrics=GRADIENT_METRICS, every_n_steps=EVERY, min_render_interval_seconds=0),
                   AttentionHeatmap(every_n_steps=EVERY, min_render_interval_seconds=0)],
    )
    trainer.fit(model, loader(0, 1))


def run_loop(out_dir: str, rank: int = 0, world: int = 1) -> None:
    from lightning_heatmaps.core import ActivationMonitor, GradientMonitor
    from lightning_heatmaps.loop import Monitor

    model, optimizer = model_and_optimizer()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    monitor = Monitor(model, [ActivationMonitor(every_n_steps=EVERY, min_render_interval_seconds=0),
                              GradientMonitor(metrics=GRADIENT_METRICS, every_n_steps=EVERY, min_render_interval_seconds=0)],
                      log_dir=os.path.join(out_dir, "run"))
    for batch in loader(rank, world):
        with monitor.step():
            loss = model(input_ids=batch, labels=batch).loss
            monitor.backward(loss)
            monitor.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
    monitor.close()


def run_fabric(out_dir: str, world: int = 1) -> None:
    import datetime

    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger
    from lightning.fabric.strategies import DDPStrategy

    from lightning_heatmaps.fabric import ActivationHeatmap, AttentionHeatmap, GradientHeatmap

    callbacks = [ActivationHeatmap(every_n_steps=EVERY, min_render_interval_seconds=0),
                 GradientHeatmap(metrics=GRADIENT_METRICS, every_n_steps=EVERY, min_render_interval_seconds=0),
                 AttentionHeatmap(every_n_steps=EVERY, min_render_interval_seconds=0)]
    strategy = DDPStrategy(timeout=datetime.timedelta(seconds=60)) if world > 1 else "auto"
    fabric = L.Fabric(accelerator="cpu", devices=world, strategy=strategy, callbacks=callbacks,
                      loggers=TensorBoardLogger(out_dir))
    fabric.launch()
    model, optimizer = model_and_optimizer()
    model, optimizer = fabric.setup(model, optimizer)
    for batch in loader(fabric.global_rank, world):
        fabric.call("on_train_batch_start")
        loss = model(input_ids=batch, labels=batch).loss
        fabric.backward(loss)
        fabric.call("on_before_optimizer_step")
        optimizer.step()
        optimizer.zero_grad()
    fabric.call("on_train_end")


def _ddp_worker(rank: int, out_dir: str, mode: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
    import datetime

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        run_loop(out_dir, rank, 2)
    finally:
        torch.distributed.destroy_process_group()


class Rows(torch.utils.data.IterableDataset):
    """The rows in order (no sampler, no shuffling): under DDP accelerate hands each rank its part of every batch."""

    def __iter__(self):
        for row in DATA:
            yield {"input_ids": row, "labels": row}


def run_hf(out_dir: str, variant: str) -> None:
    import transformers

    from lightning_heatmaps.hf import ActivationHeatmap, AttentionHeatmap, GradientHeatmap

    world = int(os.environ.get("WORLD_SIZE", 1))
    model, optimizer = model_and_optimizer()
    if variant == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accumulation = 2 if variant == "accumulation" else 1
    args = transformers.TrainingArguments(
        output_dir=out_dir, use_cpu=True, report_to=["tensorboard"] if variant != "no_tensorboard" else [],
        max_steps=STEPS, logging_steps=1,
        per_device_train_batch_size=4 // world // accumulation, gradient_accumulation_steps=accumulation,
        max_grad_norm=1e-5 if variant == "clip" else 0.0, save_strategy="no", disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None, ddp_timeout=60, seed=0, data_seed=0,
    )
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(out_dir, "run")  # transformers 5: the TensorBoard run
    callbacks = [ActivationHeatmap(every_n_steps=1, min_render_interval_seconds=0),
                 GradientHeatmap(metrics=GRADIENT_METRICS, every_n_steps=1, min_render_interval_seconds=0)]
    if variant == "plain":
        callbacks.append(AttentionHeatmap(every_n_steps=1, min_render_interval_seconds=0))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Rows(), callbacks=callbacks,
        optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)),
    )
    trainer.train()


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    if os.environ.get("TRAINERS_SCRIPT_TRACEBACK_AFTER"):  # a hang shows where every rank waits
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["TRAINERS_SCRIPT_TRACEBACK_AFTER"]), exit=True)
    if mode == "loop_ddp":
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        torch.multiprocessing.spawn(_ddp_worker, args=(out_dir, mode, port), nprocs=2)
    elif mode.startswith("hf"):
        run_hf(out_dir, sys.argv[3] if len(sys.argv) > 3 else "plain")
    else:
        {"lightning": run_lightning, "loop": run_loop, "fabric": run_fabric,
         "fabric_ddp": lambda directory: run_fabric(directory, 2)}[mode](out_dir)


if __name__ == "__main__":
    main()
