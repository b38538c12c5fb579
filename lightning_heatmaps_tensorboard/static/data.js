// Reading the plugin's routes: the run/tag listing (JSON), a time series of matrices (binary), a run's alerts (JSON).

const HEADER_BYTES = 20;  // "LHMV", version, samples, rows, columns (uint32, little-endian)

export async function fetchRuns() {
  const response = await fetch("runs");
  if (!response.ok) {
    throw new Error(`runs: ${response.status} ${await response.text()}`);
  }
  return response.json();
}

// A run's spike alerts: {alerts: [record, ...] in step order, kept, written} (see plugin.py's /alerts).
export async function fetchAlerts(run) {
  const response = await fetch(`alerts?${new URLSearchParams({run})}`);
  if (!response.ok) {
    throw new Error(`alerts: ${response.status} ${await response.text()}`);
  }
  return response.json();
}

// Decodes a /values body: {steps: Float64Array, values: Float32Array, samples, rows, columns}.
export function decodeValues(buffer) {
  const view = new DataView(buffer);
  const magic = String.fromCharCode(view.getUint8(0), view.getUint8(1), view.getUint8(2), view.getUint8(3));
  if (magic !== "LHMV" || view.getUint32(4, true) !== 1) {
    throw new Error("not a lightning-heatmaps values body");
  }
  const samples = view.getUint32(8, true);
  const rows = view.getUint32(12, true);
  const columns = view.getUint32(16, true);
  // Copies: the step block starts at byte 20, which Float64Array cannot view in place.
  const steps = new Float64Array(buffer.slice(HEADER_BYTES, HEADER_BYTES + 8 * samples));
  const start = HEADER_BYTES + 8 * samples;
  const values = new Float32Array(buffer.slice(start, start + 4 * samples * rows * columns));
  return {steps, values, samples, rows, columns, bytes: buffer.byteLength};
}

export async function fetchValues(run, tag, after) {
  const query = new URLSearchParams({run, tag});
  if (after !== null && after !== undefined) {
    query.set("after", String(after));
  }
  const response = await fetch(`values?${query}`);
  if (!response.ok) {
    throw new Error(`values: ${response.status} ${await response.text()}`);
  }
  return decodeValues(await response.arrayBuffer());
}

// One run/tag time series in memory, grown in place as a live run writes more samples.
export class Series {
  constructor(run, tag) {
    this.run = run;
    this.tag = tag;
    this.samples = 0;
    this.rows = 0;
    this.columns = 0;
    this.steps = new Float64Array(0);
    this.values = new Float32Array(0);
    this.bytesReceived = 0;
  }

  get lastStep() {
    return this.samples ? this.steps[this.samples - 1] : null;
  }

  // Fetches what is new since the last sample (everything the first time); returns the number of new samples.
  async update() {
    const chunk = await fetchValues(this.run, this.tag, this.lastStep);
    this.bytesReceived += chunk.bytes;
    if (!chunk.samples) {
      return 0;
    }
    if (this.samples && (chunk.rows !== this.rows || chunk.columns !== this.columns)) {
      this.samples = 0;  // the matrix changed shape (a restarted run): start over with the new shape
    }
    this.rows = chunk.rows;
    this.columns = chunk.columns;
    const cell = this.rows * this.columns;
    const needed = this.samples + chunk.samples;
    if (needed > this.steps.length) {
      const capacity = Math.max(needed, 2 * this.steps.length);
      const steps = new Float64Array(capacity);
      steps.set(this.steps.subarray(0, this.samples));
      const values = new Float32Array(capacity * cell);
      values.set(this.values.subarray(0, this.samples * cell));
      this.steps = steps;
      this.values = values;
    }
    this.steps.set(chunk.steps, this.samples);
    this.values.set(chunk.values, this.samples * cell);
    this.samples = needed;
    return chunk.samples;
  }

  value(sample, row, column) {
    return this.values[(sample * this.rows + row) * this.columns + column];
  }

  // The index of the last sample at or before `step` (0 when every sample is later).
  sampleAtStep(step) {
    let low = 0;
    let high = this.samples - 1;
    while (low < high) {
      const middle = (low + high + 1) >> 1;
      if (this.steps[middle] <= step) {
        low = middle;
      } else {
        high = middle - 1;
      }
    }
    return low;
  }
}
