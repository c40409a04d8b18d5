"""Runs and checkpoints on disk, in PEFT format, addressed by `wb://` URIs.

Layout under the store root::

    runs/<run_id>/run.json                              owner tenant, base model, LoRA config
    runs/<run_id>/weights/<name>/                       a training state (save_state)
        adapter_model.safetensors  adapter_config.json  optimizer.safetensors
    runs/<run_id>/sampler_weights/<name>/               weights only (immutable)
        adapter_model.safetensors  adapter_config.json

URIs: ``wb://<run_id>/weights/<name>`` and ``wb://<run_id>/sampler_weights/<name>``.
Everything is data (safetensors + JSON): no pickle on disk either. Another tenant's runs and
checkpoints are reported as "not found", exactly like ones that do not exist.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from workbench.errors import InvalidRequestError, NotFoundError
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


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "runs").mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------------- runs

    def new_run(self, tenant: str, meta: dict[str, Any]) -> str:
        run_id = "run-" + secrets.token_hex(6)
        run_dir = self.root / "runs" / run_id
        run_dir.mkdir(parents=True)
        record = {**meta, "run_id": run_id, "tenant": tenant, "created": time.time()}
        (run_dir / "run.json").write_text(json.dumps(record, indent=2))
        return run_id

    def run_meta(self, run_id: str, tenant: str) -> dict[str, Any]:
        path = self.root / "runs" / run_id / "run.json"
        if not _NAME_RE.match(run_id) or not path.exists():
            raise NotFoundError(f"training run {run_id!r} not found")
        meta = json.loads(path.read_text())
        if meta.get("tenant") != tenant:
            raise NotFoundError(f"training run {run_id!r} not found")
        return meta

    def list_runs(self, tenant: str) -> list[dict[str, Any]]:
        runs = []
        for path in sorted((self.root / "runs").glob("*/run.json")):
            meta = json.loads(path.read_text())
            if meta.get("tenant") == tenant:
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
        final = self.root / "runs" / run_id / kind / name
        if kind == "sampler_weights" and final.exists():
            raise InvalidRequestError(f"sampler weights {name!r} exist already and are immutable", "name")
        # Write into a temporary sibling and rename, so a crash never leaves half a checkpoint.
        tmp = final.with_name(f".{name}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
        if optimizer_state is not None:
            flat, meta = _flatten_optimizer(optimizer_state)
            save_file(flat, str(tmp / "optimizer.safetensors"), metadata={"meta": json.dumps(meta)})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return f"{SCHEME}{run_id}/{kind}/{name}"

    def checkpoint_dir(self, uri: str, tenant: str) -> Path:
        run_id, kind, name = parse_checkpoint_path(uri)
        self.run_meta(run_id, tenant)
        path = self.root / "runs" / run_id / kind / name
        if not (path / "adapter_model.safetensors").exists():
            raise NotFoundError(f"checkpoint {uri!r} not found")
        return path

    def load_checkpoint(self, uri: str, tenant: str) -> tuple[dict, dict, Optional[dict]]:
        path = self.checkpoint_dir(uri, tenant)
        tensors = load_file(str(path / "adapter_model.safetensors"))
        peft_config = json.loads((path / "adapter_config.json").read_text())
        optimizer_state = None
        if (path / "optimizer.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
                meta = json.loads(f.metadata()["meta"])
                flat = {k: f.get_tensor(k) for k in f.keys()}
            optimizer_state = _unflatten_optimizer(flat, meta)
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
                    "size_bytes": sum(p.stat().st_size for p in path.iterdir()),
                })
        return out

    def delete_checkpoint(self, uri: str, tenant: str) -> None:
        """Remove a checkpoint (sampler weights too: immutable means never overwritten,
        not undeletable). Samplers already serving it keep their in-memory copy."""
        path = self.checkpoint_dir(uri, tenant)
        # Rename first, so a concurrent reader sees either the whole checkpoint or none.
        doomed = path.with_name(f".{path.name}.deleted-{secrets.token_hex(4)}")
        path.rename(doomed)
        shutil.rmtree(doomed)

    def checkpoint_files(self, uri: str, tenant: str) -> dict[str, bytes]:
        """The files of a checkpoint directory, by name (what download_checkpoint writes)."""
        path = self.checkpoint_dir(uri, tenant)
        return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


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
