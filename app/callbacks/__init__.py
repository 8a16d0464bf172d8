"""Lightning callbacks: each observes the step report (app/step.py) and acts; the math lives in `components/`."""
from app.callbacks.checkpointing import ExportCheckpoint, resumable_checkpoint
from app.callbacks.expert_load import ExpertLoadMonitor
from app.callbacks.plots import TrainingPlots
from app.callbacks.preemption import PreemptionCheckpoint
from app.callbacks.progress import TokenProgressBar
from app.callbacks.telemetry import MoEThroughputMonitor, OptimizerTelemetry, SVDEntropyMonitor

__all__ = [
    "ExpertLoadMonitor", "ExportCheckpoint", "MoEThroughputMonitor", "OptimizerTelemetry", "PreemptionCheckpoint",
    "SVDEntropyMonitor", "TokenProgressBar", "TrainingPlots", "resumable_checkpoint",
]
