"""Run by tests/test_distributed.py in a subprocess: one training run, single process or 2-rank DDP.

    python tests/ddp_script.py OUT_DIR single|ddp [FAIL_AT_STEP]
"""

import sys
import warnings

import lightning as L
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import TokenModel, VOCAB, tiny_llama  # noqa: E402

from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, InterventionHeatmap, LogitLensHeatmap  # noqa: E402

warnings.filterwarnings("ignore")


DATA = torch.randint(0, VOCAB, (48, 12), generator=torch.Generator().manual_seed(0))


class Failing(TokenModel):
    """Global batch b = samples 8b .. 8b+7: one process takes all 8, rank r of 2 takes 8b+r, 8b+r+2, ..."""

    def __init__(self, model, fail_at, ranks):
        super().__init__(model)
        self.fail_at, self.ranks = fail_at, ranks

    def train_dataloader(self):
        rows = DATA[self.global_rank :: self.ranks]
        return torch.utils.data.DataLoader(rows, batch_size=8 // self.ranks, shuffle=False)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.trainer.global_step == self.fail_at:
            raise RuntimeError("rank 1 fails on purpose")
        return super().training_step(batch, batch_idx)


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    fail_at = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    torch.manual_seed(0)
    ddp = mode == "ddp"
    model = Failing(tiny_llama(2), fail_at, ranks=2 if ddp else 1)
    trainer = L.Trainer(
        default_root_dir=out_dir, max_steps=4, accelerator="cpu", devices=2 if ddp else 1,
        strategy="ddp_spawn" if ddp else "auto", enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, use_distributed_sampler=False,
        callbacks=[ActivationHeatmap(every_n_steps=1, metrics=["rms", "max_abs"]), GradientHeatmap(every_n_steps=1),
                   LogitLensHeatmap([[3, 4, 5, 6]], every_n_steps=2), InterventionHeatmap([[3, 4, 5, 6]], [(0, 2)], every_n_steps=2)],
    )
    trainer.fit(model)


if __name__ == "__main__":
    main()
