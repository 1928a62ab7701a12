"""The tool registry: every tool is a pydantic input model, an output model and a function.

Tool modules register themselves with `@register(...)`; `all_tools()` imports every module
listed in `TOOL_MODULES` so that the CLI and the agent see the same set.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from core.errors import ToolError

TOOL_MODULES = (
    "tools.events",
    "tools.rmm",
    "tools.fits",
    "tools.symbolic",
    "tools.bumps",
    "tools.spectrum",
    "tools.autoencoder",
)
"""Modules that define tools; a module that does not exist yet is skipped."""

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)


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
        result = self.run(arguments)
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
