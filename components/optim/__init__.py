"""Muon (Moonlight, arXiv 2502.16982) for Crescent: Newton–Schulz, the single-device optimizer with AdamW groups,
parameter routing, ZeRO-1 Distributed Muon (Algorithm 1) and the FSDP2/DTensor path, all through one matrix step."""
from components.optim.dtensor import DTensorMuon
from components.optim.muon import Muon, muon_matrix_step
from components.optim.newton_schulz import POLAR_EXPRESS, QUINTIC, CoefficientSchedule, newton_schulz
from components.optim.routing import build_muon, build_param_groups, format_routing_table, route_parameters
from components.optim.zero1 import ZeroOneMuon

__all__ = [
    "POLAR_EXPRESS", "QUINTIC", "CoefficientSchedule", "DTensorMuon", "Muon", "ZeroOneMuon", "build_muon",
    "build_param_groups", "format_routing_table", "muon_matrix_step", "newton_schulz", "route_parameters",
]
