"""Logit lens during training: token x layer divergence of a byte-level Llama on Python source.

    python examples/logit_lens.py --minutes 1.5
"""

import argparse
import os

from _common import byte_labels, byte_tokenizer, rerender_offline, train_byte_llama

from lightning_heatmaps import LogitLensHeatmap

PROMPTS = ["    def __init__(self, name):\n        self.name = name", "import os\nfrom collections import defaultdict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.5)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()
    ids = [byte_tokenizer(text) for text in PROMPTS]
    callback = LogitLensHeatmap(ids, token_labels=[byte_labels(i) for i in ids], every_n_steps=100)
    trainer, heatmaps = train_byte_llama([callback], args.minutes, args.logdir, "logit_lens")
    figures = rerender_offline(heatmaps, os.path.join(os.path.dirname(heatmaps), "figures"))
    print(f"{trainer.global_step} steps, {callback.evaluations} evaluations; figures: {figures}")


if __name__ == "__main__":
    main()
