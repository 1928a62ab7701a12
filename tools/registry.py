"""The tool registry: every tool is a pydantic input model, an output model and a function.

Tool modules register themselves with `@register(...)`; `all_tools()` imports every module
listed in `TOOL_MODULES` so that the CLI and the agent see the same set.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from core.errors import ToolError

__all__ = [
    "MAX_EVENTS",
    "AbsEta",
    "ChunkSize",
    "CrossSectionPb",
    "DeltaR",
    "EnergyGeV",
    "EventCount",
    "FilePath",
    "Fraction",
    "LumiPb",
    "MassGeV",
    "PathText",
    "PositiveEventCount",
    "Seed",
    "SqrtSGeV",
    "Threads",
    "Tool",
    "ToolOutputError",
    "WidthGeV",
    "all_tools",
    "get_tool",
    "register",
]

MAX_EVENTS: Final = 1_000_000_000
"""Largest event count any tool accepts (10^9: beyond one machine's reach anyway)."""


def _check_path_text(value: str) -> str:
    if not value:
        raise ValueError("the path is empty")
    if "\x00" in value:
        raise ValueError("the path holds a NUL character")
    if len(value) > 4096 or any(len(part) > 255 for part in value.split("/")):
        raise ValueError("the path is longer than the file system allows")
    return value


def _check_path(value: Path) -> Path:
    _check_path_text(str(value))
    return value


# Every number a user gives enters through one of these types: finite (the models forbid NaN
# and infinity), a number and not a boolean (tools.common.StrictModel), and inside a range
# that physics and one machine allow. A tool input field that is a number uses one of them.
LumiPb = Annotated[float, Field(gt=0, le=1e9, description="integrated luminosity (pb^-1)")]
SqrtSGeV = Annotated[float, Field(gt=0, le=1e6, description="collision energy (GeV)")]
MassGeV = Annotated[float, Field(gt=0, le=1e6, description="mass (GeV)")]
WidthGeV = Annotated[float, Field(ge=0, le=1e6, description="width (GeV)")]
EnergyGeV = Annotated[float, Field(ge=0, le=1e6, description="energy or momentum cut (GeV)")]
AbsEta = Annotated[float, Field(ge=0, le=10, description="|pseudorapidity| limit")]
DeltaR = Annotated[float, Field(ge=0, le=10, description="angular distance")]
CrossSectionPb = Annotated[float, Field(ge=0, le=1e12, description="cross section (pb)")]
Fraction = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, description="random seed (non-negative)")]
EventCount = Annotated[int, Field(ge=0, le=MAX_EVENTS)]
PositiveEventCount = Annotated[int, Field(gt=0, le=MAX_EVENTS)]
ChunkSize = Annotated[int, Field(gt=0, le=10_000_000, description="events per chunk")]
Threads = Annotated[int, Field(ge=1, le=256)]
FilePath = Annotated[Path, AfterValidator(_check_path)]
PathText = Annotated[str, AfterValidator(_check_path_text)]

TOOL_MODULES = (
    "tools.events",
    "tools.rmm",
    "tools.fits",
    "tools.symbolic",
    "tools.bumps",
    "tools.spectrum",
    "tools.autoencoder",
    "tools.reinterp",
    "tools.limits",
)
"""Modules that define tools; a module that does not exist yet is skipped."""

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)


class ToolOutputError(Exception):
    """A tool built an output its own model refuses: a bug, not a fault of the input."""


@dataclass(frozen=True)
class Tool:
    """One registered tool: validated JSON in, validated JSON out."""

    name: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    run: Callable[[Any], BaseModel]

    def call(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Validate `payload`, run the tool and return its output as JSON-ready data."""
        arguments = self.input_model.model_validate(payload)
        try:
            result = self.run(arguments)
        except ValidationError as error:
            # The input was valid: an output that is not is the tool's fault, never the user's.
            raise ToolOutputError(
                f"tool {self.name!r} built an output its model refuses: {error}"
            ) from error
        if not isinstance(result, self.output_model):
            raise ToolError(
                f"tool {self.name!r} returned {type(result).__name__}, "
                f"expected {self.output_model.__name__}"
            )
        return result.model_dump(mode="json", by_alias=True)


_REGISTRY: dict[str, Tool] = {}


def register(
    name: str, description: str, input_model: type[InT], output_model: type[OutT]
) -> Callable[[Callable[[InT], OutT]], Callable[[InT], OutT]]:
    """Register the decorated function as tool `name` (a one-line `description`)."""

    def decorate(function: Callable[[InT], OutT]) -> Callable[[InT], OutT]:
        if name in _REGISTRY and _REGISTRY[name].run is not function:
            raise ToolError(f"tool {name!r} is registered twice")
        _REGISTRY[name] = Tool(name, description, input_model, output_model, function)
        return function

    return decorate


def _load_tool_modules() -> None:
    for module in TOOL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def all_tools() -> list[Tool]:
    """Return every registered tool, sorted by name."""
    _load_tool_modules()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_tool(name: str) -> Tool:
    """Return the tool called `name`; ToolError lists the known names when it does not exist."""
    _load_tool_modules()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ToolError(f"no tool called {name!r}; known tools: {known}")
    return _REGISTRY[name]
