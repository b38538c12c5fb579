// The HEATMAPS dashboard: selectors, the step slider, one heatmap per run (two when comparing), the
// overview (every metric's layer x step), spike alerts as markers, the tooltip, the colour controls (a
// value, or its robust z against its own baseline), the line chart of a clicked cell, and live refresh.
//
// What a pixel column shows when a layer x step view has more samples than pixel columns (Heatmap bins
// them): the most extreme sample it covers, per row. NaN and +/-Inf always win (drawn magenta); then,
// colouring by value: the value furthest from its series' median (the median of the finite values of that
// row over the history shown; in log10 on a log scale, where a value <= 0 is the furthest of all); colouring
// by z: the largest |z| (a value with no baseline yet loses to any z). The tooltip names the sample drawn
// and the steps its pixel column covers.

import {COLOR_MAPS, ColorScale, formatExact, formatShort} from "./colors.js";
import {ROBUST_Z, Z_NONFINITE, Z_VALUE, Z_WARMUP, robustZ} from "./baseline.js";
import {Series, fetchAlerts, fetchRuns} from "./data.js";
import {Heatmap} from "./heatmap.js";
import {drawLineChart} from "./linechart.js";
import {listenToHost} from "./host.js";

const POLL_SECONDS = 30;           // the fallback when TensorBoard sends no reload signal
const SIGNAL_QUIET_SECONDS = 45;   // how long after a reload signal polling stays off
const LINE_COLORS = ["#1f77b4", "#d62728"];
const RETENTION_FLAG = "--samples_per_plugin=lightning_heatmaps=0";
const Z_LIMIT = 2 * ROBUST_Z.threshold;  // the z colour bar spans -Z_LIMIT .. Z_LIMIT (beyond: its ends)
const ALERT_BAND = 42;                   // room above a layer x step plot for the alert markers

// A number of an alert record as text (the plugin sends NaN and infinities as strings).
function alertNumber(value) {
  return typeof value === "number" ? formatShort(value) : String(value);
}

// The layer an alert names first: the one that left its baseline earliest (smallest first_step, the
// ranking's order among equals), else the top-ranked one.
function firstLayer(alert) {
  const layers = Array.isArray(alert.layers) ? alert.layers.filter((entry) => entry && typeof entry === "object") : [];
  let first = null;
  for (const entry of layers) {
    const step = typeof entry.first_step === "number" ? entry.first_step : Infinity;
    if (first === null || step < first.step) {
      first = {entry, step};
    }
  }
  return first ? first.entry : null;
}

// An alert's one-line description: step, signal, z and the first layer and component.
export function describeAlert(alert) {
  const first = firstLayer(alert);
  const where = first
    ? `first: layer ${first.layer} · ${first.component} (${first.metric}${typeof first.first_step === "number" ? `, from step ${first.first_step}` : ""})`
    : "no layer named";
  return `spike at step ${alert.step} · ${alert.signal} · z ${alertNumber(alert.z)} · ${where}`;
}

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") {
      node.textContent = value;
    } else {
      node.setAttribute(key, value);
    }
  }
  for (const child of children) {
    node.appendChild(child);
  }
  return node;
}

function labelled(text, control) {
  return element("label", {class: "lh-field"}, [element("span", {text}), control]);
}

function setOptions(select, options, selected) {
  // options: [[value, text], ...]; keeps `selected` when it is still offered.
  const current = options.some(([value]) => value === selected) ? selected : options.length ? options[0][0] : "";
  select.replaceChildren(...options.map(([value, text]) => element("option", {value, text})));
  select.value = current;
  return current;
}

export class Dashboard {
  constructor(root) {
    this.root = root;
    this.runs = {};
    this.cache = new Map();
    this.state = {
      run: "", tag: "", view: "matrix", column: -1, compare: "", scale: "linear", range: "robust",
      min: "", max: "", cmap: "viridis", sample: -1, follow: true, cell: null, color: "value",
    };
    this.alerts = {};   // run -> {alerts: [record, ...], kept, written}
    this.zMemo = new Map();
    this.medianMemo = new Map();
    this.lastSignal = -Infinity;
    this.refreshing = null;
    this.rangeMemo = new Map();
    this.build();
  }

  // --- layout -------------------------------------------------------------------------------

  build() {
    const select = (id) => element("select", {id});
    this.controls = {
      run: select("lh-run"), tag: select("lh-tag"), view: select("lh-view"), column: select("lh-column"),
      compare: select("lh-compare"), scale: select("lh-scale"), range: select("lh-range"), cmap: select("lh-cmap"),
      color: select("lh-color-by"),
      min: element("input", {id: "lh-min", type: "number", step: "any", placeholder: "min"}),
      max: element("input", {id: "lh-max", type: "number", step: "any", placeholder: "max"}),
      step: element("input", {id: "lh-step", type: "range", min: "0", max: "0", value: "0"}),
      follow: element("button", {id: "lh-follow", type: "button", title: "Follow the newest sample"}),
    };
    const c = this.controls;
    setOptions(c.view, [["matrix", "layer × component at a step"], ["history", "layer × step"],
                        ["overview", "overview: every metric, layer × step"]], "matrix");
    setOptions(c.color, [["value", "value"], ["z", "z against its own baseline"]], "value");
    setOptions(c.scale, [["linear", "linear"], ["log", "log"]], "linear");
    setOptions(c.range, [["robust", "auto: 1st–99th percentile"], ["minmax", "auto: min–max"],
                         ["step", "auto: this step"], ["fixed", "fixed"]], "robust");
    setOptions(c.cmap, COLOR_MAPS.map((name) => [name, name]), "viridis");
    this.columnField = labelled("Column", c.column);
    this.fixedFields = element("span", {class: "lh-fixed"}, [c.min, c.max]);
    this.colorField = labelled("Colour by", c.color);
    this.valueFields = [labelled("Scale", c.scale), labelled("Range", c.range), this.fixedFields, labelled("Colours", c.cmap)];
    this.legend = element("div", {id: "lh-legend", class: "lh-legend", hidden: ""});
    this.alertStrip = element("div", {id: "lh-alert-strip", class: "lh-alert-strip"});
    this.stepLabel = element("span", {id: "lh-step-label", class: "lh-step-label"});
    this.panels = element("div", {class: "lh-panels"});
    this.tooltip = element("div", {id: "lh-tooltip", class: "lh-tooltip", hidden: ""});
    this.chartCanvas = element("canvas", {id: "lh-chart"});
    this.chart = element("div", {class: "lh-chart", hidden: ""}, [this.chartCanvas]);
    this.chartCanvas.addEventListener("mousemove", (event) => this.hoverChart(event));
    this.chartCanvas.addEventListener("mouseleave", () => {
      this.chartPointer = null;
      this.tooltip.hidden = true;
    });
    this.status = element("div", {id: "lh-status", class: "lh-status"});
    this.message = element("div", {id: "lh-message", class: "lh-message"});
    this.root.replaceChildren(
      element("div", {class: "lh-toolbar"}, [
        labelled("Run", c.run), labelled("Metric", c.tag), labelled("View", c.view), this.columnField,
        labelled("Compare with", c.compare),
      ]),
      element("div", {class: "lh-toolbar"}, [this.colorField, ...this.valueFields]),
      element("div", {class: "lh-stepbar"}, [c.follow, element("div", {class: "lh-slider"}, [c.step, this.alertStrip]), this.stepLabel]),
      this.message, this.legend, this.panels, this.chart, this.status, this.tooltip,
    );

    c.run.addEventListener("change", () => this.select({run: c.run.value}));
    c.tag.addEventListener("change", () => this.select({tag: c.tag.value}));
    c.view.addEventListener("change", () => this.select({view: c.view.value}));
    c.column.addEventListener("change", () => this.update({column: Number(c.column.value)}));
    c.compare.addEventListener("change", () => this.select({compare: c.compare.value}));
    c.scale.addEventListener("change", () => this.update({scale: c.scale.value}));
    c.range.addEventListener("change", () => this.update({range: c.range.value}));
    c.cmap.addEventListener("change", () => this.update({cmap: c.cmap.value}));
    c.color.addEventListener("change", () => this.update({color: c.color.value}));
    c.min.addEventListener("change", () => this.update({min: c.min.value}));
    c.max.addEventListener("change", () => this.update({max: c.max.value}));
    c.step.addEventListener("input", () => {
      const sample = Number(c.step.value);
      this.update({sample, follow: sample === Number(c.step.max) && this.state.follow});
    });
    c.follow.addEventListener("click", () => {
      const series = this.primary();
      this.update({follow: !this.state.follow, sample: series ? series.samples - 1 : -1});
    });
    window.addEventListener("resize", () => this.render());
  }

  // --- data ---------------------------------------------------------------------------------

  start() {
    const hosted = listenToHost({
      "experimental.DataReloaded": () => {
        this.lastSignal = performance.now();
        this.refresh();
      },
    });
    this.root.dataset.hosted = String(hosted);
    setInterval(() => {
      if ((performance.now() - this.lastSignal) / 1000 > SIGNAL_QUIET_SECONDS) {
        this.refresh();
      }
    }, POLL_SECONDS * 1000);
    return this.refresh();
  }

  series(run, tag) {
    const key = `${run}\u0000${tag}`;
    if (!this.cache.has(key)) {
      this.cache.set(key, new Series(run, tag));
    }
    return this.cache.get(key);
  }

  primary() {
    const {run, tag} = this.state;
    return run && tag ? this.series(run, tag) : null;
  }

  secondary() {
    const {compare, tag} = this.state;
    return compare && tag && this.runs[compare] && this.runs[compare][tag] ? this.series(compare, tag) : null;
  }

  content(run = this.state.run, tag = this.state.tag) {
    const content = (this.runs[run] || {})[tag];
    return content && Array.isArray(content.column_labels) && Array.isArray(content.row_labels) ? content : null;
  }

  // The run's metrics the overview shows: every matrix tag this version can read, in name order.
  overviewTags() {
    return Object.keys(this.runs[this.state.run] || {}).filter((tag) => this.content(this.state.run, tag)).sort();
  }

  // The series the current view draws (and a refresh must bring up to date).
  shownSeries() {
    if (this.state.view === "overview") {
      return this.overviewTags().map((tag) => this.series(this.state.run, tag));
    }
    return [this.primary(), this.secondary()].filter((series) => series);
  }

  // A metric's default column over steps: the pooled `all` one when it has one, else the first.
  defaultColumn(content) {
    return content.pooled_column ? content.column_labels.length - 1 : 0;
  }

  // Reloads the listing and fetches what is new of the series on screen; one refresh at a time.
  refresh() {
    if (this.refreshing) {
      this.refreshAgain = true;
      return this.refreshing;
    }
    this.refreshing = (async () => {
      do {
        this.refreshAgain = false;
        try {
          this.runs = await fetchRuns();
          this.fillSelectors();
          for (const series of this.shownSeries()) {
            const added = await series.update();
            if (added) {
              this.rangeMemo.clear();
            }
          }
          for (const run of new Set([this.state.run, this.state.compare].filter((run) => run && this.runs[run]))) {
            try {
              this.alerts[run] = await fetchAlerts(run);
            } catch (error) {  // the heatmaps still show; the status line says the alerts did not load
              this.alerts[run] = {alerts: [], kept: 0, written: 0, error: String(error.message || error)};
            }
          }
          this.updated = new Date();
          this.error = null;
        } catch (error) {
          this.error = String(error.message || error);
        }
        this.render();
      } while (this.refreshAgain);
      this.refreshing = null;
    })();
    return this.refreshing;
  }

  fillSelectors() {
    const c = this.controls;
    const runs = Object.keys(this.runs).sort();
    this.state.run = setOptions(c.run, runs.map((run) => [run, run]), this.state.run);
    // A tag whose content this version cannot read (the plugin reports {"error": ...}) is not offered.
    const tags = Object.entries(this.runs[this.state.run] || {})
      .filter(([, content]) => Array.isArray(content.row_labels) && Array.isArray(content.column_labels))
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([tag, content]) => [tag, `${content.metric || tag} · ${(content.kind || "").replace(/_x_/g, " × ")} (${content.callback || "?"})`]);
    const tag = setOptions(c.tag, tags, this.state.tag);
    if (tag !== this.state.tag) {
      this.state.tag = tag;
      this.adoptDefaults();
    }
    const others = runs.filter((run) => run !== this.state.run && this.runs[run][this.state.tag]);
    this.state.compare = setOptions(c.compare, [["", "(none)"], ...others.map((run) => [run, run])], this.state.compare);
    const content = this.content();
    const labels = content ? content.column_labels : [];
    if (this.state.column < 0 || this.state.column >= labels.length) {
      this.state.column = content && content.pooled_column ? labels.length - 1 : 0;
    }
    setOptions(c.column, labels.map((label, index) => [String(index), label]), String(this.state.column));
  }

  // A metric's own starting colour settings (log scale, fixed range) from what the callback wrote.
  adoptDefaults() {
    const content = this.content();
    if (!content) {
      return;
    }
    Object.assign(this.state, {scale: content.log_scale ? "log" : "linear", column: -1, cell: null, sample: -1, follow: true});
    if (content.color_limits) {
      Object.assign(this.state, {range: "fixed", min: String(content.color_limits[0]), max: String(content.color_limits[1])});
    } else {
      this.state.range = "robust";
    }
    this.syncControls();
  }

  // Shows state that changed without the user (a metric's defaults) in the controls. Only then: a render
  // that rewrote them would lose what the user is typing when a live refresh lands.
  syncControls() {
    const c = this.controls;
    for (const name of ["view", "scale", "range", "cmap", "min", "max", "color"]) {
      c[name].value = this.state[name];
    }
  }

  async select(change) {
    if (change.tag !== undefined && change.tag !== this.state.tag) {
      this.state.tag = change.tag;
      this.adoptDefaults();
    }
    if (change.run !== undefined && change.run !== this.state.run) {
      Object.assign(this.state, {run: change.run, sample: -1, follow: true});
    }
    Object.assign(this.state, change);
    this.fillSelectors();
    this.render();
    await this.refresh();
  }

  update(change) {
    Object.assign(this.state, change);
    this.render();
  }

  // --- drawing ------------------------------------------------------------------------------

  missingMap(content) {
    const map = new Map();
    for (const [row, column, reason] of content.missing || []) {
      map.set(row * content.column_labels.length + column, reason);
    }
    return map;
  }

  // The columns the current view shows: every column but the pooled `all` one at a step, one over steps.
  shownColumns(content) {
    const count = content.column_labels.length;
    if (this.state.view === "history") {
      return [this.state.column];
    }
    const columns = [...Array(count).keys()];
    return content.pooled_column && count > 1 ? columns.slice(0, -1) : columns;
  }

  // Automatic range over the finite values (positive ones on a log scale) of every shown cell of `picks`
  // ({series, from, to}: sample ranges). "robust" takes the 1st to 99th percentile (from a 2048-bin
  // histogram, in log space on a log scale), so a few extreme samples do not wash out the picture; values
  // beyond are drawn at the ends of the colour bar, which then reads <= and >=.
  autoRange(picks, columns, missing, log, robust) {
    const key = [...picks.map((p) => `${p.series.run}:${p.series.tag}:${p.series.samples}:${p.from}:${p.to}`), columns.join(","), log, robust].join("|");
    if (this.rangeMemo.has(key)) {
      return this.rangeMemo.get(key);
    }
    // The shown finite values (log10 on a log scale), gathered once into one typed array.
    let total = 0;
    for (const {series, from, to} of picks) {
      total += (to - from) * series.rows * columns.length;
    }
    const gathered = new Float32Array(total);
    let count = 0;
    for (const {series, from, to} of picks) {
      const {rows, columns: width, values} = series;
      const shown = [];
      for (let row = 0; row < rows; row++) {
        for (const column of columns) {
          if (!missing.has(row * width + column)) {
            shown.push(row * width + column);
          }
        }
      }
      for (let sample = from; sample < to; sample++) {
        const base = sample * rows * width;
        for (let i = 0; i < shown.length; i++) {
          const value = values[base + shown[i]];
          if (value === value && value !== Infinity && value !== -Infinity && (!log || value > 0)) {
            gathered[count++] = log ? Math.log10(value) : value;
          }
        }
      }
    }
    let low = Infinity;
    let high = -Infinity;
    for (let i = 0; i < count; i++) {
      const value = gathered[i];
      if (value < low) low = value;
      if (value > high) high = value;
    }
    let range = null;
    if (count) {
      let [from, to] = [low, high];
      if (robust && count >= 100 && high > low) {
        const bins = new Uint32Array(2048);
        const scale = bins.length / (high - low);
        for (let i = 0; i < count; i++) {
          bins[Math.min(bins.length - 1, Math.floor((gathered[i] - low) * scale))]++;
        }
        const width = (high - low) / bins.length;
        let seen = 0;
        let first = 0;
        while (first < bins.length - 1 && (seen += bins[first]) < 0.01 * count) first++;
        seen = 0;
        let last = bins.length - 1;
        while (last > first && (seen += bins[last]) < 0.01 * count) last--;
        [from, to] = [Math.max(low, low + first * width), Math.min(high, low + (last + 1) * width)];
      }
      const value = (x) => (log ? Math.pow(10, x) : x);
      range = {low: value(from), high: value(to), clippedLow: from > low, clippedHigh: to < high};
    }
    this.rangeMemo.set(key, range);
    return range;
  }

  colorScale(seriesList, columns, missing, samples) {
    const log = this.state.scale === "log";
    let low;
    let high;
    let clipped = {clippedLow: false, clippedHigh: false};
    let problem = null;
    if (this.state.range === "fixed") {
      low = Number(this.state.min);
      high = Number(this.state.max);
      if (this.state.min === "" || this.state.max === "" || !Number.isFinite(low) || !Number.isFinite(high) || !(low < high)) {
        problem = "Fixed range needs numbers min < max; showing the automatic range.";
      } else if (log && low <= 0) {
        problem = "A log scale needs min > 0; showing the automatic range.";
      }
    }
    if (this.state.range !== "fixed" || problem) {
      // "this step" means the picture on screen: in the layer x step view, that is the whole history.
      const atStep = this.state.range === "step" && this.state.view === "matrix";
      const picks = seriesList.map((series, index) => ({
        series, from: atStep ? samples[index] : 0, to: atStep ? samples[index] + 1 : series.samples,
      }));
      const range = this.autoRange(picks, columns, missing, log, this.state.range === "robust" || !!problem)
        || {low: log ? 1e-3 : 0, high: 1, clippedLow: false, clippedHigh: false};
      ({low, high} = range);
      clipped = range;
      if (this.state.cmap === "diverging" && !log) {
        const extent = Math.max(Math.abs(low), Math.abs(high)) || 1;
        [low, high] = [-extent, extent];
      }
      if (!(high > low)) {
        [low, high] = log ? [low / 2, low * 2] : [low - 1, high + 1];
      }
    }
    const scale = new ColorScale(low, high, log);
    scale.clippedLow = clipped.clippedLow;
    scale.clippedHigh = clipped.clippedHigh;
    return {scale, problem};
  }

  render() {
    const started = performance.now();
    const c = this.controls;
    this.tooltip.hidden = true;  // it described the previous picture; redone below for the cell under the pointer
    const content = this.content();
    const primary = this.primary();
    const view = this.state.view;
    const zMode = this.state.color === "z" && view !== "matrix";
    this.colorField.hidden = view === "matrix";
    for (const field of this.valueFields) {
      field.hidden = zMode || view === "overview";
    }
    this.fixedFields.hidden = zMode || view === "overview" || this.state.range !== "fixed";
    this.columnField.hidden = view !== "history";
    c.compare.parentElement.hidden = view === "overview";
    c.follow.textContent = this.state.follow ? "❚❚ following newest" : "▶ follow newest";
    c.follow.setAttribute("aria-pressed", String(this.state.follow));
    this.renderLegend(zMode, view);

    if (!content || !primary || !primary.samples) {
      this.panels.replaceChildren();
      this.alertStrip.replaceChildren();
      this.heatmaps = [];
      this.layoutKey = null;
      this.pointer = null;
      this.message.textContent = this.error
        ? `Could not load heatmaps: ${this.error}`
        : Object.keys(this.runs).length
          ? "Loading…"
          : "No heatmap matrices yet. Add a lightning-heatmaps callback to a Trainer that has a TensorBoardLogger; this tab fills in at every sample.";
      this.status.textContent = "";
      return;
    }
    if (this.state.follow || this.state.sample < 0 || this.state.sample >= primary.samples) {
      this.state.sample = primary.samples - 1;
    }
    c.step.max = String(primary.samples - 1);
    c.step.value = String(this.state.sample);
    const step = primary.steps[this.state.sample];
    this.stepLabel.textContent = `step ${step} (sample ${this.state.sample + 1} of ${primary.samples})`;
    this.renderAlertStrip(primary);

    const totalWidth = Math.max(320, this.root.clientWidth - 8);
    const panels = view === "overview" ? this.overviewPanels(step, zMode) : this.mainPanels(content, primary, step, totalWidth, zMode);
    this.missing = this.missingMap(content);
    const layoutKey = `${view}|${panels.map((panel) => `${panel.series.run}\u0000${panel.series.tag}`).join("|")}`;
    if (layoutKey !== this.layoutKey || !this.heatmaps || this.heatmaps.length !== panels.length) {
      this.layoutKey = layoutKey;
      this.heatmaps = panels.map((panel, index) => {
        const canvas = element("canvas", {class: "lh-heatmap", "data-panel": String(index)});
        const heatmap = new Heatmap(canvas);
        canvas.addEventListener("mousemove", (event) => this.hover(heatmap, event));
        canvas.addEventListener("mouseleave", () => {
          this.pointer = null;
          this.tooltip.hidden = true;
        });
        canvas.addEventListener("click", (event) => this.click(heatmap, event));
        heatmap.panel = element("div", {class: "lh-panel"}, [canvas]);
        return heatmap;
      });
      this.panels.className = view === "overview" ? "lh-panels lh-overview" : "lh-panels";
      this.panels.replaceChildren(...this.heatmaps.map((heatmap) => heatmap.panel));
    }
    panels.forEach((panel, index) => {
      const heatmap = this.heatmaps[index];
      Object.assign(heatmap, {series: panel.series, sample: panel.sample, content: panel.content, missing: panel.missing,
                              zRows: panel.zRows || null});
      Object.assign(heatmap.canvas.dataset, {run: panel.series.run, tag: panel.series.tag, color: zMode ? "z" : "value"});
      heatmap.draw(panel.spec, panel.width, panel.height);
      this.placeAlertMarkers(heatmap, panel.markAlerts);
    });
    if (view === "overview") {
      this.chart.hidden = true;
    } else {
      this.renderChart(content, panels.map((panel) => panel.series), this.missing);
    }
    if (this.pointer && this.heatmaps[this.pointer.panel]) {
      this.hover(this.heatmaps[this.pointer.panel], this.pointer);  // a live refresh updates the tooltip in place
    } else if (this.chartPointer && !this.chart.hidden) {
      this.hoverChart(this.chartPointer);  // so does the line chart's
    }
    this.root.dataset.renderMs = (performance.now() - started).toFixed(2);
    const first = primary.steps[0];
    const last = primary.steps[primary.samples - 1];
    const kept = `${primary.samples} samples, steps ${first}–${last}`;
    const bytes = panels.reduce((total, panel) => total + panel.series.bytesReceived, 0);
    const expected = content.every_n_steps ? Math.floor(last / content.every_n_steps) + 1 : 0;
    const hint = expected > primary.samples * 1.1
      ? ` · TensorBoard keeps ${primary.samples} of about ${expected} samples: start it with ${RETENTION_FLAG} to keep the whole history.`
      : "";
    const when = this.updated ? ` · updated ${this.updated.toLocaleTimeString()}` : "";
    this.status.textContent = `${kept} · ${(bytes / 1024).toFixed(1)} KiB received${when}${hint}${this.alertStatus(primary)}${this.error ? ` · refresh failed: ${this.error}` : ""}`;
  }

  // The heatmaps of the layer x component and layer x step views: one per run (two when comparing).
  mainPanels(content, primary, step, totalWidth, zMode) {
    const secondary = this.secondary();
    const missing = this.missingMap(content);
    const columns = this.shownColumns(content);
    const all = [primary, secondary].filter((series) => series && series.samples && series.columns === primary.columns);
    const samples = all.map((series, index) => (index === 0 ? this.state.sample : series.sampleAtStep(step)));
    let scale;
    if (zMode) {
      scale = this.zScale();
      this.message.textContent = "";
    } else {
      const chosen = this.colorScale(all, columns, missing, samples);
      scale = chosen.scale;
      this.message.textContent = chosen.problem || "";
    }
    const width = all.length > 1 ? Math.floor((totalWidth - 12) / 2) : totalWidth;
    const height = Math.min(640, Math.max(280, primary.rows * 18 + 110)) + (this.state.view === "history" ? ALERT_BAND - 26 : 0);
    return all.map((series, index) => {
      const panel = {series, content, missing, sample: samples[index], width, height, markAlerts: this.state.view === "history"};
      panel.spec = this.spec(series, panel.sample, content, columns, missing, scale, zMode, panel);
      return panel;
    });
  }

  // The overview: every metric of the run, layer x step of its default column, each on its own colour
  // scale (its own defaults: log or linear, its fixed range or the automatic robust one) or the z scale.
  overviewPanels(step, zMode) {
    this.message.textContent = "";
    // Two a row: the root's width less its padding (2 x 16 px) and the gap between panels (12 px).
    const width = Math.max(320, Math.floor((this.root.clientWidth - 32 - 12) / 2));
    const panels = [];
    for (const tag of this.overviewTags()) {
      const series = this.series(this.state.run, tag);
      const content = this.content(this.state.run, tag);
      if (!series.samples || series.columns !== content.column_labels.length) {
        continue;
      }
      const column = this.defaultColumn(content);
      const missing = this.missingMap(content);
      let scale = zMode ? this.zScale() : null;
      if (!scale) {
        const log = !!content.log_scale;
        const limits = content.color_limits;
        if (limits && limits[0] < limits[1] && (!log || limits[0] > 0)) {
          scale = new ColorScale(limits[0], limits[1], log);
        } else {
          const range = this.autoRange([{series, from: 0, to: series.samples}], [column], missing, log, true)
            || {low: log ? 1e-3 : 0, high: 1, clippedLow: false, clippedHigh: false};
          let [low, high] = [range.low, range.high];
          if (!(high > low)) {
            [low, high] = log ? [low / 2, low * 2] : [low - 1, high + 1];
          }
          scale = Object.assign(new ColorScale(low, high, log), {clippedLow: range.clippedLow, clippedHigh: range.clippedHigh});
        }
      }
      const height = Math.min(360, Math.max(200, series.rows * 10 + 100)) + ALERT_BAND - 26;
      const panel = {series, content, missing, sample: series.sampleAtStep(step), width, height, markAlerts: true};
      panel.spec = this.historySpec(series, panel.sample, content, column, missing, scale, zMode, panel, "viridis");
      panels.push(panel);
    }
    return panels;
  }

  zScale() {
    return Object.assign(new ColorScale(-Z_LIMIT, Z_LIMIT, false), {clippedLow: true, clippedHigh: true});
  }

  renderLegend(zMode, view) {
    const lines = [];
    if (zMode) {
      lines.push(`Colour: each cell's robust z against its own series' previous values: ln|value| minus the median of ` +
                 `the previous ${ROBUST_Z.window} values that were not spikes, over ${ROBUST_Z.madScale} × their MAD (floored at ` +
                 `${ROBUST_Z.madFloor}). Blue: below its baseline; red: above; z > ${ROBUST_Z.threshold} is a spike ` +
                 `(kept out of the baseline). Mid grey: no baseline yet (fewer than ${ROBUST_Z.warmup} earlier values); ` +
                 `magenta: NaN or ±Inf.`);
    }
    if (view === "overview") {
      lines.push("Every metric of the run, layer × step of its pooled “all” column (or its first), each on its own colour " +
                 "scale. Click a heatmap to open it; click a ▼ marker to go to that alert's step.");
    }
    this.legend.hidden = !lines.length;
    this.legend.replaceChildren(...lines.map((text) => element("div", {text})));
  }

  // --- alerts ---------------------------------------------------------------------------------

  // The index of the first sample at or after `step` in `series`, or -1 when every sample is before it.
  sampleFor(series, step) {
    if (!series.samples || series.steps[series.samples - 1] < step) {
      return -1;
    }
    const sample = series.sampleAtStep(step);
    return series.steps[sample] >= step ? sample : sample + 1;
  }

  runAlerts(run) {
    const data = this.alerts[run];
    return data && Array.isArray(data.alerts) ? data.alerts.filter((alert) => alert && typeof alert.step === "number") : [];
  }

  // Scrubs the slider to an alert: the first sample of the selected metric at or after its step.
  scrubTo(alert) {
    const primary = this.primary();
    const sample = primary ? this.sampleFor(primary, alert.step) : -1;
    if (sample >= 0) {
      this.update({sample, follow: false});
    }
  }

  // A run's alerts grouped by the sample of `series` they map to (alerts at one step share one marker):
  // [{sample, alerts}], in step order, leaving out alerts after the newest sample.
  alertGroups(run, series) {
    const groups = new Map();
    for (const alert of this.runAlerts(run)) {
      const sample = this.sampleFor(series, alert.step);
      if (sample >= 0) {
        groups.set(sample, [...(groups.get(sample) || []), alert]);
      }
    }
    return [...groups].map(([sample, alerts]) => ({sample, alerts}));
  }

  // One marker: its title describes every alert it stands for (one line each); a click scrubs to the first.
  alertButton({sample, alerts}, className) {
    const button = element("button", {type: "button", class: className, title: alerts.map(describeAlert).join("\n"),
                                      text: "▼", "data-step": String(alerts[0].step), "data-sample": String(sample),
                                      "data-alerts": String(alerts.length)});
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      this.scrubTo(alerts[0]);
    });
    return button;
  }

  renderAlertStrip(primary) {
    const last = Math.max(1, primary.samples - 1);
    this.alertStrip.replaceChildren(...this.alertGroups(this.state.run, primary).map((group) => {
      const button = this.alertButton(group, "lh-alert-tick");
      // The slider's thumb centre runs from 8 px to the track's width minus 8 px.
      button.style.left = `calc(${(100 * group.sample) / last}% + ${8 - (16 * group.sample) / last}px)`;
      return button;
    }));
  }

  // Markers above a layer x step heatmap, at the pixel column of the first sample at or after each alert.
  placeAlertMarkers(heatmap, wanted) {
    for (const old of heatmap.panel.querySelectorAll(".lh-alert-marker")) {
      old.remove();
    }
    if (!wanted) {
      return;
    }
    for (const group of this.alertGroups(heatmap.series.run, heatmap.series)) {
      const button = this.alertButton(group, "lh-alert-marker");
      button.style.left = `${heatmap.columnCenter(group.sample)}px`;
      button.style.top = `${heatmap.plot.top - 16}px`;
      heatmap.panel.appendChild(button);
    }
  }

  alertStatus(primary) {
    const data = this.alerts[this.state.run];
    const alerts = this.runAlerts(this.state.run);
    if (data && data.error) {
      return ` · spike alerts could not be loaded: ${data.error}`;
    }
    if (!data || !alerts.length) {
      return data ? " · no spike alerts" : "";
    }
    const later = alerts.filter((alert) => this.sampleFor(primary, alert.step) < 0).length;
    const dropped = data.written > data.kept
      ? ` (TensorBoard keeps ${data.kept} of at least ${data.written}: start it with ${RETENTION_FLAG} to keep them all)`
      : "";
    return ` · ${alerts.length} spike alert${alerts.length > 1 ? "s" : ""}${dropped}${later ? `, ${later} after the newest sample of this metric (not marked yet)` : ""}`;
  }

  // --- what a layer x step view shows -----------------------------------------------------------

  // Robust z of every row of one column of a series (memoised until the series grows).
  zRowsOf(series, column) {
    const key = `${series.run}\u0000${series.tag}\u0000${column}`;
    const memo = this.zMemo.get(key);
    if (memo && memo.samples === series.samples && memo.rows.length === series.rows) {
      return memo.rows;
    }
    const rows = [];
    for (let row = 0; row < series.rows; row++) {
      rows.push(robustZ((sample) => series.value(sample, row, column), series.samples));
    }
    this.zMemo.set(key, {samples: series.samples, rows});
    return rows;
  }

  // The median of each row's finite values of one column (log10 of the positive ones on a log scale).
  mediansOf(series, column, log) {
    const key = `${series.run}\u0000${series.tag}\u0000${column}\u0000${log}`;
    const memo = this.medianMemo.get(key);
    if (memo && memo.samples === series.samples && memo.medians.length === series.rows) {
      return memo.medians;
    }
    const medians = new Float64Array(series.rows);
    const scratch = new Float64Array(series.samples);
    for (let row = 0; row < series.rows; row++) {
      let count = 0;
      for (let sample = 0; sample < series.samples; sample++) {
        const value = series.value(sample, row, column);
        if (Number.isFinite(value) && (!log || value > 0)) {
          scratch[count++] = log ? Math.log10(value) : value;
        }
      }
      const sorted = scratch.subarray(0, count).sort();
      medians[row] = count ? (count % 2 ? sorted[count >> 1] : (sorted[(count >> 1) - 1] + sorted[count >> 1]) / 2) : 0;
    }
    this.medianMemo.set(key, {samples: series.samples, medians});
    return medians;
  }

  historySpec(series, sample, content, column, missing, scale, zMode, panel, cmap) {
    const prefix = this.state.compare && this.state.view !== "overview" ? `${series.run}: ` : "";
    const rowAxis = content.row_axis || "layer";
    const isMissing = (row) => missing.get(row * series.columns + column) || null;
    const spec = {
      title: `${prefix}${content.metric} (${content.column_labels[column]}): ${rowAxis} × step${zMode ? ", z against its own baseline" : ""}`,
      metric: content.metric, rows: series.rows, columns: series.samples, rowLabels: content.row_labels,
      columnSteps: series.steps.subarray(0, series.samples), xAxis: "step", yAxis: rowAxis,
      missing: isMissing, scale, cmap, marker: sample, topMargin: ALERT_BAND,
      describe: (row, index) => ({row, column, sample: index}),
    };
    if (zMode) {
      const zRows = this.zRowsOf(series, column);
      panel.zRows = zRows;
      Object.assign(spec, {
        cmap: "diverging", legend: "robust z vs own baseline",
        value: (row, index) => zRows[row].z[index],
        blank: (row, index) => zRows[row].kind[index] === Z_WARMUP,
        score: (row, index) => {
          const kind = zRows[row].kind[index];
          return kind === Z_NONFINITE ? Infinity : kind === Z_VALUE ? Math.abs(zRows[row].z[index]) : -Infinity;
        },
      });
    } else {
      const log = scale.log;
      const medians = this.mediansOf(series, column, log);
      Object.assign(spec, {
        value: (row, index) => series.value(index, row, column),
        score: (row, index) => {
          const value = series.value(index, row, column);
          if (!Number.isFinite(value)) {
            return Infinity;
          }
          if (log && value <= 0) {
            return Number.MAX_VALUE;
          }
          return Math.abs((log ? Math.log10(value) : value) - medians[row]);
        },
      });
    }
    return spec;
  }

  spec(series, sample, content, columns, missing, scale, zMode, panel) {
    if (this.state.view === "history") {
      return this.historySpec(series, sample, content, columns[0], missing, scale, zMode, panel, this.state.cmap);
    }
    const prefix = this.state.compare ? `${series.run}: ` : "";
    const rowAxis = content.row_axis || "layer";
    const reasonAt = (row, column) => missing.get(row * series.columns + column) || null;
    return {
      title: `${prefix}${content.metric}: ${rowAxis} × ${content.column_axis} at step ${series.steps[sample]}`,
      metric: content.metric, rows: series.rows, columns: columns.length, rowLabels: content.row_labels,
      columnLabels: columns.map((column) => content.column_labels[column]), xAxis: content.column_axis, yAxis: rowAxis,
      value: (row, index) => series.value(sample, row, columns[index]), missing: (row, index) => reasonAt(row, columns[index]),
      scale, cmap: this.state.cmap,
      describe: (row, index) => ({row, column: columns[index], sample}),
    };
  }

  // --- interaction ----------------------------------------------------------------------------

  cellOf(heatmap, event) {
    const box = heatmap.canvas.getBoundingClientRect();
    const cell = heatmap.cellAt(event.clientX - box.left, event.clientY - box.top);
    if (!cell) {
      return null;
    }
    const described = heatmap.spec.describe(cell.row, cell.column);
    if (cell.first !== undefined) {
      Object.assign(described, {first: cell.first, last: cell.last});
    }
    return described;
  }

  hover(heatmap, event) {
    this.pointer = {panel: this.heatmaps.indexOf(heatmap), clientX: event.clientX, clientY: event.clientY};
    const cell = this.cellOf(heatmap, event);
    if (!cell) {
      this.tooltip.hidden = true;
      return;
    }
    const content = heatmap.content;
    const series = heatmap.series;
    const reason = heatmap.missing.get(cell.row * series.columns + cell.column);
    const value = series.value(cell.sample, cell.row, cell.column);
    const text = reason || formatExact(value);
    const lines = [
      ...(this.state.compare && this.state.view !== "overview" ? [series.run] : []),
      ...(this.state.view === "overview" ? [content.metric] : []),
      `${content.row_axis || "layer"} ${content.row_labels[cell.row]} · ${content.column_labels[cell.column]}`,
      `step ${series.steps[cell.sample]}`,
    ];
    const data = {row: String(cell.row), column: String(cell.column), step: String(series.steps[cell.sample]), value: text,
                  run: series.run, tag: series.tag, z: "", binFirst: "", binLast: ""};
    if (cell.first !== undefined) {
      const [from, to] = [series.steps[cell.first], series.steps[cell.last]];
      lines.push(`this pixel column: steps ${from}–${to} (${cell.last - cell.first + 1} samples), its most extreme drawn`);
      Object.assign(data, {binFirst: String(from), binLast: String(to)});
    }
    if (heatmap.zRows && !reason) {
      const {z, kind} = heatmap.zRows[cell.row];
      const zText = kind[cell.sample] === Z_VALUE ? formatShort(z[cell.sample])
        : kind[cell.sample] === Z_WARMUP ? "no baseline yet" : "none (NaN/Inf)";
      lines.push(`z against its own baseline: ${zText}`);
      data.z = kind[cell.sample] === Z_VALUE ? String(z[cell.sample]) : zText;
    }
    lines.push(text);
    this.tooltip.replaceChildren(...lines.map((line, index) => element("div", {text: line, class: index === lines.length - 1 ? "lh-value" : ""})));
    Object.assign(this.tooltip.dataset, data);
    this.tooltip.hidden = false;
    const x = Math.min(event.clientX + 14, window.innerWidth - this.tooltip.offsetWidth - 4);
    const y = Math.min(event.clientY + 14, window.innerHeight - this.tooltip.offsetHeight - 4);
    this.tooltip.style.left = `${x + window.scrollX}px`;
    this.tooltip.style.top = `${y + window.scrollY}px`;
  }

  click(heatmap, event) {
    const cell = this.cellOf(heatmap, event);
    if (!cell) {
      return;
    }
    if (this.state.view === "overview") {
      // Open that metric's layer x step view.
      this.select({tag: heatmap.series.tag, view: "history"});
      this.syncControls();
      return;
    }
    this.update({cell: {row: cell.row, column: cell.column}});
  }

  // The line chart's hover: the first run's sample nearest the pointer, its step and exact value.
  hoverChart(event) {
    this.chartPointer = {offsetX: event.offsetX, clientX: event.clientX, clientY: event.clientY};
    const drawn = this.chartLines;
    const index = drawn ? drawn.nearest(event.offsetX) : -1;
    if (index < 0) {
      this.tooltip.hidden = true;
      return;
    }
    const {lines, content, cell, reason} = drawn;
    const [line] = lines;
    const value = reason || formatExact(line.values[index]);
    const label = `${content.row_axis || "layer"} ${content.row_labels[cell.row]} · ${content.column_labels[cell.column]}`;
    this.tooltip.replaceChildren(...[line.label, label, `step ${line.steps[index]}`, value].map(
      (text, position) => element("div", {text, class: position === 3 ? "lh-value" : ""})));
    Object.assign(this.tooltip.dataset, {row: String(cell.row), column: String(cell.column), step: String(line.steps[index]),
                                         value, run: line.label, tag: "", z: "", binFirst: "", binLast: ""});
    this.tooltip.hidden = false;
    const x = Math.min(event.clientX + 14, window.innerWidth - this.tooltip.offsetWidth - 4);
    const y = Math.min(event.clientY + 14, window.innerHeight - this.tooltip.offsetHeight - 4);
    this.tooltip.style.left = `${x + window.scrollX}px`;
    this.tooltip.style.top = `${y + window.scrollY}px`;
  }

  renderChart(content, seriesList, missing) {
    const cell = this.state.cell;
    if (!cell || cell.row >= content.row_labels.length || cell.column >= content.column_labels.length) {
      this.chart.hidden = true;
      this.chartLines = null;
      return;
    }
    this.chart.hidden = false;
    const lines = seriesList.map((series, index) => {
      const values = new Float64Array(series.samples);
      for (let sample = 0; sample < series.samples; sample++) {
        values[sample] = series.value(sample, cell.row, cell.column);
      }
      return {label: series.run, steps: series.steps.subarray(0, series.samples), values, color: LINE_COLORS[index % 2]};
    });
    const reason = missing.get(cell.row * content.column_labels.length + cell.column);
    const title = `${content.metric}: ${content.row_axis || "layer"} ${content.row_labels[cell.row]} · ${content.column_labels[cell.column]} over steps${reason ? ` (${reason})` : ""}`;
    const primary = seriesList[0];
    const nearest = drawLineChart(this.chartCanvas, {
      title, lines, log: this.state.scale === "log", currentStep: primary.steps[this.state.sample],
    }, Math.max(320, this.root.clientWidth - 8), 220);
    this.chartLines = {lines, nearest, content, cell, reason};
    this.chartCanvas.dataset.row = String(cell.row);
    this.chartCanvas.dataset.column = String(cell.column);
    this.chartCanvas.dataset.points = String(primary.samples);
  }
}
