"""The multi-LoRA engine: adapters on frozen base models, packed passes, AdamW, sampling.

Plain torch + transformers; no sockets, no threads, no request ids. The scheduler hands the
engine plain data (token arrays, loss inputs, adapter ids) and gets plain data back (numpy
arrays, floats). Entry points are functions of (plan, tensors) so the same engine can later
run under torch.distributed.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from workbench.losses import LOSS_INPUTS, full_config, loss_request_problem

from . import losses as L
from .lora import LoRAPair, LoRARouting, init_lora_pair, resolve_lora_impl
from .models import BaseModel, load_base_model, resolve_device, tokenizer_files
from .optim import AdapterOptimizer, step_adapters
from .errors import EngineInputError
from .attention import FLEX_BLOCK, attention_implementation, flex_document_mask, resolve_attention, sdpa_document_mask
from .packing import MicroBatch, PackedSequence, PassSequence, build_micro_batch, plan_micro_batches
from .sampler import SampleOutput, SampleRequest, generate, sample_request_problem


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 32
    alpha: float = 32.0  # PEFT scaling = alpha / rank
    seed: int = 0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    def groups(self) -> set[str]:
        chosen = {"attn": self.train_attn, "mlp": self.train_mlp, "unembed": self.train_unembed}
        return {g for g, on in chosen.items() if on}


@dataclass
class Adapter:
    adapter_id: str
    base: str
    config: AdapterConfig
    slot: int
    pairs: dict[str, LoRAPair]  # module path -> weights
    trainable: bool
    optimizer: Optional[AdapterOptimizer] = None

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.pairs.values() for t in (pair.lora_A, pair.lora_B)]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of its state by a stable name: weights `w<i>`, gradients `g<i>`, AdamW
        state `s<i>.<key>` (i = index in `parameters()`), and the host tensors of its rewind
        snapshots `r<k>.<name>` (k = index in the history)."""
        out: dict[str, torch.Tensor] = {}
        state = self.optimizer.optimizer.state if self.optimizer is not None else {}
        for i, t in enumerate(self.parameters()):
            out[f"w{i}"] = t
            if t.grad is not None:
                out[f"g{i}"] = t.grad
            for key, value in state.get(t, {}).items():
                if torch.is_tensor(value):
                    out[f"s{i}.{key}"] = value
        for k, snap in enumerate(self.optimizer.history if self.optimizer is not None else ()):
            out.update((f"r{k}.{name}", t) for name, t in snap.tensors.items())
        return out

    def move_to(self, device: torch.device) -> None:
        """Move weights, gradients and AdamW moments, keeping every tensor's identity.

        Assigning `.data` keeps the Parameter objects that the layers, the optimizer's param
        group and its state dict refer to, so nothing has to be re-registered.
        """
        for t in self.parameters():
            t.data = t.data.to(device)
            if t.grad is not None:
                t.grad.data = t.grad.data.to(device)
        if self.optimizer is not None:
            for state in self.optimizer.optimizer.state.values():
                for key, value in state.items():
                    # AdamW keeps its non-capturable `step` on the CPU; leave it there.
                    if torch.is_tensor(value) and key != "step":
                        state[key] = value.to(device)


@dataclass
class EngineDatum:
    tokens: np.ndarray  # int [N]
    inputs: dict[str, np.ndarray]  # loss_fn_inputs, each [N]


@dataclass
class ForwardItem:
    """One forward / forward_backward request: an adapter, its data and its loss."""

    adapter_id: Optional[str]
    data: list[EngineDatum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict = field(default_factory=dict)


@dataclass
class ForwardResult:
    logprobs: list[np.ndarray]  # per datum, float32 [N]
    metrics: dict[str, float]


class Engine:
    def __init__(
        self,
        device: str = "auto",
        token_budget: int = 4096,
        logprob_chunk: int = 1024,
        lora_impl: str = "auto",
        max_resident_adapters: Optional[int] = None,
        offload_device: str = "cpu",
        attention: str = "auto",
        row_length: Optional[int] = None,
        max_decode_rows: int = 1024,
        max_host_adapters: Optional[int] = None,
        spill_dir: Optional[str] = None,
        rewind_depth: int = 0,
    ):
        """`lora_impl`: "grouped" (all adapters in one grouped matmul per factor), "loop" (one
        matmul pair per adapter span) or "auto" (chosen per pass: grouped on CUDA; on a CPU
        the loop for training passes, grouped without gradients; see lora.MultiLoRALinear).
        Same results.

        `max_resident_adapters`: beyond this many adapters on the device, the least recently
        used ones (weights, gradients, AdamW state) move to `offload_device` until next used.
        None = no limit. A single pass that needs more adapters keeps them all resident.

        `attention`: how packed rows keep sequences apart: "sdpa_mask" (explicit [R,1,L,L]
        mask), "flex" (FlexAttention with a document BlockMask; forward-only on CPU) or
        "auto" (flex on CUDA, sdpa_mask on CPU). Same results.

        `row_length`: packed rows are max(row_length, longest sequence) tokens long; several
        short sequences share a row (first-fit-decreasing). None = the longest sequence.
        `token_budget` counts row tokens (rows * row length, padding included).

        `max_decode_rows`: sampling decodes at most this many rows (samples) at once; a
        single request with more samples is decoded alone.

        `max_host_adapters`: beyond this many adapters parked on the offload device, the
        least recently parked ones spill to files in `spill_dir` (weights, gradients, AdamW
        state; safetensors) and free their memory until next used. None = no limit.

        `rewind_depth`: each trainable adapter keeps host copies of its state before each of
        its last this many optim_steps, for `rewind` (optim.Snapshot: 12 bytes per LoRA
        parameter each). Parking leaves them in host memory; spilling writes them to the
        adapter's spill file with the rest of its state; a new state (load) starts none.
        """
        if max_host_adapters is not None and (max_host_adapters < 0 or spill_dir is None):
            raise ValueError("max_host_adapters needs a spill_dir and must be >= 0")
        if rewind_depth < 0:
            raise ValueError(f"rewind_depth must be >= 0, got {rewind_depth}")
        if max_resident_adapters is not None and max_resident_adapters < 1:
            raise ValueError(f"max_resident_adapters must be >= 1 or None, got {max_resident_adapters}")
        self.device = resolve_device(device)
        self.token_budget = token_budget
        self.logprob_chunk = logprob_chunk
        self.lora_impl = resolve_lora_impl(lora_impl)
        self.attention = resolve_attention(attention, self.device)
        self.row_length = row_length
        self.max_decode_rows = max_decode_rows
        self.rewind_depth = rewind_depth
        self.max_host_adapters = max_host_adapters
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._parked: OrderedDict[str, None] = OrderedDict()  # on the offload device, oldest first
        self._spilled: dict[str, Path] = {}  # adapter id -> the file holding its state
        self.spill_count = 0  # adapters written to spill files
        self.bases: dict[str, BaseModel] = {}
        self.adapters: dict[str, Adapter] = {}
        self._next_slot = 0
        self._slot_owner: dict[int, str] = {}
        self.max_resident_adapters = max_resident_adapters
        self.offload_device = torch.device(offload_device)
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident adapters, oldest first
        self.offload_count = 0  # adapters moved to the offload device
        self.restore_count = 0  # adapters brought back on use

    # ------------------------------------------------------------------ models

    def load_model(self, name: str) -> BaseModel:
        if name not in self.bases:
            self.bases[name] = load_base_model(name, self.device)
            self.set_lora_impl(self.lora_impl)
        return self.bases[name]

    def register_model(self, base: BaseModel) -> BaseModel:
        """Add an already wrapped model (see models.wrap_base_model) under base.name."""
        if base.name in self.bases:
            raise ValueError(f"a model named {base.name!r} is loaded already")
        self.bases[base.name] = base
        self.set_lora_impl(self.lora_impl)
        return base

    def set_lora_impl(self, impl: str) -> None:
        """Switch every loaded model's LoRA math ("auto", "loop" or "grouped")."""
        self.lora_impl = resolve_lora_impl(impl)
        for base in self.bases.values():
            for layer in base.lora_layers.values():
                layer.impl = self.lora_impl

    def tokenizer_files(self, name: str) -> dict[str, bytes]:
        return tokenizer_files(self.load_model(name).tokenizer)

    # ---------------------------------------------------------------- adapters

    def create_adapter(self, adapter_id: str, base_name: str, config: AdapterConfig) -> Adapter:
        if adapter_id in self.adapters:
            raise EngineInputError(f"adapter {adapter_id!r} exists already")
        if config.rank < 1:
            raise EngineInputError(f"rank must be >= 1, got {config.rank}", "rank")
        if not config.groups():
            raise EngineInputError("at least one of train_attn, train_mlp, train_unembed must be on")
        base = self.load_model(base_name)
        generator = torch.Generator().manual_seed(int(config.seed))
        pairs = {}
        for name, layer in base.lora_layers.items():  # module order: deterministic draws
            if layer.group in config.groups():
                pairs[name] = init_lora_pair(
                    layer.in_features, layer.out_features, config.rank, config.alpha,
                    generator, self.device,
                )
        return self._register(adapter_id, base_name, config, pairs, trainable=True)

    def _register(self, adapter_id, base_name, config, pairs, trainable) -> Adapter:
        base = self.bases[base_name]
        slot = self._next_slot
        self._next_slot += 1
        adapter = Adapter(adapter_id, base_name, config, slot, pairs, trainable)
        if trainable:
            adapter.optimizer = AdapterOptimizer(adapter.parameters(), self.rewind_depth)
        for name, pair in pairs.items():
            base.lora_layers[name].add_adapter(slot, pair)
        self.adapters[adapter_id] = adapter
        self._slot_owner[slot] = adapter_id
        self._lru[adapter_id] = None
        self._enforce_resident_limit(keep={adapter_id})
        return adapter

    def remove_adapter(self, adapter_id: str) -> None:
        adapter = self.adapters.pop(adapter_id)
        self._slot_owner.pop(adapter.slot, None)
        self._lru.pop(adapter_id, None)
        self._parked.pop(adapter_id, None)
        spilled = self._spilled.pop(adapter_id, None)
        if spilled is not None:
            spilled.unlink(missing_ok=True)
        for name in adapter.pairs:
            self.bases[adapter.base].lora_layers[name].remove_adapter(adapter.slot)

    # ----------------------------------------------------------------- offload

    def resident_adapters(self) -> list[str]:
        """Adapters on the compute device, least recently used first."""
        return list(self._lru)

    def park(self, adapter_id: str) -> None:
        """Move an adapter (weights, grads, AdamW state) to the offload device now."""
        adapter = self.adapter(adapter_id)
        if adapter_id in self._lru:  # resident: the LRU order holds exactly the resident ones
            adapter.move_to(self.offload_device)
            del self._lru[adapter_id]
            self._parked[adapter_id] = None
            self.offload_count += 1
            self._enforce_host_limit()

    def _enforce_host_limit(self) -> None:
        while self.max_host_adapters is not None and len(self._parked) > self.max_host_adapters:
            self._spill(next(iter(self._parked)))  # the least recently parked

    def _spill(self, adapter_id: str) -> None:
        """Write a parked adapter's whole state to its spill file, then free its memory (every
        tensor keeps its identity, emptied, so nothing has to be re-registered)."""
        from safetensors.torch import save_file

        tensors = self.adapters[adapter_id].state_tensors()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{adapter_id}.safetensors"
        partial = path.with_name(f".{path.name}.tmp")
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(partial))
        os.replace(partial, path)
        for t in tensors.values():
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        del self._parked[adapter_id]
        self._spilled[adapter_id] = path
        self.spill_count += 1

    def _unspill(self, adapter_id: str) -> None:
        """Read a spilled adapter's state back, onto the compute device (AdamW's `step`
        counters stay on the host, as torch keeps them, and so do rewind snapshots)."""
        from safetensors.torch import load_file

        path = self._spilled.pop(adapter_id)
        saved = load_file(str(path))
        for name, t in self.adapters[adapter_id].state_tensors().items():
            t.data = saved[name].to("cpu" if name.endswith(".step") or name[0] == "r" else self.device)
        path.unlink(missing_ok=True)

    def _use(self, adapter_ids) -> None:
        """Bring the adapters a pass needs onto the device, then evict beyond the limit."""
        needed = [a for a in dict.fromkeys(adapter_ids) if a is not None]
        for adapter_id in needed:
            if adapter_id not in self._lru:  # parked or spilled: bring it back
                if adapter_id in self._spilled:
                    self._unspill(adapter_id)
                else:
                    self.adapters[adapter_id].move_to(self.device)
                    self._parked.pop(adapter_id, None)
                self.restore_count += 1
            self._lru[adapter_id] = None
            self._lru.move_to_end(adapter_id)
        self._enforce_resident_limit(keep=set(needed))

    def _enforce_resident_limit(self, keep: set) -> None:
        limit = self.max_resident_adapters
        if limit is None:
            return
        for adapter_id in list(self._lru):  # oldest first
            if len(self._lru) <= limit:
                break
            if adapter_id not in keep:
                self.park(adapter_id)

    def adapter(self, adapter_id: str) -> Adapter:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise EngineInputError(f"unknown adapter {adapter_id!r}") from None

    # --------------------------------------------------------------- validation

    def validate(self, item: ForwardItem, base_name: Optional[str] = None) -> None:
        """Raise EngineInputError naming the datum and field; called before any compute.

        `base_name` is the base model of an item without an adapter (adapter_id None); an
        item with an adapter is checked against that adapter's base.
        """
        problem = loss_request_problem(item.loss_fn, item.loss_fn_config,
                                       [(len(d.tokens), d.inputs) for d in item.data])
        if problem is not None:
            raise EngineInputError(*problem)
        base_name = self.adapter(item.adapter_id).base if item.adapter_id else base_name
        if not base_name:
            return
        base = self.bases[base_name]
        for i, datum in enumerate(item.data):  # what needs the model: context and vocabulary
            n = len(datum.tokens)
            if n > base.max_length:
                raise EngineInputError(
                    f"sequence of {n} tokens exceeds the model's context of {base.max_length}",
                    f"data[{i}].model_input",
                )
            bad = (datum.tokens < 0) | (datum.tokens >= base.vocab_size)
            if bad.any():
                raise EngineInputError(
                    f"token id {int(datum.tokens[bad][0])} is outside the vocabulary "
                    f"[0, {base.vocab_size})", f"data[{i}].model_input",
                )
            targets = datum.inputs["target_tokens"]
            if ((targets < 0) | (targets >= base.vocab_size)).any():
                raise EngineInputError(
                    f"target token outside the vocabulary [0, {base.vocab_size})",
                    f"data[{i}].loss_fn_inputs.target_tokens",
                )

    # ---------------------------------------------------------------- training

    def forward(self, items: list[ForwardItem], backward: bool) -> list[Any]:
        """Run items (possibly of many adapters) in shared packed passes.

        Returns, per item, a ForwardResult or the EngineInputError that rejected it; a
        rejected item never reaches the model, so the others get exactly their own results.
        """
        results: list[Any] = [None] * len(items)
        valid: list[int] = []
        for k, item in enumerate(items):
            try:
                if item.adapter_id is None:  # no base model to run it on
                    raise EngineInputError("forward needs an adapter", "model_id")
                self.validate(item)
                if backward and not self.adapter(item.adapter_id).trainable:
                    raise EngineInputError(f"adapter {item.adapter_id!r} is not trainable")
                valid.append(k)
            except EngineInputError as exc:
                results[k] = exc
        if backward and valid and self.attention == "flex" and self.device.type == "cpu":
            raise ValueError("attention 'flex' has no backward on CPU in this torch; use 'sdpa_mask'")
        self._use(items[k].adapter_id for k in valid)
        by_base: dict[str, list[int]] = {}
        for k in valid:
            by_base.setdefault(self.adapters[items[k].adapter_id].base, []).append(k)
        for base_name, ks in by_base.items():
            outputs = self._packed_pass(self.bases[base_name], [items[k] for k in ks], backward)
            for k, out in zip(ks, outputs):
                results[k] = out
        return results

    def _packed_pass(self, base: BaseModel, items: list[ForwardItem], backward: bool) -> list[ForwardResult]:
        seqs: list[PassSequence] = []  # every datum of the pass; PackedSequence.key indexes it
        for k, item in enumerate(items):
            slot = self.adapters[item.adapter_id].slot if item.adapter_id else None
            for d, datum in enumerate(item.data):
                seqs.append(PassSequence(item=k, datum=d, tokens=datum.tokens, slot=slot))
        logprobs: list[list[Optional[np.ndarray]]] = [[None] * len(it.data) for it in items]
        loss_sums = [0.0] * len(items)
        slots = [s.slot for s in seqs]
        plan = plan_micro_batches([len(s.tokens) for s in seqs], slots, self.token_budget, self.row_length)
        for rows in plan:
            if self._micro_batch(base, items, seqs, rows, backward, logprobs, loss_sums, isolate=True):
                continue
            # Non-finite values in a micro-batch of several adapters: one of them (a diverged
            # adapter, overflowing inputs) may have carried NaN into its neighbours through
            # attention, whose masks do not stop NaN (NaN + -inf is NaN, 0 * NaN is NaN), in
            # the forward or the backward. Nothing of that run was kept; each adapter's
            # sequences run again without the others, so each gets its result alone.
            for slot in dict.fromkeys(slots[key] for row in rows for key in row):
                alone = [kept for kept in ([key for key in row if slots[key] == slot] for row in rows) if kept]
                self._micro_batch(base, items, seqs, alone, backward, logprobs, loss_sums, isolate=False)
        return [
            ForwardResult(logprobs=logprobs[k], metrics={"loss:sum": loss_sums[k]})
            for k in range(len(items))
        ]

    def _micro_batch(
        self, base: BaseModel, items: list[ForwardItem], seqs: list[PassSequence], rows: list[list[int]],
        backward: bool, logprobs: list[list[Optional[np.ndarray]]], loss_sums: list[float], isolate: bool,
    ) -> bool:
        """Run one micro-batch (rows of indices into `seqs`), accumulating gradients into the
        adapters and writing each sequence's logprobs and each item's loss into `logprobs` /
        `loss_sums`. With `isolate`, a micro-batch of several adapters whose logprobs, losses
        or new gradients are not all finite is undone instead (gradients as they were,
        nothing written) and False returned."""
        pad = base.tokenizer.pad_token_id
        batch = build_micro_batch(
            rows, [s.tokens for s in seqs], [s.slot for s in seqs], base.device,
            pad_id=int(pad) if pad is not None else 0,
            row_multiple=FLEX_BLOCK if self.attention == "flex" and base.device.type == "cuda" else 1,
        )
        origins = [seqs[seq.key] for seq in batch.sequences]  # in layout (compact) order
        targets = torch.from_numpy(np.concatenate([
            np.asarray(items[o.item].data[o.datum].inputs["target_tokens"], np.int64) for o in origins
        ])).to(base.device)
        slots = {o.slot for o in origins}
        shared = isolate and len(slots) > 1
        # Gradients accumulated so far stay aside while this micro-batch's are computed, so
        # that a non-finite micro-batch can be dropped without touching them.
        params = [p for slot in slots if slot is not None
                  for p in self.adapters[self._slot_owner[slot]].parameters()] if shared and backward else []
        kept_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        # Each item's sequences of this micro-batch, in compact order: every loss is a sum
        # of per-token terms, so one call on their concatenated tokens gives the item's
        # loss with a few ops per item instead of a few per sequence (and one host-to-
        # device copy per loss input, not one per sequence).
        by_item: dict[int, list[PackedSequence]] = {}  # item index -> its sequences here
        for seq, origin in zip(batch.sequences, origins):
            by_item.setdefault(origin.item, []).append(seq)
        with torch.set_grad_enabled(backward):
            lp_T = self._target_logprobs(base, batch, targets)  # [T]
            total = lp_T.new_zeros(())
            losses = []
            for k, members in by_item.items():
                item = items[k]
                index = np.concatenate([np.arange(q.start, q.start + q.length) for q in members])
                lp = lp_T.index_select(0, torch.from_numpy(index).to(base.device))
                inputs = {
                    name: torch.from_numpy(np.concatenate([
                        np.asarray(item.data[seqs[q.key].datum].inputs[name], np.float32) for q in members
                    ])).to(base.device)
                    for name in LOSS_INPUTS[item.loss_fn]
                }
                loss = L.LOSSES[item.loss_fn](lp, inputs, full_config(item.loss_fn, item.loss_fn_config))
                total = total + loss
                losses.append(loss.detach())
            if backward and total.requires_grad:
                total.backward()
        losses_K = torch.stack(losses)
        if shared:
            checks = [torch.isfinite(lp_T.detach()).all(), torch.isfinite(losses_K).all()]
            grads = [p.grad for p in params if p.grad is not None]
            if grads:  # max |g| per tensor: finite exactly when the tensor is (NaN propagates)
                checks.append(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())
            if not bool(torch.stack(checks).all()):  # one device sync
                for p, grad in zip(params, kept_grads):
                    p.grad = grad
                return False
            for p, grad in zip(params, kept_grads):  # what autograd would have accumulated
                if grad is not None:
                    p.grad = grad if p.grad is None else grad.add_(p.grad)
        # One device-to-host copy per micro-batch (not two syncs per sequence), after
        # the backward is queued so the device is not left idle waiting for it.
        lp_host = lp_T.detach().float().cpu().numpy()
        for k, loss in zip(by_item, losses_K.cpu().tolist()):
            loss_sums[k] += loss
        for seq, origin in zip(batch.sequences, origins):
            logprobs[origin.item][origin.datum] = lp_host[seq.start:seq.start + seq.length].copy()
        return True

    def _target_logprobs(self, base: BaseModel, batch: MicroBatch, targets: torch.Tensor) -> torch.Tensor:
        """Target logprobs [T] of the batch's real tokens, in compact (sequence) order."""
        decoder = base.model.get_decoder()
        mode = self.attention
        if len(batch.sequences) == batch.input_ids.shape[0]:
            # One sequence per row, from column 0 (padding after it): plain causal attention
            # is exactly the document mask for every real token, and the model's own causal
            # kernel is the fastest there is (no mask to build or read, upper half skipped).
            mask, mode = None, "sdpa_mask"
        elif mode == "flex":
            mask = flex_document_mask(batch.doc_ids)
        else:
            mask = sdpa_document_mask(batch.doc_ids, base.dtype)
        with LoRARouting(base.lora_layers, batch.spans), attention_implementation(base.model, mode):
            hidden = decoder(
                input_ids=batch.input_ids,
                attention_mask=mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).last_hidden_state  # [R, L, H]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if batch.token_index is not None:  # drop padding before the (vocab-sized) head
            hidden = hidden.index_select(0, batch.token_index)
        head = base.model.get_output_embeddings()
        return L.target_logprobs(head, hidden, targets, batch.compact_spans, self.logprob_chunk)

    def optim_step(self, adapter_id: str, adam: Mapping[str, float]) -> dict[str, float]:
        result = self.optim_steps([(adapter_id, adam)])[0]
        if isinstance(result, EngineInputError):
            raise result
        return result

    def optim_steps(self, steps: Sequence[tuple[str, Mapping[str, float]]]) -> list[Any]:
        """One AdamW step for each (adapter id, AdamParams), all in shared multi-tensor
        updates; per pair its metrics, or the EngineInputError that refused it (an adapter
        that is unknown, not trainable, or named twice), which steps nothing."""
        results: list[Any] = [None] * len(steps)
        valid: list[int] = []
        seen: set[str] = set()
        for i, (adapter_id, _) in enumerate(steps):
            try:
                adapter = self.adapter(adapter_id)
                if not adapter.trainable or adapter.optimizer is None:
                    raise EngineInputError(f"adapter {adapter_id!r} is not trainable")
                if adapter_id in seen:
                    raise EngineInputError(f"adapter {adapter_id!r} is stepped twice in one call")
                seen.add(adapter_id)
                valid.append(i)
            except EngineInputError as exc:
                results[i] = exc
        self._use(steps[i][0] for i in valid)
        batch = [(self.adapters[steps[i][0]].optimizer, steps[i][1]) for i in valid]
        for i, metrics in zip(valid, step_adapters(batch)):
            results[i] = metrics
        return results

    def rewind(self, adapter_id: str, steps: int) -> dict[str, int]:
        """Undo the adapter's last `steps` optim_steps (AdapterOptimizer.rewind: weights, AdamW
        state and step count exactly as before them, gradients discarded). EngineInputError,
        changing nothing, beyond what its history holds (`rewindable`)."""
        available = self.rewindable(adapter_id)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= available:
            raise EngineInputError(f"adapter {adapter_id!r} cannot rewind {steps!r} optim_steps: "
                                   f"{available} can be undone", "steps")
        self._use([adapter_id])  # a spilled adapter's snapshots come back with it
        optimizer = self.adapters[adapter_id].optimizer
        optimizer.rewind(steps)
        return {"steps": steps, "step": optimizer.steps, "rewindable": len(optimizer.history)}

    def rewindable(self, adapter_id: str) -> int:
        """How many optim_steps of a trainable adapter `rewind` can undo now."""
        adapter = self.adapter(adapter_id)
        if adapter.optimizer is None:
            raise EngineInputError(f"adapter {adapter_id!r} is not trainable")
        return len(adapter.optimizer.history)

    def sample(self, base_name: str, requests: list[SampleRequest]) -> list[list[SampleOutput]]:
        """Generate for every request in one batch; each request's slot picks its adapter.

        Raises EngineInputError (where = requests[i].<field>) before any compute when a
        request's slot holds no adapter of this base, or the request fails
        sampler.sample_request_problem (empty prompt, token outside the vocabulary,
        prompt + max_tokens beyond the model's context, num_samples, top_p, temperature).
        """
        base = self.load_model(base_name)
        for i, req in enumerate(requests):
            self._check_sample_request(base, i, req)
        self._use(self._slot_owner[r.slot] for r in requests if r.slot is not None)
        pad = base.tokenizer.pad_token_id
        pad_id = int(pad) if pad is not None else 0
        # Decode batches of at most max_decode_rows rows (a request's samples stay together:
        # its draws come from its own generator), so the KV cache a cycle holds is bounded
        # however many samples its tenants ask for. Rows never see each other: same results.
        outputs: list[list[SampleOutput]] = []
        chunk: list[SampleRequest] = []
        for req in requests:
            if chunk and sum(r.num_samples for r in chunk) + req.num_samples > self.max_decode_rows:
                outputs += generate(base, chunk, pad_id=pad_id)
                chunk = []
            chunk.append(req)
        return outputs + generate(base, chunk, pad_id=pad_id)

    def _check_sample_request(self, base: BaseModel, i: int, req: SampleRequest) -> None:
        """What only the engine knows (which adapter holds the slot), then the one request
        check every sample request passes, sampler.sample_request_problem."""
        where = f"requests[{i}]"
        if req.slot is not None and req.slot not in self._slot_owner:
            raise EngineInputError(f"no adapter holds slot {req.slot}", f"{where}.model_id")
        if req.slot is not None and self.adapters[self._slot_owner[req.slot]].base != base.name:
            raise EngineInputError("the adapter belongs to another base model", f"{where}.model_id")
        problem = sample_request_problem(req, base.vocab_size, base.max_length)
        if problem is not None:
            raise EngineInputError(problem[0], f"{where}.{problem[1]}")

    def prompt_logprobs(
        self, base_name: str, requests: Sequence[tuple[Optional[str], np.ndarray]],
    ) -> list[Any]:
        """[None, logp(t1 | t0), logp(t2 | t0 t1), ...] for each (adapter id or None, prompt).

        All requests share packed passes whatever their adapters (None: the base model).
        Like `forward`, returns per request either its logprobs or the EngineInputError that
        rejected it (naming the field `prompt`); a rejected prompt never reaches the model.
        """
        base = self.load_model(base_name)
        results: list[Any] = [None] * len(requests)
        items, spots = [], []
        for p, (adapter_id, prompt) in enumerate(requests):
            prompt = np.asarray(prompt, dtype=np.int64)
            if len(prompt) < 2:  # nothing to score: the first token has no context
                results[p] = [None] * len(prompt)
                continue
            item = ForwardItem(adapter_id, [EngineDatum(prompt[:-1], {
                "target_tokens": prompt[1:], "weights": np.zeros(len(prompt) - 1, np.float32)})])
            try:
                if adapter_id is not None and self.adapter(adapter_id).base != base_name:
                    raise EngineInputError(f"adapter {adapter_id!r} is not an adapter of {base_name!r}")
                self.validate(item, base_name)
            except EngineInputError as exc:
                # The datum's fields are an internal view here: the caller sent a prompt.
                results[p] = EngineInputError(exc.message, "prompt")
                continue
            items.append(item)
            spots.append(p)
        if items:
            self._use({item.adapter_id for item in items if item.adapter_id is not None})
            for p, out in zip(spots, self._packed_pass(base, items, backward=False)):
                results[p] = [None, *out.logprobs[0].astype(np.float64).tolist()]
        return results

    # ------------------------------------------------------------------- state

    def export_adapter(self, adapter_id: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(state dict with PEFT's saved key names, adapter_config.json contents)."""
        adapter = self.adapter(adapter_id)
        base = self.bases[adapter.base]
        self._use([adapter_id])
        tensors = {}
        for name, pair in adapter.pairs.items():
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = pair.lora_A.detach().float().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = pair.lora_B.detach().float().cpu().contiguous()
        config = adapter.config
        targets = sorted({name.rsplit(".", 1)[-1] for name in adapter.pairs})
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base.name,
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": 0.0,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }
        return tensors, peft_config

    def optimizer_state(self, adapter_id: str) -> Optional[dict]:
        adapter = self.adapter(adapter_id)
        self._use([adapter_id])
        return adapter.optimizer.state_dict() if adapter.optimizer else None

    def import_adapter(
        self,
        adapter_id: str,
        base_name: str,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
        trainable: bool,
        optimizer_state: Optional[dict] = None,
    ) -> Adapter:
        """Register an adapter from PEFT-format tensors (and optionally its optimizer state).

        All or nothing: the tensors (every module's A and B, their shapes, no NaN or inf) and
        the optimizer state's layout are checked before anything is registered, and an
        EngineInputError leaves the engine as it was."""
        if adapter_id in self.adapters:
            raise EngineInputError(f"adapter {adapter_id!r} exists already")
        pairs = self._checked_pairs(base_name, config, tensors, trainable)
        return self._import(adapter_id, base_name, config, pairs, trainable, optimizer_state)

    # ------------------------------------------------------------ safe imports

    def _checked_pairs(self, base_name: str, config: AdapterConfig, tensors: Mapping[str, torch.Tensor],
                       trainable: bool) -> dict[str, LoRAPair]:
        """The LoRA pairs that PEFT-format `tensors` hold for `base_name`, built on the device
        but not registered; EngineInputError naming the tensor for a missing factor, a shape
        that is not (rank, in) / (out, rank), or a NaN or infinite value."""
        base = self.load_model(base_name)
        pairs = {}
        scaling = config.alpha / config.rank
        for name, layer in base.lora_layers.items():
            prefix = f"base_model.model.{name}"
            if f"{prefix}.lora_A.weight" not in tensors and f"{prefix}.lora_B.weight" not in tensors:
                continue
            factors = []
            for factor, shape in (("lora_A", (config.rank, layer.in_features)),
                                  ("lora_B", (layer.out_features, config.rank))):
                key = f"{prefix}.{factor}.weight"
                value = tensors.get(key)
                if not torch.is_tensor(value):
                    raise EngineInputError(f"the checkpoint has no {key}")
                if tuple(value.shape) != shape:
                    raise EngineInputError(f"{key} has shape {list(value.shape)}; this adapter needs {list(shape)}")
                value = value.to(self.device, torch.float32).clone()
                if not bool(torch.isfinite(value).all()):
                    raise EngineInputError(f"{key} holds NaN or infinite values")
                factors.append(value.requires_grad_(trainable))
            pairs[name] = LoRAPair(factors[0], factors[1], scaling)
        if not pairs:
            raise EngineInputError("the checkpoint holds no LoRA tensors for this base model")
        return pairs

    @staticmethod
    def _check_optimizer_state(pairs: dict[str, LoRAPair], state: Any) -> None:
        """EngineInputError unless `state` (AdapterOptimizer.state_dict's layout) fits `pairs`:
        one param group over their A, B tensors, moments of their shapes, all finite."""
        params = [t for pair in pairs.values() for t in (pair.lora_A, pair.lora_B)]
        misfit = EngineInputError("the checkpoint's optimizer state does not fit this adapter")
        try:
            groups, per_param = state["optimizer"]["param_groups"], state["optimizer"]["state"]
            int(state["steps"])
            if len(groups) != 1 or len(groups[0]["params"]) != len(params) or not isinstance(per_param, Mapping):
                raise misfit
        except (KeyError, TypeError, ValueError):
            raise misfit from None
        for index, entry in per_param.items():
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, Mapping):
                raise misfit
            for key, value in entry.items():
                if not torch.is_tensor(value) and not isinstance(value, (int, float)):
                    raise misfit
                value = torch.as_tensor(value)
                if key in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != tuple(params[index].shape):
                    raise EngineInputError(f"the checkpoint's optimizer state {key} of tensor {index} has shape "
                                           f"{list(value.shape)}; this adapter needs {list(params[index].shape)}")
                bad = value.is_floating_point() and not bool(torch.isfinite(value).all())
                if bad or (key == "exp_avg_sq" and bool((value < 0).any())):
                    raise EngineInputError("the checkpoint's optimizer state holds NaN, infinite or negative "
                                           f"second-moment values ({key} of tensor {index})")

    def _import(self, adapter_id, base_name, config, pairs, trainable, optimizer_state) -> Adapter:
        """Register checked `pairs` and load `optimizer_state`; nothing registered on failure."""
        if optimizer_state is not None and trainable:
            self._check_optimizer_state(pairs, optimizer_state)
        adapter = self._register(adapter_id, base_name, config, pairs, trainable)
        if optimizer_state is not None and adapter.optimizer is not None:
            try:
                adapter.optimizer.load_state_dict(optimizer_state)
            except Exception:
                self.remove_adapter(adapter_id)
                raise EngineInputError("the checkpoint's optimizer state does not fit this adapter") from None
        return adapter

    def rename_adapter(self, adapter_id: str, new_id: str) -> Adapter:
        """Give a registered adapter another id (same slot, weights, optimizer, LRU place)."""
        if new_id in self.adapters:
            raise EngineInputError(f"adapter {new_id!r} exists already")
        adapter = self.adapter(adapter_id)
        del self.adapters[adapter_id]
        adapter.adapter_id = new_id
        self.adapters[new_id] = adapter
        self._slot_owner[adapter.slot] = new_id
        for order in (self._lru, self._parked):
            if adapter_id in order:
                keys = [new_id if key == adapter_id else key for key in order]
                order.clear()
                order.update((key, None) for key in keys)
        if adapter_id in self._spilled:
            self._spilled[new_id] = self._spilled.pop(adapter_id)
        return adapter

    def replace_adapter(self, adapter_id: str, tensors: Mapping[str, torch.Tensor],
                        optimizer_state: Optional[dict] = None) -> Adapter:
        """Give a live adapter the weights `tensors` and `optimizer_state` (None: a fresh
        AdamW), all or nothing. The tensors must cover exactly the adapter's modules with its
        shapes, all finite; the new adapter is built under a temporary id and swapped in only
        once complete, so an EngineInputError leaves the old one exactly as it was."""
        old = self.adapter(adapter_id)
        pairs = self._checked_pairs(old.base, old.config, tensors, old.trainable)
        missing, extra = sorted(set(old.pairs) - set(pairs)), sorted(set(pairs) - set(old.pairs))
        if missing or extra:
            example = lambda names: f", e.g. {names[0]}" if names else ""  # noqa: E731
            raise EngineInputError(f"the checkpoint's LoRA modules differ from this adapter's ({len(missing)} "
                                   f"missing{example(missing)}; {len(extra)} extra{example(extra)})")
        temp_id = f".loading-{adapter_id}"
        self._import(temp_id, old.base, old.config, pairs, old.trainable, optimizer_state)
        self.remove_adapter(adapter_id)
        return self.rename_adapter(temp_id, adapter_id)


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")
