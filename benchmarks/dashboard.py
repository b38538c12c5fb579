"""The HEATMAPS dashboard on a big run: what writing the matrices costs, the payload, and render times in a browser.

    python benchmarks/dashboard.py            # 48 layers x 8 components (+ all) x 5000 samples
    python benchmarks/dashboard.py --quick    # 4 x 3 x 50: a smoke test, not a measurement

1. **Writing**: the cost of one sample's matrices, measured in this process against writing that
   sample's scalars (what every sample already paid): on the training thread (``RunOutputs.log_matrices``,
   a hand-over to the background writer) and on the background writer (``TensorBoardSink.log_matrices``,
   the protobuf and the event-file queue).
2. **Payload**: an event file with ``--samples`` matrices written through the same sink, served by
   ``tensorboard`` (default Rust data server, ``--samples_per_plugin=lightning_heatmaps=0``); the bytes and
   time of ``/values`` for the whole history and for one new sample (``after=``), against the same
   numbers as a JSON list of floats.
3. **Browser**: headless Chromium (Debian's, through Playwright) on the HEATMAPS tab; the dashboard's own
   render time (``data-render-ms``: colour range, drawing every panel, the line chart) for the first
   picture, the layer x step view of the whole history (5000 samples binned into the plot's pixel columns,
   each drawing its most extreme sample), its z colouring, and scrubbing the slider.

The end-to-end cost of the matrices on a real training step is in ``overhead.py --sections dashboard``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from lightning_heatmaps._worker import BackgroundWriter
from lightning_heatmaps.sinks import RunOutputs, TensorBoardSink
from lightning_heatmaps_tensorboard.metadata import PLUGIN_NAME, matrix_content, matrix_tag
from lightning_heatmaps_tensorboard.plugin import decode_values

COMPONENTS = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down", "mlp.router"]


def content_for(layers: int, components: int) -> bytes:
    return matrix_content(callback="GradientHeatmap", metric="grad_norm", kind="layer_x_component",
                          row_labels=[str(i) for i in range(layers)], column_labels=[*COMPONENTS[:components], "all"],
                          pooled_column=True, every_n_steps=1)


def writing(layers: int, components: int, samples: int) -> None:
    content = content_for(layers, components)
    tag = matrix_tag("grad_norm")
    matrices = [np.random.default_rng(i).random((layers, components + 1)) for i in range(samples)]
    scalars = [{f"grad_norm/layer_{layer:02d}/{name}": float(m[layer, c]) for layer in range(layers)
                for c, name in enumerate([*COMPONENTS[:components], "all"])} for m in matrices]
    with tempfile.TemporaryDirectory() as directory:
        writer = SummaryWriter(directory)
        sink = TensorBoardSink(writer)
        timings = {}
        for name, call in [("matrices", lambda i: sink.log_matrices({tag: (matrices[i], content)}, i)),
                           ("scalars", lambda i: sink.log_scalars(scalars[i], i))]:
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                for i in range(samples):
                    call(i)
                runs.append((time.perf_counter() - started) / samples)
            timings[name] = statistics.median(runs)
        # Training thread: what `_ingest` adds per sample (a hand-over to the background writer).
        outputs = RunOutputs(directory, [sink], BackgroundWriter("benchmark"))
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for i in range(samples):
                outputs.log_matrices({tag: (matrices[i], content)}, i)
            runs.append((time.perf_counter() - started) / samples)
            outputs.flush()
        outputs.close()
        writer.close()
        size = sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))
    print(f"\n## Writing one sample ({layers} layers x {components} components + all)\n")
    print("| where | matrices (µs per sample) | the sample's scalars, for scale (µs) |")
    print("|---|---|---|")
    print(f"| background writer: `TensorBoardSink` | {1e6 * timings['matrices']:.1f} | {1e6 * timings['scalars']:.1f} |")
    print(f"| training thread: `RunOutputs.log_matrices` (hand-over) | {1e6 * statistics.median(runs):.1f} | |")
    print(f"\nEvent file: {size / (5 * 2 * samples):.0f} bytes per sample (matrices and scalars together, 5 rounds each).")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[bytes, float]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as response:
        body = response.read()
    return body, time.perf_counter() - started


def serve_and_browse(layers: int, components: int, samples: int, screenshot: str | None) -> None:
    from playwright.sync_api import sync_playwright

    logdir = tempfile.mkdtemp()
    content = content_for(layers, components)
    writer = SummaryWriter(os.path.join(logdir, "big"))
    sink = TensorBoardSink(writer)
    rng = np.random.default_rng(0)
    depth = np.linspace(0.5, 2.0, layers)[:, None]
    for step in range(samples):
        matrix = depth * (1 + 0.3 * np.sin(step / 300 + np.arange(components + 1))) * (1 + 0.1 * rng.random((layers, components + 1)))
        sink.log_matrices({matrix_tag("grad_norm"): (matrix, content)}, step)
    writer.close()

    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--port", str(port),
                              "--host", "127.0.0.1", "--samples_per_plugin", f"{PLUGIN_NAME}=0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                runs = json.loads(get(f"{base}/data/plugin/{PLUGIN_NAME}/runs")[0])
                if runs.get("big", {}).get(matrix_tag("grad_norm"), {}).get("max_step") == samples - 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("tensorboard did not load the event file in 120 s")
            time.sleep(0.5)
        query = f"{base}/data/plugin/{PLUGIN_NAME}/values?run=big&tag={matrix_tag('grad_norm')}"
        fetches = [get(query) for _ in range(3)]
        body = fetches[0][0]
        steps, values = decode_values(body)
        assert values.shape == (samples, layers, components + 1), values.shape
        one, one_seconds = get(f"{query}&after={samples - 2}")
        as_json = len(json.dumps({"steps": steps.tolist(), "values": values.tolist()}))
        print(f"\n## Payload ({samples} samples x {layers} x {components + 1}, tensorboard's default data server)\n")
        print("| request | bytes | as a JSON list of floats | time (median of 3) |")
        print("|---|---|---|---|")
        print(f"| whole history | {len(body):,} | {as_json:,} | {1e3 * statistics.median(s for _, s in fetches):.0f} ms |")
        print(f"| one new sample (`after=`) | {len(one):,} | | {1e3 * one_seconds:.0f} ms |")

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                      "--disable-sync", "--no-first-run"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            started = time.perf_counter()
            page.goto(f"{base}/#{PLUGIN_NAME}")
            frame = page.frame_locator("iframe")
            frame.locator("#lh-root[data-ready=true]").wait_for(timeout=300000)
            ready = time.perf_counter() - started
            root = frame.locator("#lh-root")
            times: dict[str, list[float]] = {"first picture (layer x component, colour range over the whole history)": [
                float(root.get_attribute("data-render-ms"))]}
            frame.locator("#lh-step").focus()
            scrub = []
            for _ in range(30):
                page.keyboard.press("PageDown")
                scrub.append(float(root.get_attribute("data-render-ms")))
            times["scrubbing the slider (layer x component), per position"] = scrub
            history = []
            for scale in ["log", "linear", "log"]:
                frame.locator("#lh-view").select_option("history")
                frame.locator("#lh-scale").select_option(scale)  # a new colour range over 5000 x 48 values each time
                history.append(float(root.get_attribute("data-render-ms")))
            times["layer x step, whole history, new scale (range recomputed)"] = history
            moves = []
            frame.locator("#lh-step").press("Home")
            for _ in range(10):
                frame.locator("#lh-step").press("PageUp")
                moves.append(float(root.get_attribute("data-render-ms")))
            times["layer x step, moving the slider's marker"] = moves
            if frame.locator("#lh-color-by").count():  # the z colouring (issue 18); absent before it
                frame.locator("#lh-color-by").select_option("z")  # z of every layer's 5000 values, computed once
                times["layer x step, z against its own baseline (z computed)"] = [float(root.get_attribute("data-render-ms"))]
                z_moves = []
                for _ in range(10):
                    frame.locator("#lh-step").press("PageDown")
                    z_moves.append(float(root.get_attribute("data-render-ms")))
                times["layer x step, z against its own baseline, moving the slider's marker"] = z_moves
                frame.locator("#lh-color-by").select_option("value")
            if screenshot:
                page.screenshot(path=screenshot)
            browser.close()
        print(f"\n## Browser (headless Chromium; page load to first picture: {ready:.1f} s including the transfer)\n")
        print("| action | renders | median render (ms) | slowest (ms) |")
        print("|---|---|---|---|")
        for name, values_ms in times.items():
            print(f"| {name} | {len(values_ms)} | {statistics.median(values_ms):.1f} | {max(values_ms):.1f} |")
    finally:
        board.terminate()
        board.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small and fast (CI smoke test only)")
    parser.add_argument("--screenshot", default=None, help="save a screenshot of the big run here")
    args = parser.parse_args()
    layers, components, samples = (4, 3, 50) if args.quick else (48, 8, 5000)
    print(f"HEATMAPS dashboard benchmark: {layers} layers x {components} components (+ all) x {samples} samples")
    writing(layers, components, min(samples, 1000))
    serve_and_browse(layers, components, samples, args.screenshot)


if __name__ == "__main__":
    main()
