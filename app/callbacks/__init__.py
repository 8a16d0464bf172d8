"""Lightning callbacks: each observes the training and acts; the math they use lives in `components/`."""
from app.callbacks.balancing import RoutingBiasBalancer
from app.callbacks.checkpointing import ExportCheckpoint, resumable_checkpoint
from app.callbacks.history import RunHistory
from app.callbacks.preemption import PreemptionCheckpoint
from app.callbacks.progress import TokenProgressBar
from app.callbacks.telemetry import MoEThroughputMonitor, OptimizerTelemetry, SVDEntropyMonitor

__all__ = [
    "ExportCheckpoint", "MoEThroughputMonitor", "OptimizerTelemetry", "PreemptionCheckpoint", "RoutingBiasBalancer",
    "RunHistory", "SVDEntropyMonitor", "TokenProgressBar", "resumable_checkpoint",
]
