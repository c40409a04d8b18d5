"""Errors raised by the SDK, and the structured error that travels on the wire.

The server raises the same classes (it depends on `workbench`), so an error keeps its
type, message and `where` (e.g. ``data[3].loss_fn_inputs.weights``) across the socket.
`category` follows Tinker: "user" errors are the caller's to fix, "server" errors are ours.
"""

from __future__ import annotations

from typing import Optional


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose."""

    category = "server"

    def __init__(self, message: str, where: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.message} (at {self.where})" if self.where else self.message

    def to_wire(self) -> dict:
        # Subclasses defined elsewhere (e.g. wire.WireError) travel as their nearest
        # public ancestor, so the peer can rebuild a class it knows.
        name = next((c.__name__ for c in type(self).__mro__ if c.__name__ in _WIRE_TYPES), "ServerError")
        return {"type": name, "message": self.message, "where": self.where}


class RequestFailedError(WorkbenchError):
    """A request reached the server and failed there."""


class InvalidRequestError(RequestFailedError):
    """The request's arguments are wrong (bad shapes, unknown loss, bad parameters)."""

    category = "user"


class NotFoundError(RequestFailedError):
    """A run, sampler, model or checkpoint that does not exist (or is not yours)."""

    category = "user"


class AuthenticationError(RequestFailedError):
    """The API key is missing or unknown to the server."""

    category = "user"


class ProtocolError(RequestFailedError):
    """The peer speaks another protocol version, or sent a malformed message."""

    category = "user"


class QueueFullError(RequestFailedError):
    """The tenant's queue is full; wait for earlier requests and retry."""

    category = "user"


class ServerError(RequestFailedError):
    """An unexpected failure inside the server."""


class ConnectionFailedError(WorkbenchError):
    """The client could not reach the server, or lost it."""

    category = "user"


_WIRE_TYPES = {
    cls.__name__: cls
    for cls in (
        RequestFailedError,
        InvalidRequestError,
        NotFoundError,
        AuthenticationError,
        ProtocolError,
        QueueFullError,
        ServerError,
        ConnectionFailedError,
    )
}


def error_from_wire(error: dict) -> RequestFailedError:
    """Rebuild the exception a server reply describes; unknown types become ServerError."""
    cls = _WIRE_TYPES.get(str(error.get("type")), ServerError)
    return cls(str(error.get("message", "")), error.get("where"))
