"""Tinker Workbench: a self-hosted, Jupyter-native training API for LLM post-training.

Mirrors Tinker's Python SDK: `import workbench as tinker` and your loop runs here.
"""

from . import types
from .errors import (
    AuthenticationError, ConnectionFailedError, InvalidRequestError, NotFoundError,
    ProtocolError, QueueFullError, RequestFailedError, ServerError, WorkbenchError,
)
from .futures import APIFuture
from .types import *  # noqa: F401,F403  (types importable from the package root, as in Tinker)

__version__ = "0.1.0"

# The clients load on first use (`workbench.ServiceClient`, `from workbench import ...`):
# they bring ZeroMQ, which the server's engine, importing the shared protocol modules of this
# package (types, wire, errors, paths, losses), must not need (the GPU machine has no pyzmq).
_CLIENTS = {"RestClient": "rest_client", "SamplingClient": "sampling_client",
            "ServiceClient": "service_client", "TrainingClient": "training_client"}


def __getattr__(name: str):
    if name in _CLIENTS:
        import importlib

        value = getattr(importlib.import_module(f".{_CLIENTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_CLIENTS})
