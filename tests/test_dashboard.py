"""The HEATMAPS dashboard (TensorBoard plugin): what the callbacks write, what the routes serve, what a browser shows.

One real training run (GradientHeatmap with a frozen component, ActivationHeatmap, LogitLensHeatmap) writes
the event file; a second run is written through the same TensorBoard sink with NaN and infinite cells.
TensorBoard's own WSGI app serves the plugin, with the default Rust data server and with
``--load_fast=false``; values are compared with the callbacks' npz files and with the event file read by
``EventAccumulator``. The browser tests start ``tensorboard`` and drive Debian's Chromium with Playwright.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from conftest import TokenModel, make_trainer, read_events, tiny_llama, token_loader
from lightning_heatmaps import ActivationHeatmap, GradientHeatmap, LogitLensHeatmap
from lightning_heatmaps.sinks import TensorBoardSink
from lightning_heatmaps_tensorboard.metadata import PLUGIN_NAME, matrix_content, matrix_tag, read_content
from lightning_heatmaps_tensorboard.plugin import decode_values

STEPS = 12
BASE = f"/data/plugin/{PLUGIN_NAME}"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """A real run (``train``) and a run with non-finite cells written through the same sink (``special``)."""
    root = tmp_path_factory.mktemp("dashboard")
    model = TokenModel(tiny_llama())
    model.model.model.layers[0].mlp.gate_proj.weight.requires_grad_(False)  # frozen: shown as "frozen"
    callbacks = [GradientHeatmap(every_n_steps=1), ActivationHeatmap(every_n_steps=2),
                 LogitLensHeatmap([[3, 4, 5, 6]], every_n_steps=4)]
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
        if set(runs) == {"train", "special"} and len(runs["train"]) == 3:
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
    assert set(train) == {"matrices/grad_norm", "matrices/activation_rms", "matrices/logit_lens/prompt_0"}
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
