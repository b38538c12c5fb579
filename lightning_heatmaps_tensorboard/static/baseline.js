// The robust z of every value of a series against that series' own previous values: exactly the rule SpikeAlert
// applies (lightning_heatmaps/spikes.py), for the "z against its own baseline" colouring. Pure maths, no DOM.
//
// For each value v, in step order:
//   x = ln(max(|v|, logFloor))                         (a log scale: a jump is relative, whatever the scale)
//   baseline = the previous `window` values x that were accepted
//   z = (x - median(baseline)) / (madScale * max(MAD(baseline), madFloor))
// where MAD = median(|baseline - median(baseline)|) and madScale = 1.4826 makes it a standard deviation for
// normal noise; the MAD floor keeps a constant series from giving infinite z. Until the baseline holds `warmup`
// values there is no z ("no baseline yet") and every finite value is accepted; afterwards a value is accepted
// unless it is a spike, z > threshold (upward only, as in spikes.py: a value below its baseline is accepted).
// NaN and +/-Inf have no z and are never accepted.

// The rule's constants: spikes.py's LOG_FLOOR, MAD_FLOOR, MAD_SCALE and SpikeAlert's defaults (a test asserts that
// they are equal, tests/test_dashboard.py::test_dashboard_rule_constants_equal_the_python_rule).
export const ROBUST_Z = Object.freeze({
  window: 128,       // baseline: the previous 128 accepted values
  warmup: 64,        // values in the baseline before a z is given
  threshold: 6,      // z above this is a spike (kept out of the baseline)
  logFloor: 1e-12,   // |v| below this counts as this (the log of 0 is -Inf)
  madFloor: 0.02,    // floor of the MAD, in natural-log units (a 2% spread)
  madScale: 1.4826,  // MAD times this estimates a standard deviation
});

export const Z_VALUE = 0;       // z holds the value's robust z
export const Z_WARMUP = 1;      // no baseline yet
export const Z_NONFINITE = 2;   // the value is NaN or +/-Inf: no z

// The robust z of `count` values read by `read(i)` (i = 0 .. count-1, in step order).
// Returns {z: Float32Array (NaN where there is none), kind: Uint8Array of Z_VALUE / Z_WARMUP / Z_NONFINITE}.
export function robustZ(read, count, rule = ROBUST_Z) {
  const z = new Float32Array(count).fill(NaN);
  const kind = new Uint8Array(count);
  const window = rule.window;
  const ring = new Float64Array(window);   // the baseline in arrival order; when full, ring[head] is the oldest
  const sorted = new Float64Array(window); // the same values, sorted
  let head = 0;
  let size = 0;
  for (let i = 0; i < count; i++) {
    const value = read(i);
    if (!Number.isFinite(value)) {
      kind[i] = Z_NONFINITE;
      continue;
    }
    const x = Math.log(Math.max(Math.abs(value), rule.logFloor));
    let spike = false;
    if (size >= rule.warmup) {
      const median = medianOfSorted(sorted, size);
      const mad = Math.max(madOfSorted(sorted, size, median), rule.madFloor);
      const score = (x - median) / (rule.madScale * mad);
      z[i] = score;
      kind[i] = Z_VALUE;
      spike = score > rule.threshold;  // upward only: a fall is accepted
    } else {
      kind[i] = Z_WARMUP;
    }
    if (spike) {
      continue;
    }
    if (size === window) {
      removeSorted(sorted, size, ring[head]);
      size--;
    }
    ring[head] = x;
    head = (head + 1) % window;
    insertSorted(sorted, size, x);
    size++;
  }
  return {z, kind};
}

function medianOfSorted(sorted, size) {
  const half = size >> 1;
  return size % 2 ? sorted[half] : (sorted[half - 1] + sorted[half]) / 2;
}

// The median of |sorted - median| in O(size): the deviations below the median grow leftwards from the lower
// middle, those above grow rightwards from the upper middle, so the two runs merge like sorted lists.
function madOfSorted(sorted, size, median) {
  let left = (size - 1) >> 1;
  let right = left + 1;
  const wanted = size >> 1;  // index of the upper middle deviation; the lower one is wanted - 1 when even
  let previous = 0;
  let current = 0;
  for (let taken = 0; taken <= wanted; taken++) {
    const below = left >= 0 ? median - sorted[left] : Infinity;
    const above = right < size ? sorted[right] - median : Infinity;
    previous = current;
    if (below <= above) {
      current = below;
      left--;
    } else {
      current = above;
      right++;
    }
  }
  return size % 2 ? current : (previous + current) / 2;
}

function lowerBound(sorted, size, x) {
  let low = 0;
  let high = size;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (sorted[middle] < x) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low;
}

function insertSorted(sorted, size, x) {
  const at = lowerBound(sorted, size, x);
  sorted.copyWithin(at + 1, at, size);
  sorted[at] = x;
}

function removeSorted(sorted, size, x) {
  const at = lowerBound(sorted, size, x);
  sorted.copyWithin(at, at + 1, size);
}
