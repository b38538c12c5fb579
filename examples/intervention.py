"""Causal interventions during training: which layers carry the module name into the next byte?

Prompts are import lines; the subject is the module name, the site of interest the last byte.

    python examples/intervention.py --minutes 1.5
"""

import argparse
import os

from _common import byte_tokenizer, rerender_offline, train_byte_llama

from lightning_heatmaps import InterventionHeatmap

PROMPTS = [("from collections import ", "collections"), ("from itertools import ", "itertools"),
           ("from functools import ", "functools"), ("from typing import ", "typing")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.5)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()
    ids = [byte_tokenizer(text) for text, _ in PROMPTS]
    spans = [(text.index(subject), text.index(subject) + len(subject)) for text, subject in PROMPTS]
    # Zero-ablation: in this small byte model, noise of 3 embedding standard deviations is small next to the
    # residual stream of deeper layers, so the default noise corruption barely shows.
    callback = InterventionHeatmap(ids, spans, corruption="zero", window=3, every_n_steps=100)
    trainer, heatmaps = train_byte_llama([callback], args.minutes, args.logdir, "intervention")
    figures = rerender_offline(heatmaps, os.path.join(os.path.dirname(heatmaps), "figures"))
    print(f"{trainer.global_step} steps, {callback.evaluations} evaluations; figures: {figures}")


if __name__ == "__main__":
    main()
