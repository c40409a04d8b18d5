"""The live registry: which training runs and sampling sessions exist, who owns them, and
their adapters' lifecycle in the engine and the store (create, save, load). Engine thread only.

A run's id is its store run id and its engine adapter id; a sampler on a checkpoint holds an
adapter of its own under the sampler id. Another tenant's run or sampler reads as not found.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from workbench.errors import InvalidRequestError, NotFoundError

from .engine.engine import AdapterConfig, Engine, random_seed
from .engine.errors import EngineInputError
from .store import Store, parse_checkpoint_path


@dataclass
class Run:
    run_id: str
    tenant: str
    base_model: str
    config: AdapterConfig


@dataclass
class Sampler:
    sampler_id: str
    tenant: str
    base_model: str
    adapter_id: Optional[str]  # None = the base model alone
    model_path: Optional[str] = None  # the checkpoint its adapter is read from (None: base model)


class Runs:
    """`max_runs_per_tenant` bounds each tenant's memory: at most that many live training
    runs (unload_model frees one), and at most that many samplers on a checkpoint holding an
    adapter; beyond that the tenant's least recently used sampler lets its adapter go and
    reads it from its checkpoint again when it is next used."""

    def __init__(self, engine: Engine, store: Store, max_runs_per_tenant: int = 64):
        self.engine = engine
        self.store = store
        self.max_runs_per_tenant = max_runs_per_tenant
        self.runs: dict[str, Run] = {}
        self.samplers: dict[str, Sampler] = {}
        self._loaded_samplers: OrderedDict[str, None] = OrderedDict()  # holding an adapter, LRU first

    # ---------------------------------------------------------- owner checks

    def run(self, run_id: str, tenant: str) -> Run:
        run = self.runs.get(run_id)
        if run is None or run.tenant != tenant:
            raise NotFoundError(f"training run {run_id!r} not found", "model_id")
        return run

    def sampler(self, sampler_id: str, tenant: str) -> Sampler:
        """The tenant's sampler, its adapter loaded (read from its checkpoint again if it was
        let go to bound the tenant's memory)."""
        sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise NotFoundError(f"sampling session {sampler_id!r} not found", "sampler_id")
        if sampler.adapter_id is not None:
            if sampler.adapter_id not in self.engine.adapters:
                self._load_sampler_adapter(sampler)
            self._loaded_samplers.move_to_end(sampler_id)
        return sampler

    def unload_model(self, run: Run) -> dict:
        """Free a training run's adapter, gradients and optimizer state (its checkpoints stay
        in the store); later requests for it answer not found."""
        self.engine.remove_adapter(run.run_id)
        del self.runs[run.run_id]
        return {"model_id": run.run_id}

    def rewind(self, run: Run, steps: int) -> dict:
        """Undo a run's last `steps` optim_steps (weights, AdamW state, step count; gradients
        accumulated since are discarded); beyond what the engine kept, a clear refusal that
        changes nothing."""
        available = self.engine.rewindable(run.run_id)
        if not 1 <= steps <= available:
            raise InvalidRequestError(
                f"training run {run.run_id!r} cannot rewind {steps} optim_step{'s' * (steps != 1)}: "
                f"{available} can be undone (this server keeps the state before each of a run's last "
                f"{self.engine.rewind_depth} optim_steps, --rewind-depth; loading a checkpoint starts "
                "afresh); nothing was changed", "steps")
        return {"model_id": run.run_id, **self.engine.rewind(run.run_id, steps)}

    def _check_run_quota(self, tenant: str) -> None:
        live = sum(run.tenant == tenant for run in self.runs.values())
        if live >= self.max_runs_per_tenant:
            raise InvalidRequestError(
                f"tenant {tenant!r} has {live} live training runs, this server's limit "
                f"(--max-runs-per-tenant {self.max_runs_per_tenant}); unload_model one it no longer "
                "trains (its checkpoints stay)", "base_model")

    def _load_sampler_adapter(self, sampler: Sampler) -> None:
        meta, config = self.checkpoint_run(sampler.model_path, sampler.tenant)
        tensors, _, _ = self.store.load_checkpoint(sampler.model_path, sampler.tenant)
        with _checkpoint_errors(sampler.model_path):
            self.engine.import_adapter(sampler.sampler_id, meta["base_model"], config, tensors, trainable=False)
        self._loaded_samplers[sampler.sampler_id] = None

    def release_excess_samplers(self) -> None:
        """Let go of each tenant's least recently used checkpoint samplers beyond the limit
        (their records stay). Called between cycles: a sampler is never let go while a cycle
        that uses it runs."""
        loaded: dict[str, list[str]] = {}
        for sampler_id in self._loaded_samplers:  # LRU first
            loaded.setdefault(self.samplers[sampler_id].tenant, []).append(sampler_id)
        for mine in loaded.values():
            for sampler_id in mine[:max(0, len(mine) - self.max_runs_per_tenant)]:
                self.engine.remove_adapter(sampler_id)
                del self._loaded_samplers[sampler_id]

    def load_base(self, name: str):
        try:
            return self.engine.load_model(name)
        except ValueError as exc:
            raise NotFoundError(str(exc), "base_model") from None

    # ------------------------------------------------------------- creation

    def create_model(self, tenant: str, args: dict) -> dict:
        self._check_run_quota(tenant)
        if args.get("from_state"):
            return self._create_from_state(tenant, args["from_state"], bool(args.get("optimizer")))
        base_model = args["base_model"]
        self.load_base(base_model)
        seed = args.get("seed")
        config = AdapterConfig(
            rank=int(args.get("rank", 32)),
            alpha=float(args.get("alpha", 32.0)),
            seed=int(seed) if seed is not None else random_seed(),
            train_attn=bool(args.get("train_attn", True)),
            train_mlp=bool(args.get("train_mlp", True)),
            train_unembed=bool(args.get("train_unembed", True)),
        )
        if config.rank < 1:
            raise InvalidRequestError(f"rank must be >= 1, got {config.rank}", "rank")
        run_id = self._new_run(tenant, base_model, config, args.get("user_metadata"))
        self.engine.create_adapter(run_id, base_model, config)
        return self._created(run_id)

    def _create_from_state(self, tenant: str, uri: str, optimizer: bool) -> dict:
        """A new run from a checkpoint: the adapter is imported (and checked) under a
        temporary id first, so a checkpoint that cannot load leaves no run behind."""
        meta, config = self.checkpoint_run(uri, tenant)
        tensors, _, optimizer_state = self.store.load_checkpoint(uri, tenant)
        pending = "pending-" + secrets.token_hex(6)
        with _checkpoint_errors(uri):
            self.engine.import_adapter(pending, meta["base_model"], config, tensors, trainable=True,
                                       optimizer_state=optimizer_state if optimizer else None)
        try:
            run_id = self._new_run(tenant, meta["base_model"], config, meta.get("user_metadata"))
        except BaseException:
            self.engine.remove_adapter(pending)
            raise
        self.engine.rename_adapter(pending, run_id)
        return self._created(run_id)

    def _new_run(self, tenant, base_model, config, user_metadata) -> str:
        run_id = self.store.new_run(tenant, {
            "base_model": base_model, "lora": config.__dict__, "user_metadata": user_metadata,
        })
        self.runs[run_id] = Run(run_id, tenant, base_model, config)
        return run_id

    def _created(self, run_id: str) -> dict:
        run = self.runs[run_id]
        pairs = self.engine.adapter(run_id).pairs.values()
        return {"model_id": run_id, "base_model": run.base_model, "rank": run.config.rank,
                "arch": self.engine.bases[run.base_model].arch,
                "trainable_parameters": sum(p.lora_A.numel() + p.lora_B.numel() for p in pairs)}

    def create_sampler(self, tenant: str, args: dict) -> dict:
        sampler_id = "sampler-" + secrets.token_hex(6)
        if args.get("model_path"):
            uri = args["model_path"]
            meta, _ = self.checkpoint_run(uri, tenant)
            sampler = Sampler(sampler_id, tenant, meta["base_model"], sampler_id, model_path=uri)
            self._load_sampler_adapter(sampler)  # before it is listed: a bad checkpoint leaves nothing
            self.samplers[sampler_id] = sampler
            return {"sampler_id": sampler_id, "base_model": meta["base_model"]}
        base_model = args.get("base_model")
        if not base_model:
            raise InvalidRequestError("give model_path or base_model", "model_path")
        self.load_base(base_model)
        self.samplers[sampler_id] = Sampler(sampler_id, tenant, base_model, None)
        return {"sampler_id": sampler_id, "base_model": base_model}

    # ----------------------------------------------------------- checkpoints

    def save(self, run: Run, name: str, with_optimizer: bool) -> str:
        """Store a run's adapter as a checkpoint: a training state (weights + AdamW state,
        wb://<run>/weights/<name>) or, without the optimizer, sampler weights; its path."""
        tensors, peft_config = self.engine.export_adapter(run.run_id)
        if not with_optimizer:
            return self.store.save_checkpoint(run.tenant, run.run_id, "sampler_weights", name, tensors, peft_config)
        optimizer = self.engine.optimizer_state(run.run_id)
        return self.store.save_checkpoint(run.tenant, run.run_id, "weights", name, tensors, peft_config, optimizer)

    def checkpoint_run(self, uri: str, tenant: str) -> tuple[dict, AdapterConfig]:
        """The stored record of the run a checkpoint path belongs to (NotFound for another
        tenant's), and that run's LoRA config, which the checkpoint's tensors have."""
        meta = self.store.run_meta(parse_checkpoint_path(uri)[0], tenant)
        return meta, AdapterConfig(**meta["lora"])

    def load_state(self, run: Run, uri: str, with_optimizer: bool) -> dict:
        """Replace a run's weights (and AdamW state) by a checkpoint's, all or nothing: a
        checkpoint that is corrupt, non-finite or of other shapes leaves the run as it was."""
        meta, config = self.checkpoint_run(uri, run.tenant)
        if meta["base_model"] != run.base_model:
            raise InvalidRequestError(
                f"checkpoint is for base model {meta['base_model']!r}, this run uses {run.base_model!r}", "path")
        tensors, _, optimizer = self.store.load_checkpoint(uri, run.tenant)
        if config.rank != run.config.rank:
            raise InvalidRequestError(f"checkpoint has rank {config.rank}, this run has {run.config.rank}", "path")
        with _checkpoint_errors(uri):
            self.engine.replace_adapter(run.run_id, tensors, optimizer if with_optimizer else None)
        return {"path": uri}


@contextmanager
def _checkpoint_errors(uri: str):
    """The engine's refusal of a checkpoint's contents, naming the checkpoint."""
    try:
        yield
    except EngineInputError as exc:
        raise InvalidRequestError(f"checkpoint {uri} cannot be loaded: {exc.message}", "path") from None
