"""The scan's plan: what fixes the procedure, written before any data are read.

A plan row (table `runs`, event "plan") is the first row of the hash chain of every scan
and is written again before each resume. It holds

- the procedure: the scan's settings without where the data are, where the results go and
  which executor runs the fits (`config` minus run_dir, data, manifest, executor: AR
  points, seed, policy, gates, toy budgets),
  the SHA-256 of the code that runs it (every module of core/, tools/ and agent/) and of
  the policy's prompts; `plan_sha256` hashes these (RFC 8785 canonical JSON);
- the data: each input file with its SHA-256 and size (URLs as given, the built-in sample
  by its size and seed); `data_sha256` hashes that list without the paths (a copy of the
  files elsewhere is the same data).

So a reviewer can show that the rules were fixed before the data were seen (the plan
row precedes every result in the chain, and editing it breaks `anomscan audit verify`),
and two runs on the same data with different plans are told apart by comparing their
first rows (`anomscan audit plan RUN [OTHER]`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Final

import agent
import core
import tools
from agent.runtime.audit import audit_json
from agent.scan.config import BUILTIN_EVENTS, ScanConfig, resolve_inputs
from core.files import file_sha256

__all__ = ["PLAN_EVENT", "code_sha256", "data_record", "plan_record"]

PLAN_EVENT: Final = "plan"

_NOT_PROCEDURE: Final = ("run_dir", "data", "manifest", "executor")
"""Settings that say where the data are, where results go and which processes run the
fits (every executor gives the same results), not how the data are analysed."""


@functools.cache
def code_sha256() -> str:
    """SHA-256 over the relative paths and bytes of every module of core/, tools/, agent/."""
    digest = hashlib.sha256()
    for package in (core, tools, agent):
        root = Path(str(package.__file__)).parent
        for path in sorted(root.rglob("*.py")):
            name = f"{root.name}/{path.relative_to(root).as_posix()}"
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _sha256(value: Any) -> str:
    return hashlib.sha256(audit_json(value).encode()).hexdigest()


def plan_record(config: ScanConfig, prompts: dict[str, str] | None) -> dict[str, Any]:
    """The procedure of a scan (settings, code and prompt hashes) with its `plan_sha256`.

    The luminosity is the one in effect: given, or read from the data folder's manifest.
    """
    settings = config.model_dump(mode="json")
    inputs = resolve_inputs(config)
    if inputs is not None:
        settings["lumi_pb"] = inputs.lumi_pb
    procedure = {
        "settings": {k: v for k, v in sorted(settings.items()) if k not in _NOT_PROCEDURE},
        "code_sha256": code_sha256(),
        "prompts_sha256": prompts,
    }
    return procedure | {"plan_sha256": _sha256(procedure)}


def data_record(config: ScanConfig) -> dict[str, Any]:
    """The scan's input files (path, SHA-256, bytes) with their `data_sha256`.

    A URL is recorded as given (its bytes are read later, by the event pass); without
    data files the built-in sample is recorded by its size and seed.
    """
    inputs = resolve_inputs(config)
    if inputs is None:
        events = config.events or BUILTIN_EVENTS
        files: list[dict[str, Any]] = [{"builtin_sample": {"events": events, "seed": config.seed}}]
    else:
        files = [
            {"path": name, "sha256": file_sha256(name), "bytes": Path(name).stat().st_size}
            if Path(name).is_file()
            else {"url": name}
            for name in inputs.files
        ]
    # a file is the same data wherever it lies: its path is not hashed
    content = [{k: v for k, v in f.items() if k != "path"} for f in files]
    return {"files": files, "data_sha256": _sha256(content)}
