"""The scan's graph nodes, one module each: (context, state, step id) -> state update."""

from agent.scan.nodes.assess import assess_node
from agent.scan.nodes.backgrounds import choose_backgrounds_node
from agent.scan.nodes.bumps import hunt_bumps_node
from agent.scan.nodes.common import (
    NodeBody,
    record_decision,
    scan_checks,
    scan_fallback_settings,
    spectrum_seed,
)
from agent.scan.nodes.limits import limits_node
from agent.scan.nodes.look_elsewhere import look_elsewhere_node
from agent.scan.nodes.plan import plan_node
from agent.scan.nodes.prepare import prepare_node
from agent.scan.nodes.spectra import build_spectra_node
from agent.scan.nodes.summarise import summarise_node

__all__ = [
    "NodeBody",
    "assess_node",
    "build_spectra_node",
    "choose_backgrounds_node",
    "hunt_bumps_node",
    "limits_node",
    "look_elsewhere_node",
    "plan_node",
    "prepare_node",
    "record_decision",
    "scan_checks",
    "scan_fallback_settings",
    "spectrum_seed",
    "summarise_node",
]
