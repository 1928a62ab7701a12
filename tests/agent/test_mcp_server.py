"""`anomscan mcp`: the registry's tools over MCP stdio, driven by the SDK's own client.

The server runs as a real subprocess (`python -m agent.cli mcp`); the client lists the tools
and calls `fit_background` and `bump_hunt` with valid and invalid arguments.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from mcp import Client, StdioServerParameters

from core.significance import gaussian_bin_fractions
from tests.spectra import EDGES, FIT_RANGE, expected_counts
from tools.registry import all_tools

REPO = Path(__file__).resolve().parents[2]

BUMP_EDGES = np.linspace(1000.0, 3000.0, 41)
BUMP_CENTRES = 0.5 * (BUMP_EDGES[1:] + BUMP_EDGES[:-1])
BUMP_BACKGROUND = 4000.0 * np.exp(-(BUMP_CENTRES - 1000.0) / 500.0)


def _server(tmp_path: Path, *extra: str) -> StdioServerParameters:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "agent.cli", "mcp", *extra],
        env=env,
        cwd=str(tmp_path),
    )


def _session(tmp_path: Path, body: Callable[[Client], Awaitable[None]], *extra: str) -> None:
    """Run `body` against a fresh server subprocess."""

    async def main() -> None:
        async with Client(_server(tmp_path, *extra), read_timeout_seconds=120) as client:
            await body(client)

    anyio.run(main)


def _text(result: Any) -> str:
    return "\n".join(block.text for block in result.content)


@pytest.fixture(scope="module")
def p4_counts() -> list[float]:
    rng = np.random.default_rng(11)
    return rng.poisson(expected_counts("p4", 20_000.0)).astype(float).tolist()


def test_lists_every_registered_tool_with_its_pydantic_schema(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    async def body(client: Client) -> None:
        listing = await client.list_tools()
        seen.update({tool.name: tool for tool in listing.tools})

    _session(tmp_path, body)
    registry = {tool.name: tool for tool in all_tools()}
    assert set(seen) == set(registry)
    for name, tool in registry.items():
        assert seen[name].input_schema == tool.input_model.model_json_schema()
        assert seen[name].description == tool.description
    assert "histogram" in seen["fit_background"].input_schema["required"]


def test_calls_two_tools_valid_and_invalid(tmp_path: Path, p4_counts: list[float]) -> None:
    results: dict[str, Any] = {}
    rng = np.random.default_rng(2)
    bump_counts = rng.poisson(
        BUMP_BACKGROUND + 500.0 * gaussian_bin_fractions(BUMP_EDGES, 2000.0, 40.0)
    ).astype(float)
    histogram = {"edges": EDGES.tolist(), "counts": p4_counts}

    async def body(client: Client) -> None:
        results["fit"] = await client.call_tool(
            "fit_background",
            {"histogram": histogram, "function": "p4", "fit_range": list(FIT_RANGE)},
        )
        results["fit_wrong_type"] = await client.call_tool(
            "fit_background", {"histogram": histogram, "fit_range": "wide"}
        )
        results["fit_extra_field"] = await client.call_tool(
            "fit_background", {"histogram": histogram, "shell": "rm -rf /"}
        )
        results["bump"] = await client.call_tool(
            "bump_hunt",
            {
                "histogram": {
                    "edges": BUMP_EDGES.tolist(),
                    "counts": bump_counts.tolist(),
                    "background": BUMP_BACKGROUND.tolist(),
                },
                "width_max": 8,
                "n_toys": 200,
                "max_toys": 2000,
                "seed": 3,
            },
        )
        results["bump_missing"] = await client.call_tool("bump_hunt", {})
        results["bump_no_file"] = await client.call_tool(
            "bump_hunt", {"histogram": {"path": str(tmp_path / "absent.npz")}}
        )
        results["unknown"] = await client.call_tool("run_shell", {"command": "ls"})
        # the server is still alive after all the errors
        results["after"] = await client.list_tools()

    _session(tmp_path, body)

    fit = results["fit"]
    assert not fit.is_error
    assert fit.structured_content["function"] == "p4"
    assert fit.structured_content["valid"]
    assert json.loads(_text(fit)) == fit.structured_content
    assert fit.structured_content["p_value"] > 0.001

    wrong = results["fit_wrong_type"]
    assert wrong.is_error
    assert "invalid input for tool 'fit_background'" in _text(wrong)
    assert "fit_range" in _text(wrong)
    extra = results["fit_extra_field"]
    assert extra.is_error
    assert "shell" in _text(extra)
    assert "Extra inputs are not permitted" in _text(extra)

    bump = results["bump"]
    assert not bump.is_error
    window = bump.structured_content["window"]
    assert window[0] <= 2000.0 <= window[1]
    assert bump.structured_content["local_z"] > 3

    missing = results["bump_missing"]
    assert missing.is_error
    assert "histogram" in _text(missing)
    assert "Field required" in _text(missing)
    no_file = results["bump_no_file"]
    assert no_file.is_error
    assert "InvalidInputError" in _text(no_file)
    assert "absent.npz" in _text(no_file)

    unknown = results["unknown"]
    assert unknown.is_error
    assert "no tool called 'run_shell'" in _text(unknown)
    assert len(results["after"].tools) == len(all_tools())


def test_root_confines_paths(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    inside = root / "h.npz"
    outside = tmp_path / "h.npz"
    for path in (inside, outside):
        np.savez(
            path,
            edges=BUMP_EDGES,
            counts=np.floor(BUMP_BACKGROUND),
            background=BUMP_BACKGROUND,
        )
    results: dict[str, Any] = {}

    async def body(client: Client) -> None:
        for name, path in (
            ("inside", str(inside)),
            ("outside", str(outside)),
            ("dotdot", str(root / ".." / "h.npz")),
        ):
            results[name] = await client.call_tool(
                "bump_hunt", {"histogram": {"path": path}, "n_toys": 100, "seed": 1}
            )

    _session(tmp_path, body, "--root", str(root))
    assert not results["inside"].is_error
    for name in ("outside", "dotdot"):
        assert results[name].is_error
        assert "outside the allowed folder" in _text(results[name])


def test_stdout_carries_only_the_protocol(tmp_path: Path) -> None:
    """Every line the server writes to stdout is a JSON-RPC message; logs go to stderr."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO))
    requests = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "bump_hunt", "arguments": {"histogram": {}}},
        },
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "mcp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    messages = []
    try:
        for request in requests:
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            if "id" in request:
                messages.append(json.loads(process.stdout.readline()))
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert rest.strip() == ""
    assert [message["id"] for message in messages] == [1, 2]
    assert all(message["jsonrpc"] == "2.0" for message in messages)
    assert messages[1]["result"]["isError"] is True
    assert process.returncode == 0
    assert "serving" in stderr
    assert "tool bump_hunt: invalid input" in stderr
