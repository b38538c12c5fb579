// A heatmap on a <canvas>: cells drawn one pixel each into an offscreen image and scaled up without
// smoothing, axis labels, a colour bar with the metric's name, and hit testing for the tooltip.
//
// Rows are layers, the first at the bottom (as in the PNG images). The plot's geometry is published on the
// canvas as data attributes (data-plot-left, -top, -width, -height, data-rows, data-columns, data-bins) so
// that scripts and tests can find the pixel of a cell.
//
// A spike never hides: when there are more columns (samples) than pixel columns, the columns are binned,
// one bin per pixel column, and each bin of each row draws its most extreme column, the one with the
// highest spec.score(row, column) (the first of equals); the spec decides what extreme means (see
// dashboard.js). Hovering a bin describes the column it draws.

import {FONT, prepareCanvas} from "./canvas.js";
import {BLANK_COLOR, MISSING_COLOR, NONFINITE_COLOR, colorTable, formatShort, formatStep, niceTicks} from "./colors.js";
const COLOR_BAR_WIDTH = 14;

export class Heatmap {
  constructor(canvas) {
    this.canvas = canvas;
    this.spec = null;
    this.plot = null;
  }

  // spec: {title, metric, rows, columns, rowLabels, columnLabels | columnSteps, value(r, c), missing(r, c),
  //        scale: ColorScale, cmap, xAxis, yAxis, and optionally: score(r, c) (how extreme a cell is, for
  //        binning), blank(r, c) (no value to colour yet: drawn BLANK_COLOR), marker (a column to mark),
  //        legend (the colour bar's label), topMargin (room above the plot, for alert markers)}
  draw(spec, cssWidth, cssHeight) {
    const started = performance.now();
    this.spec = spec;
    const canvas = this.canvas;
    const context = prepareCanvas(canvas, cssWidth, cssHeight);

    const rowLabelWidth = Math.max(...spec.rowLabels.map((label) => context.measureText(label).width), 10);
    const left = Math.ceil(rowLabelWidth) + 34;
    const columnLabelWidth = spec.columnLabels
      ? Math.max(...spec.columnLabels.map((label) => context.measureText(label).width), 10)
      : 10;
    const rotate = spec.columnLabels && spec.columns * 14 > 0 && columnLabelWidth + 6 > (cssWidth - left - 90) / spec.columns;
    const bottom = 34 + (rotate ? Math.min(columnLabelWidth, 120) : 14);
    const top = spec.topMargin || 26;
    const right = 126;
    const width = Math.max(40, cssWidth - left - right);
    const height = Math.max(40, cssHeight - top - bottom);
    this.plot = {left, top, width, height};
    // One bin per pixel column when the columns outnumber them (each bin then covers one or more columns).
    const bins = spec.columns > Math.floor(width) ? Math.floor(width) : spec.columns;
    this.bins = bins;
    this.picked = bins < spec.columns ? new Int32Array(spec.rows * bins) : null;
    for (const [key, value] of Object.entries({plotLeft: left, plotTop: top, plotWidth: width, plotHeight: height,
                                                rows: spec.rows, columns: spec.columns, bins, scaleMin: spec.scale.min,
                                                scaleMax: spec.scale.max, scaleLog: spec.scale.log})) {
      canvas.dataset[key] = String(value);
    }

    // The cells: one pixel per cell (per bin), then scaled (nearest neighbour, so every cell keeps its exact
    // colour).
    const image = new ImageData(Math.max(1, bins), Math.max(1, spec.rows));
    const pixels = image.data;
    const table = colorTable(spec.cmap);
    for (let row = 0; row < spec.rows; row++) {
      const line = spec.rows - 1 - row;
      for (let bin = 0; bin < bins; bin++) {
        const offset = 4 * (line * bins + bin);
        let column = bin;
        if (this.picked) {
          const [first, end] = [this.binStart(bin), this.binStart(bin + 1)];
          column = first;
          if (spec.score) {
            let best = spec.score(row, first);
            for (let candidate = first + 1; candidate < end; candidate++) {
              const score = spec.score(row, candidate);
              if (score > best) {
                best = score;
                column = candidate;
              }
            }
          }
          this.picked[row * bins + bin] = column;
        }
        let rgb;
        if (spec.missing(row, column)) {
          rgb = MISSING_COLOR;
        } else if (spec.blank && spec.blank(row, column)) {
          rgb = BLANK_COLOR;
        } else {
          const index = spec.scale.index(spec.value(row, column));
          if (index < 0) {
            rgb = NONFINITE_COLOR;
          } else {
            pixels[offset] = table[3 * index];
            pixels[offset + 1] = table[3 * index + 1];
            pixels[offset + 2] = table[3 * index + 2];
            pixels[offset + 3] = 255;
            continue;
          }
        }
        pixels[offset] = rgb[0];
        pixels[offset + 1] = rgb[1];
        pixels[offset + 2] = rgb[2];
        pixels[offset + 3] = 255;
      }
    }
    const cells = document.createElement("canvas");
    cells.width = image.width;
    cells.height = image.height;
    cells.getContext("2d").putImageData(image, 0, 0);
    context.imageSmoothingEnabled = false;
    if (spec.rows && spec.columns) {
      context.drawImage(cells, left, top, width, height);
    }
    context.strokeStyle = "#666";
    context.lineWidth = 1;
    context.strokeRect(left - 0.5, top - 0.5, width + 1, height + 1);
    if (spec.marker !== undefined && spec.marker !== null && spec.columns) {
      // The slider's sample, over steps: a thin outlined column.
      const x = this.columnCenter(spec.marker);
      context.strokeStyle = "rgba(255, 255, 255, 0.9)";
      context.lineWidth = 3;
      context.beginPath();
      context.moveTo(x, top);
      context.lineTo(x, top + height);
      context.stroke();
      context.strokeStyle = "#000";
      context.lineWidth = 1;
      context.stroke();
    }

    // Axes.
    context.fillStyle = "#333";
    context.textBaseline = "middle";
    context.textAlign = "right";
    const cellHeight = height / Math.max(1, spec.rows);
    const rowStride = Math.max(1, Math.ceil(14 / cellHeight));
    for (let row = 0; row < spec.rows; row += rowStride) {
      context.fillText(spec.rowLabels[row], left - 4, top + height - (row + 0.5) * cellHeight);
    }
    context.save();
    context.translate(12, top + height / 2);
    context.rotate(-Math.PI / 2);
    context.textAlign = "center";
    context.fillText(spec.yAxis, 0, 0);
    context.restore();

    const cellWidth = width / Math.max(1, spec.columns);
    context.textBaseline = "top";
    if (spec.columnLabels) {
      const stride = rotate ? Math.max(1, Math.ceil(14 / cellWidth)) : 1;
      for (let column = 0; column < spec.columns; column += stride) {
        const x = left + (column + 0.5) * cellWidth;
        if (rotate) {
          context.save();
          context.translate(x, top + height + 4);
          context.rotate(-Math.PI / 2);
          context.textAlign = "right";
          context.textBaseline = "middle";
          context.fillText(spec.columnLabels[column].slice(0, 18), 0, 0);
          context.restore();
        } else {
          context.textAlign = "center";
          context.fillText(spec.columnLabels[column], x, top + height + 4);
        }
      }
    } else if (spec.columnSteps && spec.columns) {
      // Ticks at round steps, each at the first sample at or after it.
      const steps = spec.columnSteps;
      context.textAlign = "center";
      let column = 0;
      for (const tick of niceTicks(steps[0], steps[spec.columns - 1], Math.max(2, Math.floor(width / 90)))) {
        while (column < spec.columns - 1 && steps[column] < tick) {
          column++;
        }
        context.fillText(formatStep(tick), left + (column + 0.5) * cellWidth, top + height + 4);
      }
    }
    context.textAlign = "center";
    context.fillText(spec.xAxis, left + width / 2, cssHeight - 16);
    context.textBaseline = "alphabetic";
    context.font = `bold ${FONT}`;
    context.textAlign = "left";
    context.fillText(spec.title, left, 16);
    context.font = FONT;

    this.drawColorBar(context, spec, left + width + 14, top, height);
    this.renderMilliseconds = performance.now() - started;
    canvas.dataset.renderMs = this.renderMilliseconds.toFixed(2);
  }

  drawColorBar(context, spec, x, y, height) {
    const table = colorTable(spec.cmap);
    for (let i = 0; i < height; i++) {
      const index = Math.round(255 * (1 - i / Math.max(1, height - 1)));
      context.fillStyle = `rgb(${table[3 * index]},${table[3 * index + 1]},${table[3 * index + 2]})`;
      context.fillRect(x, y + i, COLOR_BAR_WIDTH, 1);
    }
    context.strokeStyle = "#666";
    context.strokeRect(x - 0.5, y - 0.5, COLOR_BAR_WIDTH + 1, height + 1);
    context.fillStyle = "#333";
    context.textAlign = "left";
    context.textBaseline = "middle";
    for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
      // Ends that clip values beyond them (a percentile range) read <= and >=.
      const bound = fraction === 0 && spec.scale.clippedLow ? "≤ " : fraction === 1 && spec.scale.clippedHigh ? "≥ " : "";
      context.fillText(bound + formatShort(spec.scale.valueAt(fraction)), x + COLOR_BAR_WIDTH + 4, y + height * (1 - fraction));
    }
    context.save();
    context.translate(x + COLOR_BAR_WIDTH + 84, y + height / 2);
    context.rotate(Math.PI / 2);
    context.textAlign = "center";
    context.fillText(spec.legend || spec.metric + (spec.scale.log ? " (log)" : ""), 0, 0);
    context.restore();
  }

  // The first column of a bin (bin = bins gives the end of the last one): column c is in bin
  // floor(c * bins / columns).
  binStart(bin) {
    return Math.floor((bin * this.spec.columns + this.bins - 1) / this.bins);
  }

  // The x (CSS pixels of the canvas) of the middle of the pixel column that draws `column`.
  columnCenter(column) {
    const {left, width} = this.plot;
    const bin = Math.floor((column * this.bins) / this.spec.columns);
    return left + ((bin + 0.5) * width) / this.bins;
  }

  // The cell under a point in CSS pixels of the canvas, or null: {row, column} of the cell drawn there, and
  // when columns are binned, first and last: the columns its bin covers.
  cellAt(x, y) {
    if (!this.plot || !this.spec) {
      return null;
    }
    const {left, top, width, height} = this.plot;
    if (x < left || y < top || x >= left + width || y >= top + height) {
      return null;
    }
    const bin = Math.floor(((x - left) / width) * this.bins);
    const row = this.spec.rows - 1 - Math.floor(((y - top) / height) * this.spec.rows);
    if (row < 0 || bin < 0 || row >= this.spec.rows || bin >= this.bins) {
      return null;
    }
    if (!this.picked) {
      return {row, column: bin};
    }
    return {row, column: this.picked[row * this.bins + bin], first: this.binStart(bin), last: this.binStart(bin + 1) - 1};
  }
}
