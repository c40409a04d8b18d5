"""Runs and checkpoints as the RestClient lists them: read from (and deleted in) the store.

Runs survive restarts, so listings come from the store, not from the live registry; another
tenant's runs and paths read as not found, exactly like missing ones.
"""

from __future__ import annotations

import time

from workbench.errors import InvalidRequestError

from .store import RunCorruptedError, Store


class Listings:
    """One method per listing op (the runner's handlers), each (tenant, args) -> result."""

    def __init__(self, store: Store):
        self.store = store

    def list_training_runs(self, tenant: str, args: dict) -> dict:
        limit, offset = _page(args)
        runs = sorted(self.store.list_runs(tenant), key=lambda m: m.get("created", 0), reverse=True)
        return {"training_runs": [self.run_record(m) for m in runs[offset:offset + limit]],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    def get_training_run(self, tenant: str, args: dict) -> dict:
        try:
            return self.run_record(self.store.run_meta(args["run_id"], tenant))
        except RunCorruptedError as exc:  # its owner sees the run, marked as Tinker marks it
            return {"training_run_id": exc.run_id, "base_model": "", "model_owner": tenant, "corrupted": True}

    def list_checkpoints(self, tenant: str, args: dict) -> dict:
        return {"checkpoints": self.store.list_checkpoints(args["run_id"], tenant), "cursor": None}

    def list_user_checkpoints(self, tenant: str, args: dict) -> dict:
        """Every run's checkpoints, newest first."""
        limit, offset = _page(args)
        checkpoints = [c for m in self.store.list_runs(tenant)
                       for c in self.store.list_checkpoints(m["run_id"], tenant)]
        checkpoints.sort(key=lambda c: c["time"], reverse=True)
        return {"checkpoints": checkpoints[offset:offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(checkpoints)}}

    def delete_checkpoint(self, tenant: str, args: dict) -> dict:
        self.store.delete_checkpoint(args["path"], tenant)
        return {}

    def get_checkpoint_files(self, tenant: str, args: dict) -> dict:
        return {"files": self.store.checkpoint_files(args["path"], tenant)}

    def run_record(self, meta: dict) -> dict:
        """A stored run as the SDK's TrainingRun."""
        checkpoints = self.store.list_checkpoints(meta["run_id"], meta["tenant"])
        latest = {kind: max((c for c in checkpoints if c["checkpoint_type"] == kind),
                            key=lambda c: c["time"], default=None) for kind in ("training", "sampler")}
        times = [c["time"] for c in checkpoints]
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(meta.get("created", 0)))
        return {
            "training_run_id": meta["run_id"], "base_model": meta["base_model"],
            "model_owner": meta["tenant"], "is_lora": True,
            "lora_rank": int(meta["lora"]["rank"]), "last_request_time": max([created, *times]),
            "last_checkpoint": latest["training"], "last_sampler_checkpoint": latest["sampler"],
            "user_metadata": meta.get("user_metadata"),
        }


def _page(args: dict) -> tuple[int, int]:
    limit, offset = args.get("limit", 20), args.get("offset", 0)
    if not isinstance(limit, int) or limit < 1:
        raise InvalidRequestError(f"limit must be a positive integer, got {limit!r}", "limit")
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequestError(f"offset must be a non-negative integer, got {offset!r}", "offset")
    return limit, offset
