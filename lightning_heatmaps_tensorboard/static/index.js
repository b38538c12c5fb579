// Entry point of the HEATMAPS tab. TensorBoard loads this module in the plugin's iframe and calls render();
// relative URLs resolve under /data/plugin/lightning_heatmaps/ (the frame's <base>).

import {Dashboard} from "./dashboard.js";

export async function render() {
  const style = document.createElement("link");
  style.rel = "stylesheet";
  style.href = new URL("./style.css", import.meta.url).href;
  document.head.appendChild(style);
  const root = document.createElement("div");
  root.id = "lh-root";
  root.className = "lh-root";
  document.body.appendChild(root);
  const dashboard = new Dashboard(root);
  await dashboard.start();
  root.dataset.ready = "true";
}
