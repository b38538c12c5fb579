"""Lightning callbacks that show, live in TensorBoard, what every layer of a transformer is doing."""

from lightning_heatmaps.activation import ActivationHeatmap
from lightning_heatmaps.attention import attention_statistics
from lightning_heatmaps.attention_heatmap import AttentionHeatmap
from lightning_heatmaps.base import Sample
from lightning_heatmaps.expert import ExpertHeatmap
from lightning_heatmaps.gradient import GradientHeatmap
from lightning_heatmaps.intervention import InterventionHeatmap
from lightning_heatmaps.layers import CANONICAL_COMPONENTS, LayerMap, resolve_layers
from lightning_heatmaps.logit_lens import LogitLensHeatmap
from lightning_heatmaps.probe import ProbeHeatmap
from lightning_heatmaps.reductions import ACTIVATION_METRICS, ATTENTION_METRICS, EXPERT_METRICS, GRADIENT_METRICS
from lightning_heatmaps.render import heatmap_figure
from lightning_heatmaps.spike_alert import SpikeAlert
from lightning_heatmaps.spikes import RobustBaseline, SpikeMonitor
from lightning_heatmaps.ring_buffer import RingBuffer

__all__ = [
    "ACTIVATION_METRICS",
    "ATTENTION_METRICS",
    "ActivationHeatmap",
    "AttentionHeatmap",
    "CANONICAL_COMPONENTS",
    "EXPERT_METRICS",
    "ExpertHeatmap",
    "GRADIENT_METRICS",
    "GradientHeatmap",
    "InterventionHeatmap",
    "LayerMap",
    "LogitLensHeatmap",
    "ProbeHeatmap",
    "RingBuffer",
    "RobustBaseline",
    "Sample",
    "SpikeAlert",
    "SpikeMonitor",
    "attention_statistics",
    "heatmap_figure",
    "resolve_layers",
]
__version__ = "0.1.0"
