"""Executes cycle plans against the engine and the store (runs on the engine thread only).

A cycle runs its phases in order (`ops.Phase`). Admin and checkpoint ops run one request at
a time through `handlers` (one per op of the op table); the train, optim and sample phases
run every request of the cycle together (`batched`): packed passes, one multi-tensor AdamW,
one batched generation. Every request's result or error goes back through its `Work.done`
callback; one request's failure never touches the others in its cycle. Which runs and
samplers exist is `runs.Runs`' business, store listings `listings.Listings`'.
"""

from __future__ import annotations

import queue
import secrets
from typing import Any, Callable, Optional

import numpy as np

from workbench import wire

from .engine.engine import Engine, EngineDatum, ForwardItem, random_seed
from .engine.sampler import SampleRequest, sample_request_from_args
from .listings import Listings
from .ops import Phase
from .runs import Run, Runs, Sampler
from .scheduler import CyclePlan, Work, as_error, finish
from .store import Store, check_name


class CycleRunner:
    def __init__(self, engine: Engine, store: Store, max_runs_per_tenant: int = 64):
        self.engine = engine
        self.store = store
        self.registry = Runs(engine, store, max_runs_per_tenant)
        self.listings = Listings(store)
        # Park requests from the session book (frontend threads), applied on this thread at
        # the start of the next cycle: only this thread touches the engine.
        self._to_park: "queue.Queue[list[str]]" = queue.Queue()
        listing = lambda method: lambda work: method(work.tenant, work.args)  # noqa: E731
        self.handlers: dict[str, Callable[[Work], Any]] = {
            "get_tokenizer": self._get_tokenizer,
            "create_model": lambda work: self.registry.create_model(work.tenant, work.args),
            "create_sampling_session": lambda work: self.registry.create_sampler(work.tenant, work.args),
            "list_training_runs": listing(self.listings.list_training_runs),
            "get_training_run": listing(self.listings.get_training_run),
            "list_checkpoints": listing(self.listings.list_checkpoints),
            "list_user_checkpoints": listing(self.listings.list_user_checkpoints),
            "delete_checkpoint": listing(self.listings.delete_checkpoint),
            "get_checkpoint_files": listing(self.listings.get_checkpoint_files),
            "save_state": self._save,
            "save_weights_for_sampler": self._save,
            "load_state": self._load_state,
            "unload_model": lambda work: self.registry.unload_model(
                self.registry.run(work.args["model_id"], work.tenant)),
            "rewind": lambda work: self.registry.rewind(
                self.registry.run(work.args["model_id"], work.tenant), work.args["steps"]),
        }
        # Phases whose requests run together; each returns the engine tokens it processed.
        self.batched: dict[Phase, Callable[[list[Work]], int]] = {
            Phase.TRAIN: self._train, Phase.OPTIM: self._optim_steps, Phase.SAMPLE: self._sample,
        }

    @property
    def runs(self) -> dict[str, Run]:
        return self.registry.runs

    @property
    def samplers(self) -> dict[str, Sampler]:
        return self.registry.samplers

    def save(self, run: Run, name: str, with_optimizer: bool) -> str:
        return self.registry.save(run, name, with_optimizer)

    def park(self, adapter_ids: list[str]) -> None:
        """Evict these adapters (training runs, samplers on a checkpoint) from the accelerator
        at the start of the next cycle; thread-safe. Unparking needs nothing: the engine
        brings a parked adapter back by itself on its next use."""
        self._to_park.put(adapter_ids)

    def apply_parking(self) -> None:
        while True:
            try:
                adapter_ids = self._to_park.get_nowait()
            except queue.Empty:
                return
            for adapter_id in adapter_ids:
                if adapter_id in self.engine.adapters:  # removed since (a reload replaces it)
                    self.engine.park(adapter_id)

    # -------------------------------------------------------------- a cycle

    def execute(self, plan: CyclePlan) -> dict:
        self.apply_parking()
        counts: dict[str, int] = {}
        for work in plan.works():
            counts[work.op] = counts.get(work.op, 0) + 1
        tokens = 0
        for phase in Phase:
            works = plan.by_phase.get(phase, [])
            if phase in self.batched:
                tokens += self.batched[phase](works) if works else 0
                continue
            for work in works:
                self._guarded(work, self.handlers[work.op])
        self.registry.release_excess_samplers()
        runs = {w.queue for w in plan.works() if w.queue in self.runs}
        return {"runs": len(runs), "requests": counts, "tokens": tokens}

    def _guarded(self, work: Work, fn) -> None:
        try:
            result = fn(work)
        except Exception as exc:
            finish(work, error=as_error(exc))
        else:
            finish(work, result)

    def _get_tokenizer(self, work: Work) -> dict:
        self.registry.load_base(work.args["base_model"])
        return {"files": self.engine.tokenizer_files(work.args["base_model"])}

    # ---------------------------------------------------------------- train

    def _train(self, works: list[Work]) -> int:
        items, owners = [], []
        for work in works:
            try:
                self.registry.run(work.args["model_id"], work.tenant)
                data = []
                for i, d in enumerate(work.args["data"]):
                    tokens, inputs = wire.datum_arrays(d, f"data[{i}]")
                    data.append(EngineDatum(tokens, inputs))
                items.append(ForwardItem(
                    adapter_id=work.args["model_id"],
                    data=data,
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
                finish(work, wire.forward_output_to_wire(
                    "target_logprobs", ({"logprobs": lp} for lp in result.logprobs), result.metrics))
        return tokens

    def _optim_steps(self, works: list[Work]) -> int:
        """Every run's optim_step of the cycle in one engine call (shared multi-tensor AdamW)."""
        steps = []
        for work in works:
            try:
                self.registry.run(work.args["model_id"], work.tenant)
                steps.append(work)
            except Exception as exc:
                finish(work, error=as_error(exc))
        if not steps:
            return 0
        try:
            results = self.engine.optim_steps([(w.args["model_id"], w.args["adam_params"]) for w in steps])
        except Exception as exc:
            for work in steps:
                finish(work, error=as_error(exc))
            return 0
        for work, result in zip(steps, results):
            if isinstance(result, Exception):
                finish(work, error=as_error(result))
            else:
                finish(work, {"metrics": result})
        return 0

    # --------------------------------------------------------------- sample

    def _sample(self, works: list[Work]) -> int:
        """Every sample request of a base in one batched generation, then every prompt to
        score (compute_logprobs, and sample's include_prompt_logprobs) of that base in one
        packed pass, whatever their adapters."""
        tokens = 0
        by_base: dict[str, list[tuple[Work, Sampler]]] = {}
        for work in works:
            try:
                sampler = self.registry.sampler(work.args["sampler_id"], work.tenant)
            except Exception as exc:
                finish(work, error=as_error(exc))
                continue
            by_base.setdefault(sampler.base_model, []).append((work, sampler))
        for base_name, group in by_base.items():
            samples = [(w, s) for w, s in group if w.op == "sample"]
            scored = [(w, s, None) for w, s in group if w.op == "compute_logprobs"]
            for work, sampler, outs in self._generate(base_name, samples):
                tokens += sum(len(o.tokens) for o in outs)
                result = wire.sample_response_to_wire(
                    [wire.sequence_to_wire(o.tokens, o.logprobs, o.stop_reason) for o in outs], None)
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
        """The engine's SampleRequest of a sample op, checked (sample_request_from_args)."""
        slot = self.engine.adapters[sampler.adapter_id].slot if sampler.adapter_id else None
        return sample_request_from_args(work.args, base, slot, random_seed)

    # ----------------------------------------------------------- checkpoints

    def _save(self, work: Work) -> dict:
        run = self.registry.run(work.args["model_id"], work.tenant)
        name = check_name(work.args.get("name") or f"step-{secrets.token_hex(3)}")
        return {"path": self.registry.save(run, name, with_optimizer=work.op == "save_state")}

    def _load_state(self, work: Work) -> dict:
        run = self.registry.run(work.args["model_id"], work.tenant)
        return self.registry.load_state(run, work.args["path"], bool(work.args.get("optimizer")))
