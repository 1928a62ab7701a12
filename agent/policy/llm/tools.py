"""The function tools the model is offered: one decision tool per question, a few read-only ones.

A decision tool's JSON Schema is generated from its proposal's pydantic model
(agent/policy/protocol.py), so the schema the model is shown and the validation its answer
meets have one source. The read-only inspection tools are registry tools, offered with their
input models' schemas; their arguments are validated and every path in them is confined to
the run folder and the declared inputs (agent/runtime/safety.py) before they run. Any other
name the model calls is refused: nothing the model says is executed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic

from pydantic import BaseModel, ValidationError

from agent.policy.gates import GateResult
from agent.policy.llm.completion import MAX_NESTING, nesting_depth
from agent.policy.llm.records import clip
from agent.policy.protocol import (
    BackgroundProposal,
    FallbackProposal,
    PointsProposal,
    ProposalT,
)
from agent.runtime.safety import PathConfinementError, confine_paths
from core.errors import AnomscanError
from tools.registry import get_tool

INSPECTION_TOOLS = ("fit_background", "robustness_checks", "bump_hunt", "signal_fit")
"""Read-only registry tools the model may call before deciding (paths confined to the run)."""
MAX_TOOL_OUTPUT_CHARS = 20_000
"""Characters of an inspection tool's JSON output sent back to the model."""


def function_tool(name: str, description: str, model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAI function-tool description with the JSON Schema of a pydantic model."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": model.model_json_schema(),
        },
    }


@dataclass(frozen=True)
class DecisionTool(Generic[ProposalT]):
    """The tool the model calls to give its decision, and the proposal its arguments are."""

    name: str
    model: type[ProposalT]
    description: str

    def offered(self) -> list[dict[str, Any]]:
        """The tools of a question: this decision tool first, then the inspection tools."""
        specs = [function_tool(self.name, self.description, self.model)]
        for name in INSPECTION_TOOLS:
            tool = get_tool(name)
            specs.append(function_tool(name, tool.description, tool.input_model))
        return specs


PROPOSE_POINTS = DecisionTool(
    "propose_points", PointsProposal, "AR points (pb) to scan next, or stop."
)
ACCEPT_BACKGROUND = DecisionTool(
    "accept_background",
    BackgroundProposal,
    "The background function to accept for the spectrum at the point (null = none).",
)
DECIDE_FALLBACK = DecisionTool(
    "decide_fallback",
    FallbackProposal,
    "Whether to run the symbolic-regression fallback for the spectrum at the point.",
)
DECISION_TOOLS: dict[str, DecisionTool[Any]] = {
    tool.name: tool for tool in (PROPOSE_POINTS, ACCEPT_BACKGROUND, DECIDE_FALLBACK)
}


@dataclass(frozen=True)
class Workspace:
    """Where the inspection tools may read: the run folder and the scan's declared inputs."""

    run_dir: Path
    declared_inputs: tuple[str, ...] = ()

    def inspect(self, name: str, arguments: dict[str, Any]) -> str:
        """The answer to an inspection call: the tool's JSON output, or why it was refused."""
        try:
            return self._run(name, arguments)
        except ValidationError as error:
            return f"refused: invalid arguments for {name}: {error}"
        except PathConfinementError as error:
            return f"refused: {error}"
        except AnomscanError as error:
            return f"tool {name} failed: {type(error).__name__}: {error}"

    def _run(self, name: str, arguments: dict[str, Any]) -> str:
        tool = get_tool(name)
        validated = tool.input_model.model_validate(arguments)
        confine_paths(validated, [self.run_dir], self.declared_inputs)
        output = json.dumps(tool.call(arguments), default=str)
        if len(output) > MAX_TOOL_OUTPUT_CHARS:
            output = output[:MAX_TOOL_OUTPUT_CHARS] + " ... (truncated)"
        return output


def _arguments(name: str, text: str) -> dict[str, Any] | str:
    """A tool call's arguments as a JSON object, or the refusal to send back."""
    if nesting_depth(text) > MAX_NESTING:
        return f"refused: the arguments of {name} are nested deeper than {MAX_NESTING} levels"
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as error:
        return f"refused: the arguments of {name} are not valid JSON ({error})"
    if not isinstance(arguments, dict):
        return f"refused: the arguments of {name} must be a JSON object"
    return arguments


def answer_call(
    call: dict[str, str],
    tool: DecisionTool[ProposalT],
    check: Callable[[ProposalT], GateResult],
    workspace: Workspace,
) -> tuple[str, ProposalT | None]:
    """What to send back for one tool call (`accepted`, an output, or `refused: <why>`).

    The proposal is returned only when the call is the decision tool, its arguments validate
    as the proposal's model and `check` (the gates) passes it.
    """
    name = call["name"]
    allowed = {tool.name, *INSPECTION_TOOLS}
    if name not in allowed:
        return f"refused: unknown tool {clip(name, 100)!r}; the tools are {sorted(allowed)}", None
    arguments = _arguments(name, call["arguments"] or "{}")
    if isinstance(arguments, str):
        return arguments, None
    if name != tool.name:
        return workspace.inspect(name, arguments), None
    try:
        proposal = tool.model.model_validate(arguments)
    except ValidationError as error:
        return f"refused: invalid arguments for {name}: {error}", None
    gate = check(proposal)
    if not gate.passed:
        return f"refused: the gates refused it: {gate.reason}", None
    return "accepted", proposal
