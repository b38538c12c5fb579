// Colour maps, colour scales and how values are written.

export const MISSING_COLOR = [217, 217, 217];   // grey: no such component, or a frozen one
export const NONFINITE_COLOR = [230, 0, 126];   // magenta: NaN or +/-Inf (as in the PNG images)
export const BLANK_COLOR = [128, 128, 128];     // mid grey: no value to colour yet (a z with no baseline yet)

// Anchor colours, evenly spaced from 0 to 1; 256 colours are interpolated between them.
const ANCHORS = {
  viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#fde725"],
  // Diverging, blue below the midpoint and red above it (ColorBrewer's RdBu, reversed).
  diverging: ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"],
};

export const COLOR_MAPS = Object.keys(ANCHORS);

function hexToRgb(hex) {
  const value = parseInt(hex.slice(1), 16);
  return [(value >> 16) & 255, (value >> 8) & 255, value & 255];
}

const TABLES = {};
for (const [name, anchors] of Object.entries(ANCHORS)) {
  const rgb = anchors.map(hexToRgb);
  const table = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const position = (i / 255) * (rgb.length - 1);
    const left = Math.min(Math.floor(position), rgb.length - 2);
    const fraction = position - left;
    for (let channel = 0; channel < 3; channel++) {
      table[3 * i + channel] = Math.round(rgb[left][channel] * (1 - fraction) + rgb[left + 1][channel] * fraction);
    }
  }
  TABLES[name] = table;
}

export function colorTable(name) {
  return TABLES[name] || TABLES.viridis;
}

// Maps a value to 0..255 (an index into a colour table), or -1 for a value it cannot place (NaN, Inf).
// Values outside [min, max] are clamped; on a log scale, values <= 0 are clamped to the bottom.
export class ColorScale {
  constructor(min, max, log) {
    this.min = min;
    this.max = max;
    this.log = log;
    this.low = log ? Math.log10(min) : min;
    this.high = log ? Math.log10(max) : max;
    this.span = this.high > this.low ? this.high - this.low : 1;
  }

  index(value) {
    if (!Number.isFinite(value)) {
      return -1;
    }
    const position = this.log ? (value > 0 ? Math.log10(value) : -Infinity) : value;
    const fraction = (position - this.low) / this.span;
    return Math.max(0, Math.min(255, Math.round(fraction * 255)));
  }

  // The value at a fraction (0..1) of the colour bar.
  valueAt(fraction) {
    const position = this.low + fraction * this.span;
    return this.log ? Math.pow(10, position) : position;
  }
}

// A value as written in tooltips: the shortest decimal that reads back as the same float32, so the text is
// exactly the number the callback wrote; NaN and infinities by name.
export function formatExact(value) {
  if (Number.isNaN(value)) {
    return "NaN";
  }
  if (value === Infinity) {
    return "+Inf";
  }
  if (value === -Infinity) {
    return "-Inf";
  }
  for (let digits = 1; digits <= 9; digits++) {
    const text = value.toPrecision(digits);
    if (Math.fround(Number(text)) === value) {
      return String(Number(text));
    }
  }
  return String(value);
}

// A short label for axes and colour bars.
export function formatShort(value) {
  if (!Number.isFinite(value)) {
    return formatExact(value);
  }
  if (value === 0) {
    return "0";
  }
  const magnitude = Math.abs(value);
  if (magnitude >= 1e4 || magnitude < 1e-3) {
    return value.toExponential(2);
  }
  return String(Number(value.toPrecision(3)));
}

export function formatStep(step) {
  for (const [factor, suffix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (Math.abs(step) >= factor) {
      return `${Number((step / factor).toPrecision(3))}${suffix}`;
    }
  }
  return String(step);
}

// Round tick values between first and last, about `wanted` of them: 1, 2 or 5 times a power of ten apart.
export function niceTicks(first, last, wanted) {
  if (!(last > first)) {
    return [first];
  }
  const raw = (last - first) / Math.max(1, wanted);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const interval = [1, 2, 5, 10].map((factor) => factor * power).find((value) => value >= raw);
  const start = Math.ceil(first / interval);
  const ticks = [];
  for (let i = 0; i <= wanted + 1; i++) {
    const tick = Number(((start + i) * interval).toPrecision(12));
    if (tick > last) {
      break;
    }
    ticks.push(tick);
  }
  return ticks;
}
