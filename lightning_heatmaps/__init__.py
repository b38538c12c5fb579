"""Lightning callbacks that show, live in TensorBoard, what every layer of a transformer is doing.

The public names are imported on first use, so ``lightning_heatmaps.core``, ``lightning_heatmaps.loop`` and
``lightning_heatmaps.hf`` work without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ACTIVATION_METRICS": "lightning_heatmaps.reductions",
    "ATTENTION_METRICS": "lightning_heatmaps.reductions",
    "ActivationHeatmap": "lightning_heatmaps.activation",
    "AttentionHeatmap": "lightning_heatmaps.attention_heatmap",
    "CANONICAL_COMPONENTS": "lightning_heatmaps.layers",
    "EXPERT_METRICS": "lightning_heatmaps.reductions",
    "ExpertHeatmap": "lightning_heatmaps.expert",
    "GRADIENT_METRICS": "lightning_heatmaps.reductions",
    "GradientHeatmap": "lightning_heatmaps.gradient",
    "InterventionHeatmap": "lightning_heatmaps.intervention",
    "LayerMap": "lightning_heatmaps.layers",
    "LogitLensHeatmap": "lightning_heatmaps.logit_lens",
    "ProbeHeatmap": "lightning_heatmaps.probe",
    "RingBuffer": "lightning_heatmaps.ring_buffer",
    "RobustBaseline": "lightning_heatmaps.spikes",
    "Sample": "lightning_heatmaps.core.monitor",
    "SpikeAlert": "lightning_heatmaps.spike_alert",
    "SpikeMonitor": "lightning_heatmaps.spikes",
    "attention_statistics": "lightning_heatmaps.attention",
    "heatmap_figure": "lightning_heatmaps.render",
    "resolve_layers": "lightning_heatmaps.layers",
}

__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_heatmaps' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
