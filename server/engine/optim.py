"""Per-adapter AdamW with Tinker's AdamParams.

Each adapter owns a `torch.optim.AdamW` over its own LoRA tensors only (fp32 master weights
and fp32 moments), so one adapter's step can never touch another adapter's weights. The
hyperparameters arrive with every optim_step (Tinker passes AdamParams per step), so they are
written into the param group right before stepping.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


class AdapterOptimizer:
    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        # foreach=False keeps the CPU reference path simple and bit-comparable to a plain
        # torch.optim.AdamW built the same way.
        self.optimizer = torch.optim.AdamW(params, lr=0.0, foreach=False)
        self.steps = 0

    def step(self, adam: Mapping[str, float]) -> dict[str, float]:
        group = self.optimizer.param_groups[0]
        group["lr"] = float(adam["learning_rate"])
        group["betas"] = (float(adam["beta1"]), float(adam["beta2"]))
        group["eps"] = float(adam["eps"])
        group["weight_decay"] = float(adam["weight_decay"])
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if grads
            else 0.0
        )
        clip = float(adam.get("grad_clip_norm", 0.0))
        if clip > 0 and grads:
            torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm:mean": grad_norm if math.isfinite(grad_norm) else float("nan"),
                "step:max": float(self.steps)}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
