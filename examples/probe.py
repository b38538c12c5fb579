"""Linear probes during training: is this line of Python source a comment? Layer x position ROC-AUC.

Examples are 24-byte lines of the standard library's source, half of them comments (`# ...` after
the indentation), half code. Positions: the first non-blank byte, the second, and the last four bytes.

    python examples/probe.py --minutes 1.5
"""

import argparse
import os
import random

import torch
from _common import rerender_offline, standard_library_bytes, train_byte_llama

from lightning_heatmaps import ProbeHeatmap


def comment_lines(count: int = 160, length: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lines = bytes(standard_library_bytes()).split(b"\n")
    comments = [l for l in lines if l.strip().startswith(b"#") and len(l) >= length]
    code = [l for l in lines if l.strip() and not l.strip().startswith((b"#", b'"', b"'")) and len(l) >= length]
    rng = random.Random(seed)
    chosen = [(l, 1) for l in rng.sample(comments, count // 2)] + [(l, 0) for l in rng.sample(code, count // 2)]
    rng.shuffle(chosen)
    ids = torch.tensor([list(line[:length]) for line, _ in chosen])
    labels = torch.tensor([label for _, label in chosen])
    first = torch.tensor([len(line) - len(line.lstrip()) for line, _ in chosen]).clamp(max=length - 2)
    return ids, labels, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.5)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()
    ids, labels, first = comment_lines()
    callback = ProbeHeatmap(ids, labels, positions={"first_char": first, "second_char": first + 1},
                            offsets=[-4, -3, -2, -1], every_n_steps=100)
    trainer, heatmaps = train_byte_llama([callback], args.minutes, args.logdir, "probe")
    figures = rerender_offline(heatmaps, os.path.join(os.path.dirname(heatmaps), "figures"))
    print(f"{trainer.global_step} steps, {callback.evaluations} evaluations; figures: {figures}")


if __name__ == "__main__":
    main()
