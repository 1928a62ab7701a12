"""Reinterpretation: signal acceptance, injection-recovery and sensitivity on a finished run."""

from agent.reinterp.acceptance import run_acceptance
from agent.reinterp.injection import run_injection
from agent.reinterp.pool import SignalPool, reached_streams
from agent.reinterp.recovery import InjectedSpectrumJob, analyse_injected
from agent.reinterp.request import BackgroundToys, InjectionRequest, check_request
from agent.reinterp.rule import ScanRule, scan_rule
from agent.reinterp.sensitivity import dz_note, sensitivity_rows, write_sensitivity

__all__ = [
    "BackgroundToys",
    "InjectedSpectrumJob",
    "InjectionRequest",
    "ScanRule",
    "SignalPool",
    "analyse_injected",
    "check_request",
    "dz_note",
    "reached_streams",
    "run_acceptance",
    "run_injection",
    "scan_rule",
    "sensitivity_rows",
    "write_sensitivity",
]
