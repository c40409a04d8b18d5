"""RestClient: runs and checkpoints — list, inspect, delete, download.

Mirrors Tinker's `RestClient` (names, arguments, return types); every call returns an
APIFuture at once. Paths are ``wb://<run_id>/weights/<name>`` (a training state) and
``wb://<run_id>/sampler_weights/<name>`` (weights only). Checkpoint ids are the last two
parts, ``weights/<name>`` or ``sampler_weights/<name>``, as in Tinker.

Only the caller's own runs exist for it: another tenant's runs and paths are NotFound.

Paths are checked with `workbench.paths.parse_checkpoint_path`, the one parser of ``wb://``
paths (the server's store uses it too); its names stay importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from . import types
from .futures import APIFuture, map_future
# The checkpoint path grammar lives in workbench.paths; re-exported here for old imports.
from .paths import KINDS, NAME_RE, SCHEME, CheckpointPathError, parse_checkpoint_path  # noqa: F401

AccessScope = Literal["owned", "accessible"]


class RestClient:
    """Made by `ServiceClient.create_rest_client()`; shares the service's connection."""

    def __init__(self, connection):
        self._connection = connection

    # ------------------------------------------------------------------ server

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        return map_future(self._connection.call("get_server_capabilities", {}),
                          types.GetServerCapabilitiesResponse.model_validate)

    # ------------------------------------------------------------------- runs

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned",
        project_id: Optional[str] = None,
    ) -> APIFuture[types.TrainingRunsResponse]:
        """The caller's runs, newest first, one page (`limit` from `offset`)."""
        _check_scope(access_scope, project_id)
        return map_future(self._connection.call("list_training_runs", {"limit": limit, "offset": offset}),
                          types.TrainingRunsResponse.model_validate)

    def get_training_run(
        self, training_run_id: str, access_scope: AccessScope = "owned"
    ) -> APIFuture[types.TrainingRun]:
        _check_scope(access_scope, None)
        return map_future(self._connection.call("get_training_run", {"run_id": training_run_id}),
                          types.TrainingRun.model_validate)

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: AccessScope = "owned"
    ) -> APIFuture[types.TrainingRun]:
        """The run a checkpoint path belongs to."""
        run_id, _, _ = parse_checkpoint_path(tinker_path, "tinker_path")
        return self.get_training_run(run_id, access_scope)

    # ------------------------------------------------------------ checkpoints

    def list_checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        """One run's checkpoints, training states and sampler weights."""
        return map_future(self._connection.call("list_checkpoints", {"run_id": training_run_id}),
                          types.CheckpointsListResponse.model_validate)

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[types.CheckpointsListResponse]:
        """Every checkpoint of every run of the caller, newest first, one page."""
        return map_future(self._connection.call("list_user_checkpoints", {"limit": limit, "offset": offset}),
                          types.CheckpointsListResponse.model_validate)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Delete `checkpoint_id` ("weights/<name>" or "sampler_weights/<name>") of a run."""
        return self.delete_checkpoint_from_tinker_path(f"{SCHEME}{training_run_id}/{checkpoint_id}")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        parse_checkpoint_path(tinker_path, "tinker_path")
        return map_future(self._connection.call("delete_checkpoint", {"path": tinker_path}), lambda _: None)

    def download_checkpoint(self, path: str, dest_dir: "str | os.PathLike[str]") -> APIFuture[str]:
        """Write a checkpoint's files into `dest_dir` (created if missing); resolves to it.

        The directory is a PEFT adapter (adapter_config.json + adapter_model.safetensors),
        loadable with `peft.PeftModel.from_pretrained(base, dest_dir)`; a training state also
        has optimizer.safetensors.
        """
        parse_checkpoint_path(path)
        dest = Path(dest_dir)

        def write(result: dict) -> str:
            dest.mkdir(parents=True, exist_ok=True)
            for name, data in result["files"].items():
                if Path(name).name != name or name.startswith("."):  # never write outside dest
                    raise ValueError(f"server sent a file with an unsafe name {name!r}")
                tmp = dest / f".{name}.part"
                tmp.write_bytes(data)
                tmp.replace(dest / name)
            return str(dest)

        return map_future(self._connection.call("get_checkpoint_files", {"path": path}), write)

    # --------------------------------------------------------- async variants

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await self.get_server_capabilities()

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0,
                                       access_scope: AccessScope = "owned",
                                       project_id: Optional[str] = None) -> types.TrainingRunsResponse:
        return await self.list_training_runs(limit, offset, access_scope, project_id)

    async def get_training_run_async(self, training_run_id: str,
                                     access_scope: AccessScope = "owned") -> types.TrainingRun:
        return await self.get_training_run(training_run_id, access_scope)

    async def get_training_run_by_tinker_path_async(self, tinker_path: str,
                                                    access_scope: AccessScope = "owned") -> types.TrainingRun:
        return await self.get_training_run_by_tinker_path(tinker_path, access_scope)

    async def list_checkpoints_async(self, training_run_id: str) -> types.CheckpointsListResponse:
        return await self.list_checkpoints(training_run_id)

    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> types.CheckpointsListResponse:
        return await self.list_user_checkpoints(limit, offset)

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        return await self.delete_checkpoint(training_run_id, checkpoint_id)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.delete_checkpoint_from_tinker_path(tinker_path)

    async def download_checkpoint_async(self, path: str, dest_dir: "str | os.PathLike[str]") -> str:
        return await self.download_checkpoint(path, dest_dir)

    def __repr__(self) -> str:
        return f"RestClient({self._connection.url!r})"


def _check_scope(access_scope: str, project_id: Optional[str]) -> None:
    if access_scope not in ("owned", "accessible"):
        raise ValueError(f"access_scope must be 'owned' or 'accessible', got {access_scope!r}")
    if project_id is not None:
        raise ValueError("projects are not supported by a workbench server; pass project_id=None")
