"""Executes cycle plans against the engine and the store (runs on the engine thread only).

Holds the server's live state: which runs and samplers exist, who owns them, and which
engine adapter each maps to. Every request's result or error goes back through its
`Work.done` callback; one request's failure never touches the others in its cycle.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from workbench.errors import InvalidRequestError, NotFoundError

from .engine.engine import AdapterConfig, Engine, EngineDatum, ForwardItem, random_seed
from .engine.sampler import SampleRequest
from .scheduler import CyclePlan, Work, as_error, finish
from .store import Store, check_name, parse_checkpoint_path


REST_OPS = ("list_training_runs", "get_training_run", "list_checkpoints",
            "list_user_checkpoints", "delete_checkpoint", "get_checkpoint_files")


def _page(args: dict) -> tuple[int, int]:
    limit, offset = args.get("limit", 20), args.get("offset", 0)
    if not isinstance(limit, int) or limit < 1:
        raise InvalidRequestError(f"limit must be a positive integer, got {limit!r}", "limit")
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequestError(f"offset must be a non-negative integer, got {offset!r}", "offset")
    return limit, offset


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


class CycleRunner:
    def __init__(self, engine: Engine, store: Store):
        self.engine = engine
        self.store = store
        self.runs: dict[str, Run] = {}
        self.samplers: dict[str, Sampler] = {}

    # ---------------------------------------------------------- owner checks

    def run(self, run_id: str, tenant: str) -> Run:
        run = self.runs.get(run_id)
        if run is None or run.tenant != tenant:
            raise NotFoundError(f"training run {run_id!r} not found", "model_id")
        return run

    def sampler(self, sampler_id: str, tenant: str) -> Sampler:
        sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise NotFoundError(f"sampling session {sampler_id!r} not found", "sampler_id")
        return sampler

    # -------------------------------------------------------------- a cycle

    def execute(self, plan: CyclePlan) -> dict:
        phases = plan.by_phase
        counts: dict[str, int] = {}
        for work in plan.works():
            counts[work.op] = counts.get(work.op, 0) + 1
        for work in phases.get(0, []):
            self._guarded(work, self._admin)
        tokens = self._train(phases.get(1, []))
        self._optim_steps(phases.get(3, []))
        tokens += self._sample(phases.get(4, []))
        for work in phases.get(5, []):
            self._guarded(work, self._checkpoint)
        runs = {w.queue for w in plan.works() if w.queue in self.runs}
        return {"runs": len(runs), "requests": counts, "tokens": tokens}

    def _guarded(self, work: Work, fn) -> None:
        try:
            result = fn(work)
        except Exception as exc:
            finish(work, error=as_error(exc))
        else:
            finish(work, result)

    # ---------------------------------------------------------------- admin

    def _admin(self, work: Work) -> Any:
        args = work.args
        if work.op == "get_tokenizer":
            self._load_base(args["base_model"])
            return {"files": self.engine.tokenizer_files(args["base_model"])}
        if work.op == "create_model":
            return self._create_model(work.tenant, args)
        if work.op == "create_sampling_session":
            return self._create_sampler(work.tenant, args)
        if work.op in REST_OPS:
            return self._rest(work.tenant, work.op, args)
        raise InvalidRequestError(f"unknown admin op {work.op!r}")

    def _create_model(self, tenant: str, args: dict) -> dict:
        if args.get("from_state"):
            return self._create_from_state(tenant, args["from_state"], bool(args.get("optimizer")))
        base_model = args["base_model"]
        self._load_base(base_model)
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
        meta, config = self._checkpoint_run(uri, tenant)
        tensors, _, optimizer_state = self.store.load_checkpoint(uri, tenant)
        run_id = self._new_run(tenant, meta["base_model"], config, meta.get("user_metadata"))
        self.engine.import_adapter(run_id, meta["base_model"], config, tensors, trainable=True,
                                   optimizer_state=optimizer_state if optimizer else None)
        return self._created(run_id)

    def _new_run(self, tenant, base_model, config, user_metadata) -> str:
        run_id = self.store.new_run(tenant, {
            "base_model": base_model, "lora": config.__dict__, "user_metadata": user_metadata,
        })
        self.runs[run_id] = Run(run_id, tenant, base_model, config)
        return run_id

    def _created(self, run_id: str) -> dict:
        run = self.runs[run_id]
        return {"model_id": run_id, "base_model": run.base_model, "rank": run.config.rank,
                "arch": self.engine.bases[run.base_model].arch}

    def _load_base(self, name: str):
        try:
            return self.engine.load_model(name)
        except ValueError as exc:
            raise NotFoundError(str(exc), "base_model") from None

    def _create_sampler(self, tenant: str, args: dict) -> dict:
        sampler_id = "sampler-" + secrets.token_hex(6)
        if args.get("model_path"):
            uri = args["model_path"]
            meta, config = self._checkpoint_run(uri, tenant)
            tensors, _, _ = self.store.load_checkpoint(uri, tenant)
            self.engine.import_adapter(sampler_id, meta["base_model"], config, tensors, trainable=False)
            self.samplers[sampler_id] = Sampler(sampler_id, tenant, meta["base_model"], sampler_id)
            return {"sampler_id": sampler_id, "base_model": meta["base_model"]}
        base_model = args.get("base_model")
        if not base_model:
            raise InvalidRequestError("give model_path or base_model", "model_path")
        self._load_base(base_model)
        self.samplers[sampler_id] = Sampler(sampler_id, tenant, base_model, None)
        return {"sampler_id": sampler_id, "base_model": base_model}

    # ------------------------------------------------ runs and checkpoints (RestClient)

    def _rest(self, tenant: str, op: str, args: dict) -> dict:
        """Listing, deleting and downloading, straight from the store: runs survive restarts,
        and another tenant's runs and paths read as not found."""
        if op == "get_checkpoint_files":
            return {"files": self.store.checkpoint_files(args["path"], tenant)}
        if op == "delete_checkpoint":
            self.store.delete_checkpoint(args["path"], tenant)
            return {}
        if op == "list_checkpoints":
            return {"checkpoints": self.store.list_checkpoints(args["run_id"], tenant), "cursor": None}
        if op == "get_training_run":
            return self._run_record(self.store.run_meta(args["run_id"], tenant))
        limit, offset = _page(args)
        if op == "list_training_runs":
            runs = sorted(self.store.list_runs(tenant), key=lambda m: m.get("created", 0), reverse=True)
            return {"training_runs": [self._run_record(m) for m in runs[offset:offset + limit]],
                    "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}
        # list_user_checkpoints: every run's checkpoints, newest first
        checkpoints = [c for m in self.store.list_runs(tenant)
                       for c in self.store.list_checkpoints(m["run_id"], tenant)]
        checkpoints.sort(key=lambda c: c["time"], reverse=True)
        return {"checkpoints": checkpoints[offset:offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(checkpoints)}}

    def _run_record(self, meta: dict) -> dict:
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

    # ---------------------------------------------------------------- train

    def _train(self, works: list[Work]) -> int:
        items, owners = [], []
        for work in works:
            try:
                self.run(work.args["model_id"], work.tenant)
                items.append(ForwardItem(
                    adapter_id=work.args["model_id"],
                    data=[
                        EngineDatum(np.asarray(d["tokens"]), {k: np.asarray(v) for k, v in d["loss_fn_inputs"].items()})
                        for d in work.args["data"]
                    ],
                    loss_fn=work.args.get("loss_fn", "cross_entropy"),
                    loss_fn_config=dict(work.args.get("loss_fn_config") or {}),
                ))
                owners.append(work)
            except Exception as exc:
                finish(work, error=as_error(exc))
        if not items:
            return 0
        # forward and forward_backward items share passes only within their own kind.
        tokens = 0
        for backward in (True, False):
            chosen = [(w, it) for w, it in zip(owners, items) if (w.op == "forward_backward") == backward]
            if not chosen:
                continue
            try:
                results = self.engine.forward([it for _, it in chosen], backward=backward)
            except Exception as exc:
                for w, _ in chosen:
                    finish(w, error=as_error(exc))
                continue
            for (work, item), result in zip(chosen, results):
                if isinstance(result, Exception):
                    finish(work, error=as_error(result))
                    continue
                tokens += sum(len(d.tokens) for d in item.data)
                finish(work, {
                    "loss_fn_output_type": "target_logprobs",
                    "loss_fn_outputs": [{"logprobs": lp} for lp in result.logprobs],
                    "metrics": result.metrics,
                })
        return tokens

    def _optim_steps(self, works: list[Work]) -> None:
        """Every run's optim_step of the cycle in one engine call (shared multi-tensor AdamW)."""
        steps = []
        for work in works:
            try:
                self.run(work.args["model_id"], work.tenant)
                steps.append(work)
            except Exception as exc:
                finish(work, error=as_error(exc))
        if not steps:
            return
        try:
            results = self.engine.optim_steps([(w.args["model_id"], w.args["adam_params"]) for w in steps])
        except Exception as exc:
            for work in steps:
                finish(work, error=as_error(exc))
            return
        for work, result in zip(steps, results):
            if isinstance(result, Exception):
                finish(work, error=as_error(result))
            else:
                finish(work, {"metrics": result})

    # --------------------------------------------------------------- sample

    def _sample(self, works: list[Work]) -> int:
        """Every sample request of a base in one batched generation, then every prompt to
        score (compute_logprobs, and sample's include_prompt_logprobs) of that base in one
        packed pass, whatever their adapters."""
        tokens = 0
        by_base: dict[str, list[tuple[Work, Sampler]]] = {}
        for work in works:
            try:
                sampler = self.sampler(work.args["sampler_id"], work.tenant)
            except Exception as exc:
                finish(work, error=as_error(exc))
                continue
            by_base.setdefault(sampler.base_model, []).append((work, sampler))
        for base_name, group in by_base.items():
            samples = [(w, s) for w, s in group if w.op == "sample"]
            scored = [(w, s, None) for w, s in group if w.op == "compute_logprobs"]
            for work, sampler, outs in self._generate(base_name, samples):
                tokens += sum(len(o.tokens) for o in outs)
                result = {
                    "sequences": [
                        {"tokens": np.asarray(o.tokens, dtype=np.int32),
                         "logprobs": np.asarray(o.logprobs, dtype=np.float32),
                         "stop_reason": o.stop_reason}
                        for o in outs
                    ],
                    "prompt_logprobs": None,
                }
                if work.args.get("include_prompt_logprobs"):
                    scored.append((work, sampler, result))
                else:
                    finish(work, result)
            self._score_prompts(base_name, scored)
        return tokens

    def _generate(self, base_name: str, group: list[tuple[Work, Sampler]]):
        """(work, sampler, samples) of each request that generated; the others are finished
        with their error here."""
        if not group:
            return []
        requests, owners = [], []
        base = self.engine.load_model(base_name)
        for work, sampler in group:
            try:
                requests.append(self._sample_request(work, sampler, base))
                owners.append((work, sampler))
            except Exception as exc:
                finish(work, error=as_error(exc))
        if not requests:
            return []
        try:
            outputs = self.engine.sample(base_name, requests)
        except Exception as exc:
            for work, _ in owners:
                finish(work, error=as_error(exc))
            return []
        return [(work, sampler, outs) for (work, sampler), outs in zip(owners, outputs)]

    def _score_prompts(self, base_name: str, scored: list[tuple[Work, "Sampler", Optional[dict]]]) -> None:
        """Prompt logprobs of compute_logprobs requests (result None) and of samples that
        asked for them (their result dict gets `prompt_logprobs`), in one engine call; a
        rejected prompt fails its own request only."""
        if not scored:
            return
        try:
            outs = self.engine.prompt_logprobs(
                base_name, [(sampler.adapter_id, np.asarray(work.args["prompt"])) for work, sampler, _ in scored])
        except Exception as exc:  # the pass itself failed: nobody has a result
            for work, _, _ in scored:
                finish(work, error=as_error(exc))
            return
        for (work, _, result), out in zip(scored, outs):
            if isinstance(out, Exception):
                finish(work, error=as_error(out))
            elif result is None:
                finish(work, {"logprobs": out})
            else:
                finish(work, {**result, "prompt_logprobs": out})

    def _sample_request(self, work: Work, sampler: Sampler, base) -> SampleRequest:
        args = work.args
        prompt = np.asarray(args["prompt"]).astype(np.int64).tolist()
        params = args.get("sampling_params") or {}
        if not prompt:
            raise InvalidRequestError("prompt is empty", "prompt")
        if min(prompt) < 0 or max(prompt) >= base.vocab_size:
            raise InvalidRequestError(f"prompt token outside the vocabulary [0, {base.vocab_size})", "prompt")
        num_samples = int(args.get("num_samples", 1))
        if num_samples < 1:
            raise InvalidRequestError(f"num_samples must be >= 1, got {num_samples}", "num_samples")
        room = base.max_length - len(prompt)
        if room < 1:
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens leaves no room in the context of {base.max_length}", "prompt")
        max_tokens = params.get("max_tokens")
        max_tokens = room if max_tokens is None else int(max_tokens)
        if max_tokens < 1 or max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens must be in [1, {room}] for this prompt, got {max_tokens}",
                "sampling_params.max_tokens")
        stop = params.get("stop")
        stop_ids, stop_strings = list(base.eos_token_ids), []
        if isinstance(stop, str):
            stop_strings = [stop]
        elif isinstance(stop, list) and stop:
            if all(isinstance(s, str) for s in stop):
                stop_strings = list(stop)
            elif all(isinstance(s, int) for s in stop):
                stop_ids = [int(s) for s in stop]
            else:
                raise InvalidRequestError("stop must be a string, a list of strings or a list of token ids",
                                          "sampling_params.stop")
        top_p = float(params.get("top_p", 1.0))
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}", "sampling_params.top_p")
        temperature = float(params.get("temperature", 1.0))
        if temperature < 0:
            raise InvalidRequestError("temperature must be >= 0", "sampling_params.temperature")
        seed = params.get("seed")
        return SampleRequest(
            slot=self.engine.adapters[sampler.adapter_id].slot if sampler.adapter_id else None,
            prompt=prompt, num_samples=num_samples, max_tokens=max_tokens,
            temperature=temperature, top_k=int(params.get("top_k", -1)), top_p=top_p,
            seed=int(seed) if seed is not None else random_seed(),
            stop_token_ids=stop_ids, stop_strings=stop_strings,
        )

    # ----------------------------------------------------------- checkpoints

    def _checkpoint(self, work: Work) -> dict:
        run = self.run(work.args["model_id"], work.tenant)
        if work.op == "load_state":
            return self._load_state(run, work)
        name = check_name(work.args.get("name") or f"step-{secrets.token_hex(3)}")
        return {"path": self.save(run, name, with_optimizer=work.op == "save_state")}

    def save(self, run: Run, name: str, with_optimizer: bool) -> str:
        """Store a run's adapter as a checkpoint: a training state (weights + AdamW state,
        wb://<run>/weights/<name>) or, without the optimizer, sampler weights; its path."""
        tensors, peft_config = self.engine.export_adapter(run.run_id)
        if not with_optimizer:
            return self.store.save_checkpoint(run.tenant, run.run_id, "sampler_weights", name, tensors, peft_config)
        optimizer = self.engine.optimizer_state(run.run_id)
        return self.store.save_checkpoint(run.tenant, run.run_id, "weights", name, tensors, peft_config, optimizer)

    def _checkpoint_run(self, uri: str, tenant: str) -> tuple[dict, AdapterConfig]:
        """The stored record of the run a checkpoint path belongs to (NotFound for another
        tenant's), and that run's LoRA config, which the checkpoint's tensors have."""
        meta = self.store.run_meta(parse_checkpoint_path(uri)[0], tenant)
        return meta, AdapterConfig(**meta["lora"])

    def _load_state(self, run: Run, work: Work) -> dict:
        uri = work.args["path"]
        meta, config = self._checkpoint_run(uri, work.tenant)
        if meta["base_model"] != run.base_model:
            raise InvalidRequestError(
                f"checkpoint is for base model {meta['base_model']!r}, this run uses {run.base_model!r}", "path")
        tensors, _, optimizer = self.store.load_checkpoint(uri, work.tenant)
        if config.rank != run.config.rank:
            raise InvalidRequestError(f"checkpoint has rank {config.rank}, this run has {run.config.rank}", "path")
        self.engine.remove_adapter(run.run_id)
        self.engine.import_adapter(
            run.run_id, run.base_model, run.config, tensors, trainable=True,
            optimizer_state=optimizer if work.args.get("optimizer") else None,
        )
        return {"path": uri}
