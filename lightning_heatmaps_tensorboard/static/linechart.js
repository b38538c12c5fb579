// A line chart of one cell over steps (one line per run), on a <canvas>. Non-finite values break the line
// and are marked with a magenta tick at the bottom. Returns `nearest(offsetX)`: the first line's sample
// closest to a pointer's x (its index), or -1, for the dashboard's hover.

import {FONT, prepareCanvas} from "./canvas.js";
import {formatShort, formatStep, niceTicks} from "./colors.js";

export function drawLineChart(canvas, {title, lines, log, currentStep}, cssWidth, cssHeight) {
  const context = prepareCanvas(canvas, cssWidth, cssHeight);

  const transform = (value) => (log ? (value > 0 ? Math.log10(value) : NaN) : value);
  let low = Infinity;
  let high = -Infinity;
  let first = Infinity;
  let last = -Infinity;
  for (const line of lines) {
    for (let i = 0; i < line.steps.length; i++) {
      first = Math.min(first, line.steps[i]);
      last = Math.max(last, line.steps[i]);
      const value = transform(line.values[i]);
      if (Number.isFinite(value)) {
        low = Math.min(low, value);
        high = Math.max(high, value);
      }
    }
  }
  const left = 64;
  const right = 16;
  const top = 24;
  const bottom = 36;
  const width = cssWidth - left - right;
  const height = cssHeight - top - bottom;
  context.fillStyle = "#333";
  context.font = `bold ${FONT}`;
  context.fillText(title, left, 16);
  context.font = FONT;
  if (!Number.isFinite(first)) {
    context.fillText("no samples", left, top + 20);
    return () => -1;
  }
  if (!(high > low)) {
    const middle = Number.isFinite(low) ? low : 0;
    low = middle - 1;
    high = middle + 1;
  }
  const span = last > first ? last - first : 1;
  const x = (step) => left + ((step - first) / span) * width;
  const y = (value) => top + height - ((value - low) / (high - low)) * height;
  // The axes, as the heatmap canvas gives its own: a reader (or a test) maps a step and value to a pixel.
  for (const [key, value] of Object.entries({plotLeft: left, plotTop: top, plotWidth: width, plotHeight: height,
                                              firstStep: first, lastStep: last, low, high, log: Boolean(log)})) {
    canvas.dataset[key] = String(value);
  }

  context.strokeStyle = "#999";
  context.strokeRect(left - 0.5, top - 0.5, width + 1, height + 1);
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (const fraction of [0, 0.5, 1]) {
    const value = low + fraction * (high - low);
    context.fillText(formatShort(log ? Math.pow(10, value) : value), left - 4, y(value));
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  for (const tick of niceTicks(first, last, Math.max(2, Math.floor(width / 100)))) {
    context.fillText(formatStep(tick), x(tick), top + height + 4);
  }
  context.fillText("step", left + width / 2, top + height + 18);

  if (currentStep !== null && currentStep !== undefined) {
    context.strokeStyle = "#bbb";
    context.beginPath();
    context.moveTo(x(currentStep), top);
    context.lineTo(x(currentStep), top + height);
    context.stroke();
  }
  for (const line of lines) {
    context.strokeStyle = line.color;
    context.lineWidth = 1.5;
    context.beginPath();
    let drawing = false;
    for (let i = 0; i < line.steps.length; i++) {
      const value = transform(line.values[i]);
      if (!Number.isFinite(value)) {
        drawing = false;
        if (!Number.isFinite(line.values[i])) {
          context.save();
          context.fillStyle = "#e6007e";
          context.fillRect(x(line.steps[i]) - 1, top + height - 6, 2, 6);
          context.restore();
        }
        continue;
      }
      if (drawing) {
        context.lineTo(x(line.steps[i]), y(value));
      } else {
        context.moveTo(x(line.steps[i]), y(value));
        drawing = true;
      }
    }
    context.stroke();
  }
  context.textAlign = "right";
  context.textBaseline = "top";
  lines.forEach((line, index) => {
    context.fillStyle = line.color;
    context.fillText(line.label, left + width - 4, top + 4 + 14 * index);
  });
  const steps = lines.length ? lines[0].steps : [];
  return (offsetX) => {
    let best = -1;
    for (let i = 0; i < steps.length; i++) {
      if (best < 0 || Math.abs(x(steps[i]) - offsetX) < Math.abs(x(steps[best]) - offsetX)) {
        best = i;
      }
    }
    return best;
  };
}
