"""Checkpoint paths: the one grammar of ``wb://`` paths, and their ``tinker://`` spelling.

A checkpoint is ``wb://<run_id>/weights/<name>`` (a training state) or
``wb://<run_id>/sampler_weights/<name>`` (weights only). The SDK's RestClient and the
server's store both parse paths with `parse_checkpoint_path`; the server's Tinker HTTP
frontend maps ``tinker://<run_id>/<kind>/<name>`` one to one onto the same path (`to_wb`,
and `to_tinker` for results going back).
"""

from __future__ import annotations

import re
from typing import Any

from .errors import InvalidRequestError

SCHEME = "wb://"
TINKER_SCHEME = "tinker://"
KINDS = ("weights", "sampler_weights")  # a training state; weights only
# A run id or checkpoint name: safe as one path component on the server's disk.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CheckpointPathError(InvalidRequestError, ValueError):
    """A malformed checkpoint path: the server answers it as an InvalidRequestError, and
    SDK callers may catch it as the ValueError a bad argument is."""


def parse_checkpoint_path(path: Any, where: str = "path") -> tuple[str, str, str]:
    """wb://<run_id>/<kind>/<name> -> (run_id, kind, name); CheckpointPathError naming the
    expected form otherwise (kind is weights or sampler_weights; run id and name are 1-128
    letters, digits, '.', '_' or '-', starting with a letter or digit)."""
    parts = path[len(SCHEME):].split("/") if isinstance(path, str) and path.startswith(SCHEME) else []
    if len(parts) != 3 or parts[1] not in KINDS or not all(NAME_RE.match(p) for p in (parts[0], parts[2])):
        raise CheckpointPathError(
            f"bad checkpoint path {path!r}; expected {SCHEME}<run_id>/weights/<name> or "
            f"{SCHEME}<run_id>/sampler_weights/<name>", where)
    return parts[0], parts[1], parts[2]


def to_wb(path: Any, where: str = "path") -> str:
    """tinker://<run_id>/<kind>/<name> -> wb://... (wb:// is accepted as it is)."""
    if isinstance(path, str) and path.startswith(TINKER_SCHEME):
        return SCHEME + path[len(TINKER_SCHEME):]
    if isinstance(path, str) and path.startswith(SCHEME):
        return path
    raise InvalidRequestError(f"expected a checkpoint path tinker://<run_id>/weights/<name>, got {path!r}", where)


def to_tinker(value: Any) -> Any:
    """Every wb:// string inside a result, as tinker://."""
    if isinstance(value, str) and value.startswith(SCHEME):
        return TINKER_SCHEME + value[len(SCHEME):]
    if isinstance(value, dict):
        return {k: to_tinker(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_tinker(v) for v in value]
    return value
