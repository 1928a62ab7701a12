"""The tools of tools/registry.py served over the Model Context Protocol (stdio transport).

Every registered tool is listed with the JSON Schema of its pydantic input model (and of its
output model, so clients can validate `structured_content`). A call is validated by the same
model as `anomscan tool NAME`; an invalid argument, an unknown tool or an anomscan error comes
back as a tool result with `is_error` set and the message, never as a crash of the server.
stdout carries only the protocol: logging goes to stderr, and the SDK's stdio transport points
fd 1 at stderr while it serves, so stray prints of a tool cannot corrupt the stream.

With `root` set, every path in a tool input (histogram NPZ, ROOT inputs, outputs) must lie
inside that folder: a client can then read and write nothing else through anomscan.

The MCP SDK (`mcp`, `mcp_types`) takes most of a second to import, so it is imported inside
the functions that serve: every other `anomscan` command imports this module without it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from pydantic import ValidationError

from agent.runtime.safety import PathConfinementError, confine_paths
from core.errors import AnomscanError
from tools.registry import Tool, all_tools

if TYPE_CHECKING:
    import mcp_types as types
    from mcp.server.context import ServerRequestContext
    from mcp.server.lowlevel import Server

__all__ = [
    "SERVER_NAME",
    "build_server",
    "call_registered_tool",
    "serve_stdio",
    "tool_descriptions",
]

logger = logging.getLogger("anomscan.mcp")

SERVER_NAME = "anomscan"


def tool_descriptions() -> list[types.Tool]:
    """The MCP description of every registered tool: name, one line, input and output schema."""
    import mcp_types as types

    return [
        types.Tool(
            name=tool.name,
            description=tool.description,
            input_schema=tool.input_model.model_json_schema(),
            output_schema=tool.output_model.model_json_schema(mode="serialization"),
        )
        for tool in all_tools()
    ]


def _error_result(text: str) -> types.CallToolResult:
    """A tool result that carries the reason a call failed."""
    import mcp_types as types

    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


def call_registered_tool(
    name: str, arguments: dict[str, Any] | None, root: Path | None
) -> types.CallToolResult:
    """Validate `arguments`, run tool `name` and wrap its output (or the reason it failed)."""
    import mcp_types as types

    tools: dict[str, Tool] = {tool.name: tool for tool in all_tools()}
    tool = tools.get(name)
    if tool is None:
        return _error_result(f"no tool called {name!r}; known tools: {', '.join(sorted(tools))}")
    payload = arguments or {}
    started = time.perf_counter()
    try:
        validated = tool.input_model.model_validate(payload)
        if root is not None:
            confine_paths(validated, allowed=(root,))
        output = tool.call(payload)
    except ValidationError as error:
        logger.info("tool %s: invalid input (%d errors)", name, error.error_count())
        return _error_result(f"invalid input for tool {name!r}:\n{error}")
    except PathConfinementError as error:
        logger.info("tool %s: path refused: %s", name, error)
        return _error_result(f"tool {name!r} refused: {error}")
    except AnomscanError as error:
        logger.info("tool %s failed: %s", name, error)
        return _error_result(f"tool {name!r} failed: {type(error).__name__}: {error}")
    except Exception as error:  # an internal error is a tool failure, not a server crash
        logger.exception("tool %s raised an internal error", name)
        return _error_result(
            f"tool {name!r} raised an internal error: {type(error).__name__}: {error} "
            "(the traceback is in the server's stderr log)"
        )
    logger.info("tool %s done in %.3f s", name, time.perf_counter() - started)
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(output))], structured_content=output
    )


def build_server(root: Path | None = None) -> Server[Any]:
    """The low-level MCP server listing and calling the registered tools."""
    import mcp_types as types
    from mcp.server.lowlevel import Server

    resolved_root = None if root is None else root.resolve()

    async def list_tools(
        _context: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_descriptions())

    async def call_tool(
        _context: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        # Tools are CPU-bound and synchronous: run them off the event loop.
        return await anyio.to_thread.run_sync(
            call_registered_tool, params.name, params.arguments, resolved_root
        )

    return Server(
        SERVER_NAME,
        version=version("anomscan"),
        instructions=(
            "anomscan's physics tools: RMM, autoencoder scoring, anomaly regions, 63 spectra, "
            "background fits and choice, robustness checks, BumpHunter, look-elsewhere. "
            "Masses in GeV, cross-sections in pb, luminosities in pb^-1; big arrays travel "
            "as files referenced by path."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def _serve(root: Path | None) -> None:
    """Serve the tools on stdin/stdout until the client closes the stream."""
    from mcp.server.stdio import stdio_server

    server = build_server(root)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def serve_stdio(root: Path | None = None) -> int:
    """Serve the tools over stdin/stdout until the client closes the stream; log to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if root is not None and not root.is_dir():
        print(
            f"anomscan mcp: --root {root} is not a folder; give an existing folder", file=sys.stderr
        )
        return 2
    logger.info("serving %d tools over stdio (root: %s)", len(all_tools()), root or "any path")
    anyio.run(_serve, root)
    return 0
