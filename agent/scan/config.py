"""What a scan is asked to do: its configuration, its input files and the run folder's names.

The configuration is validated once (pydantic, unknown keys refused) and written to
RUN/config.json before anything else, so a run folder always says how it was made; it is
read back with `run_dir` set to where the folder is now, so a copied or moved run resumes
in place. Input files are resolved to absolute, readable regular files before the scan
starts: a bad path fails in one line, not half-way through the event pass.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.runtime.executor import Executor
from core.anomaly import log_uniform_xsec_grid
from core.background import CheckOptions
from core.datasets import load_manifest
from core.errors import InvalidInputError, OutputError
from core.files import MANIFEST_NAME, check_regular_file, read_manifest, write_text
from core.spectrum import MIN_EVENTS_IN_FIT_RANGE

__all__ = [
    "BUILTIN_EVENTS",
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "Inputs",
    "ScanConfig",
    "package_versions",
    "read_config",
    "resolve_inputs",
    "write_config",
]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoints.sqlite"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"

BUILTIN_EVENTS = 100_000
"""Background events of the built-in synthetic sample (a scan without DATA)."""


class ScanConfig(BaseModel):
    """What a scan was asked to do; written to RUN/config.json and the `runs` table."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: list[str] = Field(default_factory=list, description="ROOT files or globs")
    manifest: str | None = None
    lumi_pb: float | None = Field(None, gt=0)
    run_dir: str
    points_per_decade: int = Field(4, ge=1, le=50)
    xsec_range: tuple[float, float] = (0.001, 100.0)
    budget_minutes: float | None = Field(None, gt=0)
    max_points: int | None = Field(
        None, ge=1, description="AR point budget, refinements included; null = grid + 6"
    )
    executor: Executor = "auto"
    seed: int = Field(0, ge=0)
    model: str | None = None
    policy: Literal["rules", "llm"] = "rules"
    llm_base_url: str | None = Field(None, description="OpenAI-compatible endpoint (llm policy)")
    llm_model: str | None = Field(None, description="chat model name (llm policy)")
    llm_timeout_s: float = Field(60.0, gt=0, description="per LLM request")
    llm_max_rejections: int = Field(3, ge=0, description="refused proposals sent back per decision")
    llm_max_calls: int = Field(2000, ge=0, description="LLM requests per scan")
    llm_max_tokens: int = Field(3_000_000, ge=0, description="LLM tokens per scan")
    events: int | None = Field(
        None, ge=1000, description="size of the built-in sample (null: 100 000; or data given)"
    )
    epochs: int = Field(30, ge=1, description="autoencoder training epochs (when trained)")
    fallback_budget: int = Field(4, ge=0, description="symbolic-fallback searches per scan")
    fallback_time_s: float = Field(60.0, gt=0)
    min_events: int = Field(
        MIN_EVENTS_IN_FIT_RANGE, ge=1, description="events above the fit start to fit"
    )
    gof_toys: int = Field(
        CheckOptions().n_linear_toys,
        ge=10,
        description="toys of the goodness of fit where bins are sparse",
    )
    n_pseudo_scans: int = Field(1000, ge=1)
    max_pseudo_scans: int = Field(20_000, ge=1)
    limits: bool = Field(False, description="set 95 % CL limits as the last node")
    blind: bool = Field(
        False,
        description="withhold what reveals the data in the search windows until "
        "`anomscan unblind` (agent.scan.blinding)",
    )

    @field_validator("xsec_range")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low < high:
            raise ValueError(f"expected 0 < LO < HI pb, found {low:g} {high:g}")
        return value

    def grid_size(self) -> int:
        """Points of the initial log-uniform grid."""
        low, high = self.xsec_range
        return len(log_uniform_xsec_grid(self.points_per_decade, low, high))

    def point_budget(self) -> int:
        """The most AR points the scan may scan."""
        return self.max_points if self.max_points is not None else self.grid_size() + 6


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    names = (
        "anomscan",
        "numpy",
        "scipy",
        "iminuit",
        "onnxruntime",
        "uproot",
        "awkward",
        "pydantic",
        "langgraph",
        "ray",
    )
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class Inputs:
    """The data files of a scan and its luminosity (pb^-1)."""

    files: tuple[str, ...]
    lumi_pb: float
    schema: str = "auto"
    source: str = ""


def resolve_inputs(config: ScanConfig) -> Inputs | None:
    """Files and luminosity of a scan on given data (None: the built-in sample is generated).

    DATA may be ROOT files, globs, URLs or folders: a folder stands for its *.root files,
    and a folder written by `anomscan generate` also gives its luminosity (its manifest.json)
    when none is given. `manifest` is a dataset manifest (TOML), or the manifest.json of a
    generated sample. Raises InvalidInputError for a missing or unreadable file, an empty
    glob or folder, or no luminosity from the manifest, the sample or `lumi_pb`.
    """
    files: list[str] = []
    lumi = config.lumi_pb
    schema = "auto"
    source = "files"
    patterns = list(config.data)
    if config.manifest is not None and Path(config.manifest).name == MANIFEST_NAME:
        patterns.append(str(Path(config.manifest).parent))
    elif config.manifest is not None:
        datasets = load_manifest(config.manifest)
        for dataset in datasets.values():
            files.extend(dataset.files)
            schema = dataset.schema
        if lumi is None:
            lumi = sum(d.lumi_pb for d in datasets.values() if d.kind == "data") or None
        source = f"manifest {config.manifest}"
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        if Path(pattern).is_dir():
            folder_files, folder_lumi = _sample_folder(Path(pattern))
            files.extend(folder_files)
            lumi = lumi if lumi is not None else folder_lumi
            continue
        files.extend(_matching_files(pattern))
    if not files:
        if config.manifest is not None:
            raise InvalidInputError(f"manifest {config.manifest} lists no files")
        return None
    if lumi is None:
        raise InvalidInputError(
            "no luminosity: give --lumi-pb L (pb^-1) or a --manifest with lumi_pb; the anomaly "
            "regions (N = sigma x L events) need it"
        )
    return Inputs(tuple(files), float(lumi), schema, source)


def _matching_files(pattern: str) -> list[str]:
    """The readable files a path or glob names (absolute)."""
    matches = (
        sorted(glob.glob(pattern))  # noqa: PTH207 (absolute patterns too)
        if glob.has_magic(pattern)
        else [pattern]
    )
    if not matches:
        raise InvalidInputError(
            f"no file matches {pattern!r}; give ROOT files, globs or --manifest"
        )
    files = []
    for match in matches:
        path = check_regular_file(match, "data file")
        if not os.access(path, os.R_OK):
            raise InvalidInputError(f"data file {path} is not readable; fix its permissions")
        files.append(str(path.resolve()))
    return files


def _sample_folder(folder: Path) -> tuple[list[str], float | None]:
    """A folder's *.root files, and the luminosity its `anomscan generate` manifest records."""
    files = [file for path in sorted(folder.glob("*.root")) for file in _matching_files(str(path))]
    if not files:
        raise InvalidInputError(
            f"folder {folder} holds no .root file; give ROOT files, a folder of them or --manifest"
        )
    manifest = read_manifest(folder)
    lumi = None if manifest is None else manifest.get("lumi_pb")
    if isinstance(lumi, int | float) and math.isfinite(lumi) and lumi > 0:
        return files, float(lumi)
    return files, None


def write_config(config: ScanConfig) -> Path:
    """Create the run folder and write its config.json (refused if a scan is there already)."""
    folder = Path(config.run_dir)
    if (folder / CONFIG_FILE).exists():
        raise InvalidInputError(
            f"{folder} already holds a scan; continue it with `anomscan scan --resume "
            f"{folder}` or choose another --out"
        )
    text = json.dumps(config.model_dump(mode="json"), indent=1)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / CONFIG_FILE, text, what="scan config")
    except (OSError, OutputError) as error:
        cause = error if isinstance(error, OSError) else error.__cause__
        reason = cause.strerror if isinstance(cause, OSError) else str(error)
        raise InvalidInputError(
            f"cannot write the run folder {folder}: {reason}; choose a writable --out"
        ) from error
    return folder


def read_config(run_dir: Path) -> ScanConfig:
    """The config of the scan in `run_dir`, acting on `run_dir` as it is now.

    A run folder is self-contained: the `run_dir` recorded when it was made is replaced by
    the folder given, so a copied run resumes (or is reported, limited, injected) in the
    copy, and a moved one where it is now.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise InvalidInputError(
            f"{run_dir} is not a scan's run folder (no {CONFIG_FILE}); give the --out of a scan"
        )
    try:
        config = ScanConfig.model_validate_json(path.read_text())
    except ValidationError as error:
        raise InvalidInputError(f"{path} is not a valid scan config: {error}") from error
    return config.model_copy(update={"run_dir": str(run_dir.resolve())})
