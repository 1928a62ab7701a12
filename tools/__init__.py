"""Typed tools over core (pydantic input and output models), found through `tools.registry`."""

__all__: list[str] = []
