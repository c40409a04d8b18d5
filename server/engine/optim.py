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
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import torch
from torch.optim.adam import adam as adam_kernel

from .errors import EngineInputError


class AdapterOptimizer:
    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=0.0)  # the state holder
        self.steps = 0

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
    weight decay) gets its pre-step state back.
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
    groups: dict[tuple, list[int]] = {}
    live: dict[int, list[torch.Tensor]] = {}  # each stepped adapter's weights, moments, step counts
    saved: dict[int, list[torch.Tensor]] = {}  # the same before the step, to undo it
    for i, (opt, adam) in enumerate(batch):
        if with_grads[i] and i not in refused:
            live[i] = [*with_grads[i], *(t for ts in opt._moments(with_grads[i]) for t in ts)]
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
        opt._record(batch[i][1])
        opt.steps += 1
        metrics.append({"grad_norm:mean": host_norms[i], "step:max": float(opt.steps)})
    return metrics
