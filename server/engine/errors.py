"""The engine's one error type (its own module, so every engine module can raise it)."""

from __future__ import annotations

from workbench.errors import InvalidRequestError


class EngineInputError(InvalidRequestError, ValueError):
    """Bad input for one request; `where` names the datum and field (e.g. data[3].weights).
    An InvalidRequestError, so it reaches the client as one without a translation step."""
