// What every chart of the dashboard does to its <canvas> first.

export const FONT = "12px Roboto, sans-serif";

// Sizes `canvas` to cssWidth x cssHeight CSS pixels, backed by device pixels (sharp on high-DPI screens),
// clears it, and returns its 2-D context drawing in CSS pixels with the dashboard's font.
export function prepareCanvas(canvas, cssWidth, cssHeight) {
  const ratio = window.devicePixelRatio || 1;
  canvas.style.width = `${cssWidth}px`;
  canvas.style.height = `${cssHeight}px`;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, cssWidth, cssHeight);
  context.font = FONT;
  return context;
}
