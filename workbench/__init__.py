"""Tinker Workbench: a self-hosted, Jupyter-native training API for LLM post-training.

Mirrors Tinker's Python SDK: `import workbench as tinker` and your loop runs here.
"""

from . import types
from .errors import (
    AuthenticationError, ConnectionFailedError, InvalidRequestError, NotFoundError,
    ProtocolError, QueueFullError, RequestFailedError, ServerError, WorkbenchError,
)
from .futures import APIFuture
from .rest_client import RestClient
from .sampling_client import SamplingClient
from .service_client import ServiceClient
from .training_client import TrainingClient
from .types import *  # noqa: F401,F403  (types importable from the package root, as in Tinker)

__version__ = "0.1.0"
