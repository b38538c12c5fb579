"""The HEATMAPS dashboard (TensorBoard plugin): what the callbacks write, what the routes serve, what a browser shows.

One real training run (GradientHeatmap with a frozen component, ActivationHeatmap, LogitLensHeatmap) writes
the event file; a second run is written through the same TensorBoard sink with NaN and infinite cells; a
third (``spiky``) holds 5000 samples of two metrics with one planted spike and one NaN, and spike alerts
written through ``TensorBoardSink.log_alert``.
TensorBoard's own WSGI app serves the plugin, with the default Rust data server and with
``--load_fast=false``; values are compared with the callbacks' npz files and with the event file read by
``EventAccumulator``. The browser tests start ``tensorboard`` and drive Debian's Chromium with Playwright.
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from conftest import TokenModel, make_trainer, read_events, tiny_llama, token_loader
import lightning_heatmaps_tensorboard
from lightning_heatmaps import (ActivationHeatmap, AttentionHeatmap, GradientHeatmap, LogitLensHeatmap, SpikeAlert,
                               spikes)
from lightning_heatmaps._worker import BackgroundWriter
from lightning_heatmaps.sinks import LoggerSink, RunOutputs, Sink, TensorBoardSink
from lightning_heatmaps_tensorboard.metadata import (ALERT_TAG, PLUGIN_NAME, decode_alert, matrix_content, matrix_tag,
                                                     read_alert_content, read_content)
from lightning_heatmaps_tensorboard.plugin import decode_values

STEPS = 12
# The spiky run: SPIKY_SAMPLES samples (steps 0..4999) of 2 layers x (attn.q, all), layer 0 around 1e-3 and
# layer 1 around 100 (log-normal noise), one spike in layer 0's `all` at SPIKE_STEP, a NaN in layer 1's at
# NAN_STEP, and three alerts (two at SPIKE_STEP, one with a NaN z).
SPIKY_SAMPLES = 5000
SPIKE_STEP = 3217
NAN_STEP = 1003
DIP_STEP = 4500  # a fall in layer 0: it enters the baseline (upward-only rule), shifting the z after it
SPIKY_TAGS = ("matrices/activation_rms", "matrices/grad_norm")
ALERTS = [
    {"step": SPIKE_STEP, "signal": "loss", "value": 9.5, "baseline": 2.25, "z": 40.5,
     "layers": [{"layer": 1, "component": "all", "metric": "grad_norm", "z": 50.0, "first_step": SPIKE_STEP},
                {"layer": 0, "component": "attn.q", "metric": "grad_norm", "z": 41.0, "first_step": SPIKE_STEP - 2}]},
    {"step": SPIKE_STEP, "signal": "grad_norm", "value": 3.0, "baseline": 1.0, "z": 12.25, "layers": []},
    {"step": 4000, "signal": "loss", "value": float("nan"), "baseline": 2.0, "z": float("nan"), "layers": []},
]


def spiky_values(seed: int) -> np.ndarray:
    """[samples, 2 layers, 2 columns] float32, the spike and the NaN planted in the `all` column."""
    rng = np.random.default_rng(seed)
    values = np.exp(rng.normal(0.0, 0.05, (SPIKY_SAMPLES, 2, 2))) * np.array([[1e-3], [100.0]])
    values[SPIKE_STEP, 0, 1] = 1000.0
    values[NAN_STEP, 1, 1] = np.nan
    values[DIP_STEP, 0, 1] *= 1e-3
    return values.astype(np.float32)
BASE = f"/data/plugin/{PLUGIN_NAME}"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """A real run (``train``) and a run with non-finite cells written through the same sink (``special``)."""
    root = tmp_path_factory.mktemp("dashboard")
    model = TokenModel(tiny_llama())
    model.model.model.layers[0].mlp.gate_proj.weight.requires_grad_(False)  # frozen: shown as "frozen"
    callbacks = [GradientHeatmap(every_n_steps=1), ActivationHeatmap(every_n_steps=2),
                 LogitLensHeatmap([[3, 4, 5, 6]], every_n_steps=4), AttentionHeatmap(metrics="max_logit", every_n_steps=3)]
    logger = L.pytorch.loggers.TensorBoardLogger(str(root), name="train", version="")
    make_trainer(root, callbacks, max_steps=STEPS, logger=logger).fit(model, token_loader(batches=STEPS))
    writer = SummaryWriter(str(root / "special"))
    content = matrix_content(callback="GradientHeatmap", metric="grad_norm", kind="layer_x_component",
                             row_labels=["0", "1"], column_labels=[*COMPONENTS, "all"], pooled_column=True)
    sink = TensorBoardSink(writer)
    for step in range(3):
        matrix = np.full((2, 8), 0.25 * (step + 1), dtype=np.float32)
        matrix[0, 0], matrix[0, 1], matrix[1, 0] = np.nan, np.inf, -np.inf
        sink.log_matrices({matrix_tag("grad_norm"): (matrix, content)}, step)
    writer.close()
    writer = SummaryWriter(str(root / "spiky"))
    sink = TensorBoardSink(writer)
    contents = {tag: matrix_content(callback="GradientHeatmap", metric=tag.split("/")[1], kind="layer_x_component",
                                    row_labels=["0", "1"], column_labels=["attn.q", "all"], pooled_column=True,
                                    every_n_steps=1) for tag in SPIKY_TAGS}
    spiky = {tag: spiky_values(seed) for seed, tag in enumerate(SPIKY_TAGS)}
    for step in range(SPIKY_SAMPLES):
        sink.log_matrices({tag: (spiky[tag][step], contents[tag]) for tag in SPIKY_TAGS}, step)
        for alert in ALERTS:
            if alert["step"] == step:
                sink.log_alert(alert, step)
    writer.close()
    return root


COMPONENTS = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down"]


@pytest.fixture(scope="module")
def events(logdir):
    return read_events(logdir / "train")


def _client(logdir, load_fast):
    from tensorboard import default, program
    from tensorboard.backend import application
    from werkzeug.test import Client

    board = program.TensorBoard(plugins=default.get_plugins())  # every entry-point plugin, as `tensorboard` loads them
    board.configure(argv=["", "--logdir", str(logdir), "--load_fast", load_fast,
                          "--samples_per_plugin", f"{PLUGIN_NAME}=0"])
    # TensorBoard's own way of building its data provider (the Rust data server, or the Python multiplexer).
    data_provider, multiplexer = board._make_data_provider()
    app = application.TensorBoardWSGIApp(board.flags, board.plugin_loaders, data_provider, board.assets_zip_provider,
                                         multiplexer)
    client = Client(app)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # both load the logdir in the background
        runs = client.get(f"{BASE}/runs").json
        if set(runs) == {"train", "special", "spiky"} and len(runs["train"]) == 4 and len(runs["spiky"]) == 2 and \
                client.get(f"{BASE}/alerts", query_string={"run": "spiky"}).json["kept"] == len(ALERTS):
            return client
        time.sleep(0.2)
    raise AssertionError(f"TensorBoard did not load the logdir: {runs}")


@pytest.fixture(scope="module", params=["true", "false"], ids=["rust-data-server", "load-fast-false"])
def client(request, logdir):
    return _client(logdir, request.param)


def _values(client, run, tag, **extra):
    response = client.get(f"{BASE}/values", query_string={"run": run, "tag": tag, **extra})
    assert response.status_code == 200, response.data
    assert response.headers["Content-Type"] == "application/octet-stream"
    return decode_values(response.data)


def test_plugin_is_listed_and_enabled(client):
    listing = client.get("/data/plugins_listing").json[PLUGIN_NAME]
    assert listing["enabled"] is True
    assert listing["tab_name"] == "Heatmaps"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": f"{BASE}/static/index.js"}


def test_runs_describe_every_matrix(client, logdir):
    runs = client.get(f"{BASE}/runs").json
    train = runs["train"]
    assert set(train) == {"matrices/grad_norm", "matrices/activation_rms", "matrices/logit_lens/prompt_0",
                          "matrices/attention_max_logit"}
    attention = train["matrices/attention_max_logit"]
    assert (attention["kind"], attention["column_axis"], attention["column_labels"]) == ("layer_x_head", "head", ["0", "1", "2", "3", "all"])
    grad = train["matrices/grad_norm"]
    assert (grad["callback"], grad["metric"], grad["kind"], grad["max_step"]) == ("GradientHeatmap", "grad_norm", "layer_x_component", STEPS - 1)
    assert grad["row_labels"] == ["0", "1"] and grad["column_labels"] == [*COMPONENTS, "all"]
    assert grad["pooled_column"] is True and grad["every_n_steps"] == 1
    assert grad["missing"] == [[0, COMPONENTS.index("mlp.gate"), "frozen"]]
    assert train["matrices/activation_rms"]["missing"] == []
    lens = train["matrices/logit_lens/prompt_0"]
    assert (lens["kind"], lens["row_axis"], lens["column_axis"]) == ("layer_x_token", "layer", "token")
    npz = np.load(logdir / "train" / "heatmaps" / "logit_lens" / "prompt_0.npz")
    assert lens["column_labels"] == npz["column_labels"].tolist() and lens["row_labels"] == npz["row_labels"].tolist()
    assert lens["color_limits"] == [0.0, 1.0]


def test_values_equal_the_npz_and_the_event_file(client, logdir, events):
    steps, values = _values(client, "train", "matrices/grad_norm")
    assert steps.tolist() == list(range(STEPS)) and values.shape == (STEPS, 2, 8) and values.dtype == np.float32
    # The latest sample against the callback's npz (layer x component), and the pooled column's history
    # against the layer x step npz: equal to float32 precision.
    latest = np.load(logdir / "train" / "heatmaps" / "grad_norm" / "layer_x_component.npz")
    assert int(latest["step"]) == STEPS - 1
    np.testing.assert_array_equal(values[-1, :, :-1], latest["values"].astype(np.float32))
    history = np.load(logdir / "train" / "heatmaps" / "grad_norm" / "layer_x_step.npz")
    np.testing.assert_array_equal(values[:, :, -1].T, history["values"].astype(np.float32))
    # Every cell of every step against the scalars the same callback wrote (an independent path).
    scalars = {(tag, event.step): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}
    for index, step in enumerate(steps):
        for layer in range(2):
            for column, component in enumerate([*COMPONENTS, "all"]):
                key = (f"grad_norm/layer_{layer}/{component}", int(step))
                if component == "mlp.gate" and layer == 0:
                    assert key not in scalars and np.isnan(values[index, layer, column])  # frozen
                else:
                    assert values[index, layer, column] == np.float32(scalars[key])
    # And against the raw tensor events in the event file.
    raw = events.Tensors("matrices/grad_norm")
    np.testing.assert_array_equal(np.stack([tensor_util.make_ndarray(event.tensor_proto) for event in raw]), values)
    assert read_content(events.SummaryMetadata("matrices/grad_norm").plugin_data.content)["metric"] == "grad_norm"


def test_lens_and_activation_values(client, logdir):
    steps, values = _values(client, "train", "matrices/logit_lens/prompt_0")
    npz = np.load(logdir / "train" / "heatmaps" / "logit_lens" / "prompt_0.npz")
    assert steps[-1] == int(npz["step"]) and steps.tolist() == list(range(0, STEPS + 1, 4))
    np.testing.assert_array_equal(values[-1], npz["values"].astype(np.float32))
    steps, values = _values(client, "train", "matrices/activation_rms")
    assert steps.tolist() == list(range(0, STEPS, 2))
    latest = np.load(logdir / "train" / "heatmaps" / "activation_rms" / "layer_x_component.npz")
    np.testing.assert_array_equal(values[-1, :, :-1], latest["values"].astype(np.float32))


def test_after_returns_only_newer_samples(client):
    all_steps, all_values = _values(client, "train", "matrices/grad_norm")
    steps, values = _values(client, "train", "matrices/grad_norm", after="7")
    assert steps.tolist() == list(range(8, STEPS))
    np.testing.assert_array_equal(values, all_values[8:])
    steps, values = _values(client, "train", "matrices/grad_norm", after=str(STEPS - 1))
    assert steps.size == 0 and values.size == 0


def test_non_finite_values_are_served_as_they_are(client):
    steps, values = _values(client, "special", "matrices/grad_norm")
    assert steps.tolist() == [0, 1, 2]
    assert np.isnan(values[:, 0, 0]).all() and (values[:, 0, 1] == np.inf).all() and (values[:, 1, 0] == -np.inf).all()


def _json_number(value):
    # TensorBoard's http_util.Respond writes NaN and infinities as strings (json_util.Cleanse).
    return value if np.isfinite(value) else {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[str(value)]


def test_alerts_route_returns_every_alert_in_step_order(client):
    body = client.get(f"{BASE}/alerts", query_string={"run": "spiky"})
    assert body.status_code == 200 and body.headers["Content-Type"] == "application/json"
    expected = [{key: _json_number(value) if isinstance(value, float) else value for key, value in alert.items()}
                for alert in ALERTS]
    # Two alerts at one step both arrive (the Rust data server keeps one value per step).
    assert body.json == {"alerts": expected, "kept": 3, "written": 3}
    assert client.get(f"{BASE}/alerts", query_string={"run": "train"}).json == {"alerts": [], "kept": 0, "written": 0}
    assert ALERT_TAG not in client.get(f"{BASE}/runs").json["spiky"]  # not a matrix
    response = client.get(f"{BASE}/values", query_string={"run": "spiky", "tag": ALERT_TAG})
    assert response.status_code == 400 and "no heatmaps matrices under that tag" in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("query", "message"),
    [({}, "Missing query parameter 'run'"), ({"run": "nope"}, "Invalid value for run='nope'"),
     ({"run": "x" * 5000}, "longer than 4096"), ({"run": "spiky\x00"}, "holds a NUL")],
)
def test_alerts_route_bad_parameters_get_a_400(client, query, message):
    response = client.get(f"{BASE}/alerts", query_string=query)
    assert response.status_code == 400 and response.headers["Content-Type"].startswith("text/plain")
    assert message in response.get_data(as_text=True)


def test_alerts_are_written_as_documented(logdir, tmp_path):
    """The event file holds string tensors of encoded alerts; RunOutputs forwards from the background writer."""
    accumulator = read_events(logdir / "spiky")
    assert read_alert_content(accumulator.SummaryMetadata(ALERT_TAG).plugin_data.content) == {"version": 1, "type": "alerts"}
    # The multiplexer keeps both writes of SPIKE_STEP: the second repeats the first alert.
    written = [(event.step, [decode_alert(element) for element in tensor_util.make_ndarray(event.tensor_proto).tolist()])
               for event in accumulator.Tensors(ALERT_TAG)]
    assert [(step, [number for _, number in alerts]) for step, alerts in written] == [(SPIKE_STEP, [1]), (SPIKE_STEP, [1, 2]), (4000, [3])]
    assert written[1][1][1][0] == ALERTS[1] and np.isnan(written[2][1][0][0]["z"])

    writer = SummaryWriter(str(tmp_path / "run"))
    csv = L.pytorch.loggers.CSVLogger(str(tmp_path / "csv"))
    outputs = RunOutputs(str(tmp_path / "heatmaps"), [TensorBoardSink(writer), LoggerSink(csv)], BackgroundWriter("alerts"))
    outputs.log_alert({**ALERTS[0], "z": np.float32(40.5)}, SPIKE_STEP)  # a NumPy scalar is written as its number
    outputs.close()
    assert outputs.errors == 0 and outputs.writer.errors == 0
    events = read_events(tmp_path / "run")
    (event,) = events.Tensors(ALERT_TAG)
    assert event.step == SPIKE_STEP
    assert [decode_alert(element) for element in tensor_util.make_ndarray(event.tensor_proto).tolist()] == [(ALERTS[0], 1)]
    Sink().log_alert(ALERTS[0], 0)  # the default: nothing
    RunOutputs(str(tmp_path), [TensorBoardSink(writer)], None).log_alert(ALERTS[0], 0)  # not rank zero: nothing
    writer.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"run": "nope", "tag": "matrices/grad_norm"}, "Invalid value for run='nope'"),
        ({"run": "train", "tag": "matrices/nope"}, "Invalid value for tag='matrices/nope'"),
        ({"run": "train"}, "Missing query parameter 'tag'"),
        ({"tag": "matrices/grad_norm"}, "Missing query parameter 'run'"),
        ({"run": "train", "tag": "matrices/grad_norm", "after": "abc"}, "Invalid value for after='abc'"),
        ({"run": "x" * 5000, "tag": "matrices/grad_norm"}, "longer than 4096"),
        ({"run": "train\x00", "tag": "matrices/grad_norm"}, "holds a NUL"),
        ({"run": "../../etc/passwd", "tag": "matrices/grad_norm"}, "Invalid value for run="),
    ],
)
def test_bad_parameters_get_a_400_with_a_message(client, query, message):
    response = client.get(f"{BASE}/values", query_string=query)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert message in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "path",
    ["/static/../plugin.py", "/static/%2e%2e/plugin.py", "/static/..%2fplugin.py", "/static/", "/static/nope.js",
     "/static/static/index.js", "/static//etc/passwd", "/static/index.js/"],
)
def test_static_route_refuses_anything_but_its_files(client, path):
    response = client.get(BASE + path)
    assert response.status_code == 404
    assert b"import" not in response.data  # no file content, this package's or any other


@pytest.mark.parametrize(("name", "content_type"), [("index.js", "text/javascript"), ("dashboard.js", "text/javascript"),
                                                    ("style.css", "text/css")])
def test_static_files_have_explicit_types(client, name, content_type):
    response = client.get(f"{BASE}/static/{name}")
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == content_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    runs = client.get(f"{BASE}/runs")
    assert runs.headers["Content-Type"] == "application/json" and runs.headers["X-Content-Type-Options"] == "nosniff"


def test_plugin_package_imports_no_heavy_library():
    code = ("import sys, lightning_heatmaps_tensorboard.plugin; "
            "print(sorted(m for m in ('torch', 'lightning', 'matplotlib', 'lightning_heatmaps') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert output.strip() == "[]"


# --- a real browser ----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(logdir, tmp_path_factory):
    """TensorBoard (a subprocess, default data server) and a page in headless Chromium on the HEATMAPS tab."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    port = _free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1",
         "--samples_per_plugin", f"{PLUGIN_NAME}=0", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    manager = playwright_api.sync_playwright().start()
    browser = manager.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"],
    )
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        deadline = time.monotonic() + 60
        while True:
            try:
                page.goto(f"http://127.0.0.1:{port}/#{PLUGIN_NAME}", timeout=10000)
                break
            except playwright_api.Error:
                if time.monotonic() > deadline or board.poll() is not None:
                    raise
                time.sleep(0.5)
        frame = page.frame_locator("iframe")
        frame.locator("#lh-root[data-ready=true]").wait_for(timeout=60000)
        yield page, frame, errors
    finally:
        browser.close()
        manager.stop()
        board.terminate()
        board.wait(timeout=30)


def _cell_position(canvas, row, column):
    data = canvas.evaluate("c => ({...c.dataset})")
    left, top, width, height = (float(data[key]) for key in ("plotLeft", "plotTop", "plotWidth", "plotHeight"))
    rows, columns = int(data["rows"]), int(data["columns"])
    return {"x": left + (column + 0.5) * width / columns, "y": top + height - (row + 0.5) * height / rows}


def _hover(frame, row, column, panel=0):
    canvas = frame.locator("canvas.lh-heatmap").nth(panel)
    canvas.hover(position=_cell_position(canvas, row, column))
    tooltip = frame.locator("#lh-tooltip")
    tooltip.wait_for(state="visible")
    return tooltip.evaluate("t => ({...t.dataset})"), tooltip.inner_text()


def _show(frame, run, tag, view="matrix"):
    frame.locator("#lh-run").select_option(run)
    frame.locator("#lh-tag").select_option(tag)
    frame.locator("#lh-view").select_option(view)
    frame.locator("canvas.lh-heatmap").first.wait_for()
    frame.locator("#lh-step-label").wait_for()


def test_browser_hover_shows_the_npz_value_and_the_slider_scrubs(dashboard, logdir, tmp_path):
    page, frame, errors = dashboard
    _show(frame, "train", "matrices/grad_norm")
    latest = np.load(logdir / "train" / "heatmaps" / "grad_norm" / "layer_x_component.npz")
    for row, column in [(1, COMPONENTS.index("attn.v")), (0, COMPONENTS.index("mlp.down"))]:
        data, text = _hover(frame, row, column)
        assert (data["row"], data["column"], data["step"]) == (str(row), str(column), str(STEPS - 1))
        assert np.float32(data["value"]) == np.float32(latest["values"][row, column])
        assert f"layer {row} · {COMPONENTS[column]}" in text and data["value"] in text
    data, text = _hover(frame, 0, COMPONENTS.index("mlp.gate"))
    assert data["value"] == "frozen" and "frozen" in text
    page.screenshot(path=str(tmp_path / "dashboard_latest.png"))

    canvas = frame.locator("canvas.lh-heatmap").first
    before = canvas.evaluate("c => c.toDataURL()")
    frame.locator("#lh-step").focus()
    page.keyboard.press("Home")  # the first sample
    assert frame.locator("#lh-step-label").inner_text().startswith("step 0 (sample 1 of 12)")
    assert canvas.evaluate("c => c.toDataURL()") != before
    history = np.load(logdir / "train" / "heatmaps" / "grad_norm" / "layer_x_step.npz")
    data, _ = _hover(frame, 1, len(COMPONENTS) - 1)  # mlp.down at step 0 ...
    assert data["step"] == "0"
    steps, values = decode_values(page.request.get(
        f"{page.url.split('#')[0]}data/plugin/{PLUGIN_NAME}/values?run=train&tag=matrices/grad_norm").body())
    assert np.float32(data["value"]) == values[0, 1, len(COMPONENTS) - 1]
    # ... and the layer x step view's pooled column at step 0 is the npz's first column.
    _show(frame, "train", "matrices/grad_norm", view="history")
    data, _ = _hover(frame, 1, 0)
    assert data["step"] == "0" and np.float32(data["value"]) == np.float32(history["values"][1, 0])
    page.screenshot(path=str(tmp_path / "dashboard_history.png"))
    assert errors == []


def test_browser_shows_attention_layer_x_head_with_the_npz_values(dashboard, logdir):
    page, frame, errors = dashboard
    _show(frame, "train", "matrices/attention_max_logit")
    latest = np.load(logdir / "train" / "heatmaps" / "attention_max_logit" / "layer_x_head.npz")
    assert int(latest["step"]) == 9 and latest["component_labels"].tolist() == ["0", "1", "2", "3"]
    for row, head in [(0, 3), (1, 1)]:
        data, text = _hover(frame, row, head)
        assert (data["row"], data["column"], data["step"]) == (str(row), str(head), "9")
        assert np.float32(data["value"]) == np.float32(latest["values"][row, head])
        assert "head" in frame.locator("body").inner_text() and data["value"] in text
    assert errors == []


def test_browser_non_finite_values_click_chart_and_compare(dashboard, tmp_path):
    page, frame, errors = dashboard
    _show(frame, "special", "matrices/grad_norm")
    assert _hover(frame, 0, 0)[0]["value"] == "NaN"
    assert _hover(frame, 0, 1)[0]["value"] == "+Inf"
    assert _hover(frame, 1, 0)[0]["value"] == "-Inf"
    assert _hover(frame, 1, 1)[0]["value"] == "0.75"

    canvas = frame.locator("canvas.lh-heatmap").first
    canvas.click(position=_cell_position(canvas, 1, 2))
    chart = frame.locator("#lh-chart")
    chart.wait_for(state="visible")
    assert (chart.get_attribute("data-row"), chart.get_attribute("data-column"), chart.get_attribute("data-points")) == ("1", "2", "3")

    _show(frame, "train", "matrices/grad_norm")
    frame.locator("#lh-compare").select_option("special")
    frame.locator("#lh-range").select_option("minmax")
    frame.locator("canvas.lh-heatmap").nth(1).wait_for()
    panels = [frame.locator("canvas.lh-heatmap").nth(index).evaluate("c => ({...c.dataset})") for index in (0, 1)]
    assert [panel["run"] for panel in panels] == ["train", "special"]
    # One scale for both: the min and max of the finite, monitored component cells of both runs' histories.
    base = f"{page.url.split('#')[0]}data/plugin/{PLUGIN_NAME}/values?tag=matrices/grad_norm&run="
    shown = []
    for run in ("train", "special"):
        values = decode_values(page.request.get(base + run).body())[1][:, :, :-1].copy()
        if run == "train":
            values[:, 0, COMPONENTS.index("mlp.gate")] = np.nan  # frozen
        shown.append(values[np.isfinite(values)])
    shown = np.concatenate(shown)
    for panel in panels:
        assert (float(panel["scaleMin"]), float(panel["scaleMax"])) == (float(shown.min()), float(shown.max()))
    page.screenshot(path=str(tmp_path / "dashboard_compare.png"))

    frame.locator("#lh-range").select_option("fixed")
    frame.locator("#lh-min").fill("0.01")
    # A render while min is still being typed (as a live refresh does) must not lose what was typed.
    frame.locator("#lh-root").evaluate("() => window.dispatchEvent(new Event('resize'))")
    frame.locator("#lh-max").fill("2")
    frame.locator("#lh-max").press("Enter")
    frame.locator("#lh-scale").select_option("log")
    panel = frame.locator("canvas.lh-heatmap").nth(1).evaluate("c => ({...c.dataset})")
    assert (panel["scaleMin"], panel["scaleMax"], panel["scaleLog"]) == ("0.01", "2", "true")
    frame.locator("#lh-min").fill("-1")
    frame.locator("#lh-min").press("Enter")
    assert "needs min > 0" in frame.locator("#lh-message").inner_text()
    for control, value in [("#lh-compare", ""), ("#lh-range", "robust"), ("#lh-scale", "linear")]:
        frame.locator(control).select_option(value)
    assert errors == []


def test_probe_intervention_and_expert_matrices_are_written(tmp_path):
    """Every other callback's matrix reaches the event file with its kind and labels, equal to its npz."""
    import torch

    from families import build
    from lightning_heatmaps import ExpertHeatmap, InterventionHeatmap, ProbeHeatmap

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 40, (16, 8), generator=generator)
    labels = torch.arange(16) % 2
    callbacks = [ProbeHeatmap(ids, labels, every_n_steps=2),
                 InterventionHeatmap([[3, 4, 5, 6]], [(0, 2)], every_n_steps=2)]
    make_trainer(tmp_path / "lens", callbacks, max_steps=2).fit(TokenModel(tiny_llama()), token_loader(batches=2))
    model = TokenModel(build("mixtral"))
    make_trainer(tmp_path / "moe", [ExpertHeatmap(every_n_steps=1), ActivationHeatmap(every_n_steps=1)], max_steps=2).fit(
        model, token_loader(batches=2, batch_size=2, length=8))
    expected = {
        "lens": {"matrices/probe_auc/layer_x_position": ("layer_x_position", "token position", "probe_auc"),
                 "matrices/intervention_jsd/layer_x_site": ("layer_x_site", "intervention site", "intervention_jsd")},
        "moe": {"matrices/expert_token_share": ("layer_x_expert", "expert", None),
                "matrices/expert_grad_norm": ("layer_x_expert", "expert", None),
                "matrices/activation_rms": ("layer_x_component", "component", None)},
    }
    for run, tags in expected.items():
        directory = tmp_path / run / "lightning_logs" / "version_0"
        accumulator = read_events(directory)
        assert set(accumulator.PluginTagToContent(PLUGIN_NAME)) == set(tags)
        for tag, (kind, column_axis, metric) in tags.items():
            metadata = accumulator.SummaryMetadata(tag)
            assert metadata.plugin_data.plugin_name == PLUGIN_NAME
            content = read_content(metadata.plugin_data.content)
            assert (content["kind"], content["column_axis"]) == (kind, column_axis)
            latest = tensor_util.make_ndarray(accumulator.Tensors(tag)[-1].tensor_proto)
            if metric is not None:  # a lens heatmap: its own npz
                npz = np.load(directory / "heatmaps" / metric / f"{tag.rsplit('/', 1)[1]}.npz")
                assert content["column_labels"] == npz["column_labels"].tolist()
                np.testing.assert_array_equal(latest, npz["values"].astype(np.float32))
            else:  # the layer x component (or expert) npz, plus the pooled column
                npz = np.load(directory / "heatmaps" / tag.split("/")[1] / "layer_x_component.npz")
                assert content["column_labels"] == [*npz["component_labels"].tolist(), "all"] and content["pooled_column"] is True
                np.testing.assert_array_equal(latest[:, :-1], npz["values"].astype(np.float32))
                # Cells with no value by construction, and why: 3-D experts compute inside one forward, so
                # their activations cannot be hooked ("not monitored"); nothing is frozen here.
                expected_missing = [[int(r), int(c), "not monitored"] for r, c in zip(*np.nonzero(npz["missing"]))]
                assert content["missing"] == expected_missing
                assert bool(expected_missing) == (tag == "matrices/activation_rms")


# --- spikes: alerts, the z colouring, binned samples, the overview (the spiky run) ----------------------

VIRIDIS_TOP = [253, 231, 37]     # the last anchor of the viridis map: a value at or above the colour bar's top
DIVERGING_TOP = [178, 24, 43]    # the last anchor of the diverging map: z at or above the z colour bar's top
MAGENTA = [230, 0, 126]          # NaN and +/-Inf


def _row_pixels(canvas, row):
    """The RGB of every pixel across the plot at the middle of heatmap row ``row`` (device pixel ratio 1)."""
    return canvas.evaluate("""(c, row) => {
        const d = c.dataset, rows = Number(d.rows);
        const [left, top, width, height] = [d.plotLeft, d.plotTop, d.plotWidth, d.plotHeight].map(Number);
        const y = Math.floor(top + height - (row + 0.5) * height / rows);
        const data = c.getContext("2d").getImageData(left, y, width, 1).data;
        const out = [];
        for (let i = 0; i < width; i++) out.push([data[4 * i], data[4 * i + 1], data[4 * i + 2]]);
        return out;
    }""", row)


def _hover_pixel(frame, canvas, x, row):
    data = canvas.evaluate("c => ({...c.dataset})")
    top, height, rows = float(data["plotTop"]), float(data["plotHeight"]), int(data["rows"])
    canvas.hover(position={"x": float(data["plotLeft"]) + x + 0.5, "y": top + height - (row + 0.5) * height / rows})
    tooltip = frame.locator("#lh-tooltip")
    tooltip.wait_for(state="visible")
    return tooltip.evaluate("t => ({...t.dataset})")


def test_dashboard_rule_constants_equal_the_python_rule():
    """static/baseline.js's ROBUST_Z is spikes.py's rule with SpikeAlert's defaults (one rule, two languages)."""
    text = (Path(lightning_heatmaps_tensorboard.__file__).parent / "static" / "baseline.js").read_text()
    block = re.search(r"export const ROBUST_Z = Object\.freeze\(\{(.*?)\}\);", text, re.S).group(1)
    constants = {name: float(value) for name, value in re.findall(r"(\w+):\s*([-+0-9.e]+),", block)}
    defaults = inspect.signature(SpikeAlert).parameters
    assert constants == {"window": spikes.WINDOW, "warmup": spikes.WARMUP, "threshold": spikes.THRESHOLD,
                         "logFloor": spikes.LOG_FLOOR, "madFloor": spikes.MAD_FLOOR, "madScale": spikes.MAD_SCALE}
    assert (defaults["window"].default, defaults["warmup"].default, defaults["threshold"].default,
            defaults["mad_floor"].default) == (spikes.WINDOW, spikes.WARMUP, spikes.THRESHOLD, spikes.MAD_FLOOR)


def test_browser_a_planted_spike_among_5000_samples_is_drawn(dashboard):
    page, frame, errors = dashboard
    _show(frame, "spiky", "matrices/grad_norm", view="history")
    canvas = frame.locator("canvas.lh-heatmap").first
    data = canvas.evaluate("c => ({...c.dataset})")
    width = int(float(data["plotWidth"]))
    assert int(data["columns"]) == SPIKY_SAMPLES and int(data["bins"]) == width < SPIKY_SAMPLES  # several samples a pixel
    values = spiky_values(1)[:, :, 1]
    assert float(data["scaleMax"]) < values[SPIKE_STEP, 0]  # the spike is above the colour bar: drawn at its top
    # Layer 0 (around 1e-3) sits at the bottom of the range; only the spike's pixel column is the top colour.
    spike_x = [x for x, rgb in enumerate(_row_pixels(canvas, 0)) if rgb == VIRIDIS_TOP]
    expected_x = SPIKE_STEP * width / SPIKY_SAMPLES
    assert spike_x and all(abs(x - expected_x) <= 1.5 for x in spike_x), (spike_x, expected_x)
    hovered = _hover_pixel(frame, canvas, spike_x[0], 0)
    assert hovered["step"] == str(SPIKE_STEP) and np.float32(hovered["value"]) == values[SPIKE_STEP, 0]
    assert int(hovered["binFirst"]) <= SPIKE_STEP <= int(hovered["binLast"])
    # Layer 1's NaN is drawn magenta at its own pixel column.
    nan_x = [x for x, rgb in enumerate(_row_pixels(canvas, 1)) if rgb == MAGENTA]
    assert nan_x and all(abs(x - NAN_STEP * width / SPIKY_SAMPLES) <= 1.5 for x in nan_x), nan_x
    assert _hover_pixel(frame, canvas, nan_x[0], 1)["value"] == "NaN"
    # Any pixel column shows its most extreme sample: the one furthest from the row's median.
    median = np.median(values[:, 1][np.isfinite(values[:, 1])])
    for x in (100, 517, width - 3):
        hovered = _hover_pixel(frame, canvas, x, 1)
        covered = values[int(hovered["binFirst"]):int(hovered["binLast"]) + 1, 1]
        assert np.float32(hovered["value"]) == covered[np.argmax(np.abs(covered - median))]
    assert errors == []


def test_browser_z_colouring_alert_markers_and_overview(dashboard, tmp_path):
    page, frame, errors = dashboard
    _show(frame, "spiky", "matrices/grad_norm", view="history")
    frame.locator("#lh-color-by").select_option("z")
    canvas = frame.locator("canvas.lh-heatmap").first
    assert canvas.evaluate("c => c.dataset.color") == "z"
    width = int(float(canvas.evaluate("c => c.dataset.plotWidth")))
    values = spiky_values(1)[:, :, 1]
    # The spike is red (z far above its own baseline) whatever its layer's scale; layer 1 is never that red.
    spike_x = [x for x, rgb in enumerate(_row_pixels(canvas, 0)) if rgb == DIVERGING_TOP]
    assert spike_x and all(abs(x - SPIKE_STEP * width / SPIKY_SAMPLES) <= 1.5 for x in spike_x), spike_x
    assert DIVERGING_TOP not in _row_pixels(canvas, 1) and MAGENTA in _row_pixels(canvas, 1)
    # The z shown equals spikes.py's rule, and is the largest |z| of the samples its pixel covers.
    for row in (0, 1):
        z = spikes.robust_z_series(values[:, row])  # SpikeAlert's own rule
        # After the dip, whose value entered the baseline (upward-only rule), the z differ from a two-sided rule's.
        dip_xs = [int((DIP_STEP + after) * width / SPIKY_SAMPLES) for after in (10, 30, 50, 70, 90, 110)]
        for x in (5, 300, spike_x[0], *dip_xs, width - 2):
            hovered = _hover_pixel(frame, canvas, x, row)
            step, first, last = int(hovered["step"]), int(hovered["binFirst"]), int(hovered["binLast"])
            if x == 5:  # the first 64 values have no baseline yet
                assert last < 64 and hovered["z"] == "no baseline yet"
                continue
            assert abs(float(hovered["z"]) - z[step]) <= 1e-4 * max(1.0, abs(z[step])), (row, x, hovered, z[step])
            assert abs(z[step]) == np.nanmax(np.abs(z[first:last + 1]))
    page.screenshot(path=str(tmp_path / "dashboard_z.png"))

    # Alert markers above the heatmap (one per step), titled with step, signal, z and the first layer to leave
    # its baseline.
    markers = frame.locator(".lh-alert-marker")
    assert markers.count() == 2
    titles = [markers.nth(index).get_attribute("title") for index in range(2)]
    assert titles[0].split("\n") == [
        f"spike at step {SPIKE_STEP} · loss · z 40.5 · first: layer 0 · attn.q (grad_norm, from step {SPIKE_STEP - 2})",
        f"spike at step {SPIKE_STEP} · grad_norm · z 12.3 · no layer named"]
    assert titles[1] == "spike at step 4000 · loss · z NaN · no layer named"
    assert frame.locator(".lh-alert-tick").count() == 2  # and on the step slider
    markers.nth(0).click()
    assert frame.locator("#lh-step-label").inner_text().startswith(f"step {SPIKE_STEP} (sample {SPIKE_STEP + 1} of")
    marker_x = markers.nth(0).evaluate("m => m.offsetLeft")
    assert abs(marker_x - (float(canvas.evaluate("c => c.dataset.plotLeft")) + SPIKE_STEP * width / SPIKY_SAMPLES)) <= 1.5
    frame.locator(".lh-alert-tick").nth(1).click()
    assert frame.locator("#lh-step").input_value() == "4000"

    # The overview: every metric's layer x step, each with the alerts marked.
    frame.locator("#lh-view").select_option("overview")
    frame.locator("canvas.lh-heatmap").nth(1).wait_for()
    panels = frame.locator("canvas.lh-heatmap")
    assert sorted(panels.nth(index).get_attribute("data-tag") for index in range(panels.count())) == list(SPIKY_TAGS)
    assert frame.locator(".lh-alert-marker").count() == 2 * 2
    page.screenshot(path=str(tmp_path / "dashboard_overview.png"))
    first = frame.locator("canvas.lh-heatmap").first  # a click opens that metric's layer x step view
    first.click(position=_cell_position(first, 1, 10))
    assert frame.locator("#lh-view").input_value() == "history"
    assert frame.locator("#lh-tag").input_value() == first.get_attribute("data-tag") == SPIKY_TAGS[0]
    for control, value in [("#lh-color-by", "value"), ("#lh-view", "matrix")]:
        frame.locator(control).select_option(value)
    assert errors == []
