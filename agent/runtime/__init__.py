"""What every run stands on: the audit log, executor, event pass, run lock and path safety."""

from agent.runtime.audit import (
    AUDIT_FILE,
    AuditError,
    AuditLog,
    VerifyReport,
    open_readonly,
    verify,
)
from agent.runtime.eventpass import EventPassError, PassSpec, event_pass
from agent.runtime.executor import Executor, FanOut, map_batched, ray_session
from agent.runtime.runlock import run_folder_lock
from agent.runtime.safety import PathConfinementError, confine_paths, redact, redact_data

__all__ = [
    "AUDIT_FILE",
    "AuditError",
    "AuditLog",
    "EventPassError",
    "Executor",
    "FanOut",
    "PassSpec",
    "PathConfinementError",
    "VerifyReport",
    "confine_paths",
    "event_pass",
    "map_batched",
    "open_readonly",
    "ray_session",
    "redact",
    "redact_data",
    "run_folder_lock",
    "verify",
]
