"""Pure physics over numpy and awkward arrays: import what you need from its modules."""

__all__: list[str] = []
