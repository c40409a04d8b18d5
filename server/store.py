"""Runs and checkpoints on disk, in PEFT format, addressed by `wb://` URIs.

Layout under the store root::

    runs/<run_id>/run.json                              owner tenant, base model, LoRA config
    runs/<run_id>/owner                                 the owner tenant alone (see "Crash safety")
    runs/<run_id>/weights/<name>/                       a training state (save_state)
        adapter_model.safetensors  adapter_config.json  optimizer.safetensors
    runs/<run_id>/sampler_weights/<name>/               weights only (immutable)
        adapter_model.safetensors  adapter_config.json

URIs: ``wb://<run_id>/weights/<name>`` and ``wb://<run_id>/sampler_weights/<name>``.
Everything is data (safetensors + JSON): no pickle on disk either. Another tenant's runs and
checkpoints are reported as "not found", exactly like ones that do not exist.

Crash safety: nothing is ever written in place. A run directory and a checkpoint directory
are written (and fsynced) under a hidden temporary name beside their final one and renamed
in; a checkpoint that exists already is first renamed aside (`.<name>.old-<hex>`), the new
one renamed in, then the aside copy deleted, so at every instant the old or the new complete
checkpoint is there. Opening a Store recovers what a crash left: an aside copy whose
checkpoint is missing is put back, every other hidden leftover (temporaries, aside and
deleted copies) is removed. A run whose run.json is unreadable is left out of listings
(it never breaks them), reads as corrupted to its owner (from `owner`) and as not found to
anyone else. Checkpoints that cannot be read, or hold NaN or infinite values, are refused
with an InvalidRequestError naming their wb:// path; errors never carry server paths.
One server process owns a store root: a Store that cannot take the root's lock (another
process has it open) skips the recovery, so it never deletes a live writer's temporaries.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from workbench.errors import InvalidRequestError, NotFoundError, ServerError
# The one wb:// grammar, shared with the SDK (its errors are InvalidRequestErrors at "path").
from workbench.paths import KINDS, SCHEME, parse_checkpoint_path
from workbench.paths import NAME_RE as _NAME_RE


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequestError(
            f"checkpoint name {name!r} must be 1-128 characters of letters, digits, '.', '_' "
            "or '-', starting with a letter or digit", "name",
        )
    return name


class RunCorruptedError(InvalidRequestError):
    """The owner addressed a run whose stored record (run.json) cannot be read."""

    def __init__(self, run_id: str):
        super().__init__(f"training run {run_id!r} is corrupted: its stored record cannot be read")
        self.run_id = run_id


# Hidden leftovers: `.<name>.<tmp|old|deleted>-<8 hex>` (a name may itself hold dots).
_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old|deleted)-[0-9a-f]{8}$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        self._lock = _try_lock(self.root / ".lock")
        if self._lock is not False:  # locked, or no locking on this platform
            self.recover()

    def close(self) -> None:
        """Release the root's lock (a process that ends releases it too)."""
        if self._lock:
            self._lock.close()
        self._lock = None

    def recover(self) -> None:
        """Undo what a crash left: put back aside checkpoints whose swap never finished,
        remove temporaries, aside copies of finished swaps and half-deleted checkpoints."""
        runs = self.root / "runs"
        for entry in sorted(runs.iterdir()):
            if entry.name.startswith("."):
                if _LEFTOVER_RE.match(entry.name):  # a run directory never renamed in
                    _remove(entry)
                continue
            if not entry.is_dir():
                continue
            for kind in KINDS:
                kind_dir = entry / kind
                if not kind_dir.is_dir():
                    continue
                leftovers = [(m, p) for p in sorted(kind_dir.iterdir()) if (m := _LEFTOVER_RE.match(p.name))]
                for match, path in sorted(leftovers, key=lambda mp: mp[0]["what"] != "old"):
                    final = kind_dir / match["name"]
                    if match["what"] == "old" and _NAME_RE.match(match["name"]) and not os.path.lexists(final):
                        with contextlib.suppress(OSError):  # else: tried again at the next start
                            os.replace(path, final)  # the swap stopped between its two renames
                    else:
                        _remove(path)

    # -------------------------------------------------------------------- runs

    def new_run(self, tenant: str, meta: dict[str, Any]) -> str:
        run_id = "run-" + secrets.token_hex(6)
        record = {**meta, "run_id": run_id, "tenant": tenant, "created": time.time()}
        with _disk_errors("creating the training run"):
            _write_dir(self.root / "runs" / run_id, {
                "owner": tenant.encode(), "run.json": json.dumps(record, indent=2).encode(),
            })
        return run_id

    def run_meta(self, run_id: str, tenant: str) -> dict[str, Any]:
        """The run's record; NotFoundError for a missing run or another tenant's,
        RunCorruptedError for the owner's run whose run.json cannot be read."""
        if not isinstance(run_id, str) or not _NAME_RE.match(run_id):
            raise NotFoundError(f"training run {run_id!r} not found")
        run_dir = self.root / "runs" / run_id
        if not run_dir.is_dir():
            raise NotFoundError(f"training run {run_id!r} not found")
        meta = _read_meta(run_dir)
        if meta is None:
            if _read_owner(run_dir) == tenant:
                raise RunCorruptedError(run_id)
            raise NotFoundError(f"training run {run_id!r} not found")
        if meta["tenant"] != tenant:
            raise NotFoundError(f"training run {run_id!r} not found")
        return meta

    def list_runs(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's runs; a run whose run.json cannot be read is left out."""
        runs = []
        for run_dir in sorted((self.root / "runs").glob("[!.]*")):
            meta = _read_meta(run_dir)
            if meta is not None and meta["tenant"] == tenant:
                runs.append(meta)
        return runs

    # ------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self,
        tenant: str,
        run_id: str,
        kind: str,
        name: str,
        tensors: dict[str, torch.Tensor],
        peft_config: dict,
        optimizer_state: Optional[dict] = None,
    ) -> str:
        self.run_meta(run_id, tenant)
        check_name(name)
        uri = f"{SCHEME}{run_id}/{kind}/{name}"
        final = self.root / "runs" / run_id / kind / name
        if kind == "sampler_weights" and os.path.lexists(final):
            raise InvalidRequestError(f"sampler weights {name!r} exist already and are immutable", "name")
        files = {
            "adapter_model.safetensors": safetensors_bytes(dict(tensors), metadata={"format": "pt"}),
            "adapter_config.json": json.dumps(peft_config, indent=2).encode(),
        }
        if optimizer_state is not None:
            flat, meta = _flatten_optimizer(optimizer_state)
            files["optimizer.safetensors"] = safetensors_bytes(flat, metadata={"meta": json.dumps(meta)})
        with _disk_errors(f"saving checkpoint {uri}"):
            final.parent.mkdir(exist_ok=True)
            _write_dir(final, files)
        return uri

    def checkpoint_dir(self, uri: str, tenant: str) -> Path:
        run_id, kind, name = parse_checkpoint_path(uri)
        self.run_meta(run_id, tenant)
        path = self.root / "runs" / run_id / kind / name
        if not (path / "adapter_model.safetensors").exists():
            raise NotFoundError(f"checkpoint {uri!r} not found")
        return path

    def load_checkpoint(self, uri: str, tenant: str) -> tuple[dict, dict, Optional[dict]]:
        """(tensors, adapter config, optimizer state or None); an InvalidRequestError naming
        `uri` when its files cannot be read or hold NaN or infinite values."""
        path = self.checkpoint_dir(uri, tenant)
        try:
            tensors = load_file(str(path / "adapter_model.safetensors"))
            peft_config = json.loads((path / "adapter_config.json").read_bytes())
            if not isinstance(peft_config, dict):
                raise ValueError("adapter_config.json is not a JSON object")
            optimizer_state, flat = None, {}
            if (path / "optimizer.safetensors").exists():
                with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
                    meta = json.loads(f.metadata()["meta"])
                    flat = {k: f.get_tensor(k) for k in f.keys()}
                optimizer_state = _unflatten_optimizer(flat, meta)
        except Exception:  # whatever the library says would name our files: say it plainly
            raise InvalidRequestError(f"checkpoint {uri} is corrupt: its files cannot be read", "path") from None
        for what, group in (("weights", tensors), ("optimizer state", flat)):
            for key, value in group.items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise InvalidRequestError(
                        f"checkpoint {uri} holds NaN or infinite values ({what} {key}); it cannot be loaded", "path")
        return tensors, peft_config, optimizer_state

    def list_checkpoints(self, run_id: str, tenant: str) -> list[dict[str, Any]]:
        self.run_meta(run_id, tenant)
        out = []
        for kind in KINDS:
            for path in sorted((self.root / "runs" / run_id / kind).glob("[!.]*")):
                out.append({
                    "checkpoint_id": f"{kind}/{path.name}",
                    "checkpoint_type": "training" if kind == "weights" else "sampler",
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime)),
                    "path": f"{SCHEME}{run_id}/{kind}/{path.name}",
                    "size_bytes": _size(path),
                })
        return out

    def delete_checkpoint(self, uri: str, tenant: str) -> None:
        """Remove a checkpoint (sampler weights too: immutable means never overwritten,
        not undeletable). Samplers already serving it keep their in-memory copy."""
        path = self.checkpoint_dir(uri, tenant)
        # Rename first, so a concurrent reader sees either the whole checkpoint or none
        # (a crash before the removal ends leaves a hidden copy that the next Store removes).
        doomed = path.with_name(f".{path.name}.deleted-{secrets.token_hex(4)}")
        with _disk_errors(f"deleting checkpoint {uri}"):
            os.replace(path, doomed)
        _remove(doomed)

    def checkpoint_files(self, uri: str, tenant: str) -> dict[str, bytes]:
        """The files of a checkpoint directory, by name (what download_checkpoint writes)."""
        path = self.checkpoint_dir(uri, tenant)
        try:
            return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}
        except OSError:
            raise InvalidRequestError(f"checkpoint {uri} is corrupt: its files cannot be read", "path") from None


# ------------------------------------------------------------------ the disk, safely

def _write_bytes(path: Path, data: bytes) -> None:
    """Create the file `path` (it must not exist) holding `data`, and fsync it: every byte
    the store writes goes through here."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_dir(final: Path, files: dict[str, bytes]) -> None:
    """Make `final` a directory holding exactly `files`, atomically: written under a hidden
    temporary name, then renamed in. An existing `final` is renamed aside first and removed
    once the new one is in, so at every instant the old or the new directory is complete.
    On an error nothing but the old directory is left."""
    tag = secrets.token_hex(4)
    tmp = final.with_name(f".{final.name}.tmp-{tag}")
    aside = None
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_bytes(tmp / name, data)
        _fsync_dir(tmp)
        if os.path.lexists(final):
            aside = final.with_name(f".{final.name}.old-{tag}")
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(aside, final)
                raise
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
    if aside is not None:
        _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _disk_errors(action: str):
    """An OSError while writing, as a ServerError that names no server path."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise ServerError(f"{action} failed: the server's disk is full; "
                              "every earlier checkpoint and run is intact") from None
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise ServerError(f"{action} failed: {reason}; every earlier checkpoint and run is intact") from None


def _read_meta(run_dir: Path) -> Optional[dict[str, Any]]:
    """A run's record, or None when run.json is missing, unreadable or not a run record."""
    try:
        meta = json.loads((run_dir / "run.json").read_bytes())
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("run_id") != run_dir.name
            or not isinstance(meta.get("tenant"), str) or not isinstance(meta.get("base_model"), str)
            or not isinstance(meta.get("lora"), dict) or not isinstance(meta["lora"].get("rank"), int)):
        return None
    return meta


def _read_owner(run_dir: Path) -> Optional[str]:
    try:
        return (run_dir / "owner").read_bytes().decode()
    except (OSError, ValueError):
        return None


def _size(path: Path) -> int:
    try:
        return sum(p.stat().st_size for p in path.iterdir())
    except OSError:
        return 0


def _try_lock(path: Path):
    """An open file holding an exclusive lock on `path` (released when it is closed or
    collected); False when another process (or Store) holds it; None where there is no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(path, "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return False
    return handle


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    opt = state["optimizer"]
    flat: dict[str, torch.Tensor] = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            flat[f"state.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"param_groups": opt["param_groups"], "steps": state["steps"]}
    return flat, meta


def _unflatten_optimizer(flat: dict[str, torch.Tensor], meta: dict) -> dict:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"optimizer": {"state": per_param, "param_groups": groups}, "steps": meta["steps"]}
