"""The HEATMAPS dashboard: a TensorBoard plugin that reads the matrices the lightning-heatmaps callbacks write.

A package of its own, apart from :mod:`lightning_heatmaps`: TensorBoard imports every plugin entry point
when it starts, so this package imports only ``tensorboard``, ``werkzeug``, ``numpy`` and the standard
library (never torch, lightning or matplotlib), and an environment without a GPU stack still starts
TensorBoard with the dashboard.

- :mod:`~lightning_heatmaps_tensorboard.metadata`: the plugin's name and the JSON content every matrix
  summary carries (shared with the writer in :mod:`lightning_heatmaps.sinks`);
- :mod:`~lightning_heatmaps_tensorboard.plugin`: the WSGI routes (registered under the
  ``tensorboard_plugins`` entry point);
- ``static/``: the dashboard, plain ES modules drawing on a ``<canvas>`` (no build step).
"""

from lightning_heatmaps_tensorboard.metadata import PLUGIN_NAME

__all__ = ["PLUGIN_NAME"]
