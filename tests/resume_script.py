"""One fit of a tiny Llama with a lambda ``modules`` selection, in a process of its own (resume tests).

Usage: ``python resume_script.py OUT_DIR MAX_STEPS [CHECKPOINT]``; prints the last checkpoint's path.
"""

import os
import sys

import lightning as L

sys.path.insert(0, os.path.dirname(__file__))

from conftest import TokenModel, tiny_llama, token_loader  # noqa: E402

from lightning_heatmaps import ActivationHeatmap  # noqa: E402

if __name__ == "__main__":
    out_dir, max_steps = sys.argv[1], int(sys.argv[2])
    checkpoint = sys.argv[3] if len(sys.argv) > 3 else None
    L.seed_everything(0)
    # A lambda: its repr holds a memory address, which differs in the process that resumes.
    select = lambda name, module: (int(name.split(".")[-2]), "mlp") if name.endswith("mlp") and "layers" in name else None  # noqa: E731
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, default_root_dir=out_dir,
                        logger=L.pytorch.loggers.TensorBoardLogger(out_dir, name="run", version=0),
                        callbacks=[ActivationHeatmap(every_n_steps=2, modules=select)])
    trainer.fit(TokenModel(tiny_llama(2)), token_loader(batches=16), ckpt_path=checkpoint)
    print(trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path)
