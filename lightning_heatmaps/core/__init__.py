"""The core: measurement, schedule, history and outputs, with no trainer (imports neither Lightning nor transformers).

Adapters translate a trainer's hooks into a monitor's events: :mod:`lightning_heatmaps` (Lightning callbacks),
:mod:`lightning_heatmaps.hf` (Hugging Face ``Trainer``), :mod:`lightning_heatmaps.fabric` (Lightning Fabric) and
:mod:`lightning_heatmaps.loop` (a plain PyTorch loop).
"""

from lightning_heatmaps.core.activation import ActivationMonitor
from lightning_heatmaps.core.attention import AttentionMonitor
from lightning_heatmaps.core.context import RunContext
from lightning_heatmaps.core.expert import ExpertMonitor, resolve_experts
from lightning_heatmaps.core.gradient import GradientMonitor
from lightning_heatmaps.core.intervention import InterventionMonitor
from lightning_heatmaps.core.lens import LensImage, LensMonitor, LensResult
from lightning_heatmaps.core.logit_lens import LogitLensMonitor
from lightning_heatmaps.core.monitor import CollectiveContributor, HeatmapMonitor, Sample, SampleListener
from lightning_heatmaps.core.probe import ProbeMonitor

__all__ = [
    "ActivationMonitor",
    "AttentionMonitor",
    "CollectiveContributor",
    "ExpertMonitor",
    "GradientMonitor",
    "HeatmapMonitor",
    "InterventionMonitor",
    "LensImage",
    "LensMonitor",
    "LensResult",
    "LogitLensMonitor",
    "ProbeMonitor",
    "RunContext",
    "Sample",
    "SampleListener",
    "resolve_experts",
]
