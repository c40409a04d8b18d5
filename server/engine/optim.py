"""Per-adapter AdamW with Tinker's AdamParams, stepped for many adapters at once.

Each adapter owns its AdamW state over its own LoRA tensors only (fp32 master weights and
fp32 moments), so one adapter's step can never touch another adapter's weights. A
`torch.optim.AdamW` holds that state (its state_dict is what checkpoints store), but the
math runs in `step_adapters`: a cycle's optim_steps of every adapter go through torch's own
multi-tensor (foreach) AdamW kernel together, one call per distinct set of hyperparameters,
instead of one small op per tensor per adapter. The hyperparameters arrive with every
optim_step (Tinker passes AdamParams per step).

On CPU the kernel is torch's fused AdamW (one vectorised pass per tensor: about 4x faster
than foreach there, which loops a dozen ops per tensor); elsewhere foreach, whose state
layout (`step` on the host) is what torch.optim.AdamW keeps by default. Both are elementwise
per tensor, so an adapter's result never depends on which adapters step beside it.

Rewind: with a `rewind_depth`, each adapter keeps host (CPU) copies of its state before each
of its last `rewind_depth` accepted steps (`Snapshot`: weights, AdamW moments and step
counters, the param group's hyperparameters, the step count), so `rewind(k)` puts it back
exactly, bit for bit, as it was before its last k steps. One snapshot costs 12 bytes per LoRA
parameter (fp32 weights + both moments; 4 before the adapter's first step). A refused step
(below) takes no snapshot's place in the history.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch.optim.adam import adam as adam_kernel

from .errors import EngineInputError


@dataclass
class Snapshot:
    """An adapter's state before one optim_step, on the host: what undoing that step needs."""

    tensors: dict[str, torch.Tensor]  # "w<i>": weights of params[i], "s<i>.<key>": its AdamW state
    steps: int  # AdapterOptimizer.steps
    group: dict  # the param group's hyperparameters (lr, betas, ...): checkpoints store them


class AdapterOptimizer:
    def __init__(self, params: list[torch.Tensor], rewind_depth: int = 0):
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=0.0)  # the state holder
        self.steps = 0
        # The state before each of the last `rewind_depth` steps, oldest first.
        self.history: deque[Snapshot] = deque(maxlen=max(0, int(rewind_depth)))

    def step(self, adam: Mapping[str, float]) -> dict[str, float]:
        return step_adapters([(self, adam)])[0]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        # A copy: torch keeps the given tensors when dtype and device already match, so
        # loading another adapter's live state (export + import in one process) would make
        # both adapters step the same moments and step counter in place.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.steps = int(state["steps"])
        self.history.clear()  # another state: the steps before it cannot be undone

    def snapshot(self) -> Snapshot:
        """Copies, on the host, of everything a step changes."""
        tensors: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.params):
            tensors[f"w{i}"] = p.detach().to("cpu", copy=True)
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"s{i}.{key}"] = value.detach().to("cpu", copy=True)
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        return Snapshot(tensors, self.steps, copy.deepcopy(group))

    def rewind(self, steps: int) -> None:
        """Undo the last `steps` steps (1 <= steps <= len(history)): weights, moments, step
        counters and hyperparameters as they were before them, bit for bit; the accumulated
        gradients are discarded. The params must hold their data (not spilled)."""
        if not 1 <= steps <= len(self.history):
            raise EngineInputError(f"cannot rewind {steps} optim_steps: {len(self.history)} can be undone",
                                   "steps")
        for _ in range(steps - 1):
            self.history.pop()
        self.restore(self.history.pop())

    def restore(self, snap: Snapshot) -> None:
        """Weights, moments, step counters and hyperparameters as in `snap`, bit for bit;
        the accumulated gradients are discarded."""
        saved: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        for name, t in snap.tensors.items():
            if name[0] == "s":
                index, key = name[1:].split(".", 1)
                saved[int(index)][key] = t
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(snap.tensors[f"w{i}"])
                if saved[i]:  # copies: the kernel updates moments in place (`step` stays on the host)
                    self.optimizer.state[p] = {key: t.to("cpu" if key == "step" else p.device, copy=True)
                                               for key, t in saved[i].items()}
                else:
                    self.optimizer.state.pop(p, None)
        self.optimizer.param_groups[0].update(copy.deepcopy(snap.group))
        self.steps = snap.steps
        self.zero_grad()

    def _moments(self, params: list[torch.Tensor]) -> tuple[list, list, list]:
        """(exp_avg, exp_avg_sq, step) of each param, created as torch.optim.AdamW does."""
        state = self.optimizer.state
        for p in params:
            if not state[p]:
                state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),  # on the host, like torch
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        return ([state[p]["exp_avg"] for p in params], [state[p]["exp_avg_sq"] for p in params],
                [state[p]["step"] for p in params])

    def _record(self, adam: Mapping[str, float]) -> None:
        group = self.optimizer.param_groups[0]  # kept current: checkpoints store it
        group.update(lr=float(adam["learning_rate"]), betas=(float(adam["beta1"]), float(adam["beta2"])),
                     eps=float(adam["eps"]), weight_decay=float(adam["weight_decay"]))


def step_adapters(batch: Sequence[tuple[AdapterOptimizer, Mapping[str, float]]]) -> list[Any]:
    """One AdamW step for each (adapter optimizer, AdamParams) pair; metrics per pair, or
    the EngineInputError that refused its step.

    Equals, per adapter, `clip_grad_norm_(params, grad_clip_norm)` (when > 0) followed by
    `torch.optim.AdamW.step()` and `zero_grad(set_to_none=True)`. The adapters must be
    distinct. Parameters without a gradient are not stepped (as in torch).

    A step that would make an adapter non-finite is refused and leaves it exactly as it
    was (weights, moments, step count); its gradients are discarded so the run can go on:
    gradients whose norm is not finite are refused before stepping, and an adapter whose
    weights or moments come out of the step non-finite (an overflowing learning rate or
    weight decay) gets its pre-step state back (from device copies of the stepped tensors).

    An adapter with a rewind history gets a host snapshot of its whole state taken before
    its step (before its first moments are created), kept only when the step is accepted.
    """
    if len({id(opt) for opt, _ in batch}) != len(batch):
        raise ValueError("step_adapters got the same adapter twice")
    with_grads = [[p for p in opt.params if p.grad is not None] for opt, _ in batch]
    all_grads = [p.grad for params in with_grads for p in params]
    per_tensor = torch._foreach_norm(all_grads) if all_grads else []
    norms, at = [], 0
    for params in with_grads:
        norms.append(torch.linalg.vector_norm(torch.stack(per_tensor[at:at + len(params)])) if params else None)
        at += len(params)
    present = [n for n in norms if n is not None]
    host = iter(torch.stack(present).tolist() if present else [])  # one device-to-host copy
    host_norms = [next(host) if norm is not None else 0.0 for norm in norms]
    refused: dict[int, str] = {
        i: f"gradient norm is {value} (non-finite gradients, or too large for float32)"
        for i, value in enumerate(host_norms) if not math.isfinite(value)
    }
    for i, ((opt, adam), params) in enumerate(zip(batch, with_grads)):
        clip = float(adam.get("grad_clip_norm", 0.0))
        if params and clip > 0 and i not in refused:  # torch.nn.utils.clip_grad_norm_'s coefficient, exactly
            torch._foreach_mul_([p.grad for p in params], torch.clamp(clip / (norms[i] + 1e-6), max=1.0))
    snapshots = {i: opt.snapshot() for i, (opt, _) in enumerate(batch)
                 if i not in refused and opt.history.maxlen}  # for rewind
    groups: dict[tuple, list[int]] = {}
    live: dict[int, list[torch.Tensor]] = {}  # each stepped adapter's weights, moments, step counts
    saved: dict[int, list[torch.Tensor]] = {}  # the same before the step, to undo it (no rewind snapshot)
    for i, (opt, adam) in enumerate(batch):
        if with_grads[i] and i not in refused:
            live[i] = [*with_grads[i], *(t for ts in opt._moments(with_grads[i]) for t in ts)]
            if i not in snapshots:  # a rewind snapshot already holds the pre-step state
                saved[i] = [t.clone() for t in live[i]]
            key = tuple(float(adam[k]) for k in ("learning_rate", "beta1", "beta2", "eps", "weight_decay"))
            groups.setdefault(key, []).append(i)
    with torch.no_grad():
        for (lr, beta1, beta2, eps, weight_decay), members in groups.items():
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for i in members:
                m1, m2, st = batch[i][0]._moments(with_grads[i])
                params += with_grads[i]
                grads += [p.grad for p in with_grads[i]]
                exp_avgs += m1
                exp_avg_sqs += m2
                steps += st
            fused = all(p.device.type == "cpu" for p in params)
            adam_kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=not fused,
                        fused=fused, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                        weight_decay=weight_decay, eps=eps, maximize=False)
        if live:
            # Only the weights can come out non-finite: with finite moments and gradients of
            # finite norm (refused above otherwise), the new moments are finite too, but the
            # update (lr * m / (sqrt(v) + eps), weight decay p * (1 - lr * wd)) can overflow.
            stepped = list(live)
            finite = torch.stack([  # max |w| of each weight tensor: finite exactly when it is
                torch.isfinite(torch.stack(torch._foreach_norm(with_grads[i], float("inf")))).all()
                for i in stepped
            ]).tolist()  # one device sync
            for i, ok in zip(stepped, finite):
                if not ok:
                    if i in snapshots:
                        batch[i][0].restore(snapshots[i])
                    else:
                        for tensor, before in zip(live[i], saved[i]):
                            tensor.copy_(before)
                    refused[i] = ("the step made weights non-finite (learning rate or weight decay "
                                  "too large)")
    metrics: list[Any] = []
    for i, (opt, _) in enumerate(batch):
        opt.zero_grad()
        if i in refused:
            metrics.append(EngineInputError(
                f"optim_step refused: {refused[i]}; the adapter's weights and optimizer state are "
                "unchanged and its accumulated gradients were discarded", "adam_params"))
            continue
        if i in snapshots:
            opt.history.append(snapshots[i])  # the oldest goes beyond rewind_depth
        opt._record(batch[i][1])
        opt.steps += 1
        metrics.append({"grad_norm:mean": host_norms[i], "step:max": float(opt.steps)})
    return metrics
