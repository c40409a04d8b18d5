"""TrainingClient: one LoRA training run on the server.

Every call returns an APIFuture at once. Submit forward_backward and optim_step back to back
before waiting: the server then runs both in the same clock cycle.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import types, wire
from .errors import InvalidRequestError
from .futures import APIFuture, map_future

Listener = Callable[[int, str, dict], None]


def validate_forward(data: Sequence[types.Datum], loss_fn: str, loss_fn_config: Optional[dict]) -> None:
    """Raise InvalidRequestError (with `where`, e.g. data[2].loss_fn_inputs.weights) for what
    can be told wrong without the model (types.loss_request_problem): a bad datum fails at
    once, without a round trip. The server checks the same again, and what needs the model."""
    problem = types.loss_request_problem(loss_fn, loss_fn_config, [
        (d.model_input.length, {name: t.to_numpy() for name, t in d.loss_fn_inputs.items()}) for d in data])
    if problem is not None:
        raise InvalidRequestError(*problem)


class TrainingClient:
    def __init__(self, service, model_id: str, base_model: str, lora_rank: int, arch: str = "",
                 trainable_parameters: Optional[int] = None):
        self._service = service
        self._connection = service._connection
        self.model_id = model_id
        self.base_model = base_model
        self.lora_rank = lora_rank
        self.arch = arch
        self.trainable_parameters = trainable_parameters  # LoRA A and B entries (server's count)
        self._listeners: list[Listener] = []
        self._optim_steps = 0

    # ------------------------------------------------------------ training

    def forward_backward(
        self, data: Sequence[types.Datum], loss_fn: types.LossFnType, loss_fn_config: Optional[dict] = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        return self._forward("forward_backward", data, loss_fn, loss_fn_config)

    def forward(
        self, data: Sequence[types.Datum], loss_fn: types.LossFnType, loss_fn_config: Optional[dict] = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Like forward_backward, without gradients."""
        return self._forward("forward", data, loss_fn, loss_fn_config)

    def _forward(self, op, data, loss_fn, loss_fn_config, watch: bool = True) -> APIFuture[types.ForwardBackwardOutput]:
        data = [d if isinstance(d, types.Datum) else types.Datum.model_validate(d) for d in data]
        try:
            validate_forward(data, loss_fn, loss_fn_config)
        except InvalidRequestError as exc:
            # Like every other failure, it surfaces from the future; nothing is sent.
            failed: APIFuture[types.ForwardBackwardOutput] = APIFuture()
            failed._set_exception(exc)
            return failed
        args = {
            "model_id": self.model_id,
            "data": [wire.datum_to_wire(d) for d in data],
            "loss_fn": loss_fn,
            "loss_fn_config": dict(loss_fn_config or {}),
        }
        future = map_future(self._connection.call(op, args), wire.forward_output_from_wire)
        if watch:
            self._watch(future, op, lambda out: out.metrics)
        return future

    def forward_backward_custom(
        self, data: Sequence[types.Datum], loss_fn: Callable[[list, list], tuple[Any, dict]]
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """forward_backward with a loss computed on the client in torch.

        `loss_fn(data, logprobs_list) -> (loss, metrics)`. Mechanics (as in Tinker): a forward
        pass returns each datum's target logprobs; the client computes the loss and
        d loss / d logprobs; a cross_entropy forward_backward with weights = -grad then yields
        exactly the custom loss's gradient. This call waits for the forward pass before it
        returns, so later calls (optim_step) stay behind the backward pass in order.
        """
        import torch

        data = [d if isinstance(d, types.Datum) else types.Datum.model_validate(d) for d in data]
        for i, datum in enumerate(data):
            if "target_tokens" not in datum.loss_fn_inputs:
                raise InvalidRequestError("forward_backward_custom needs loss_fn_inputs['target_tokens']",
                                          f"data[{i}].loss_fn_inputs.target_tokens")
        # Pass 1 only needs the target logprobs: the user's own inputs (weights, masks, ...)
        # are for their loss_fn, so the forward gets zero weights of the right length.
        probe = [self._linear_datum(d, np.zeros(d.model_input.length, np.float32)) for d in data]
        # Listeners see neither pass 1 nor the surrogate cross_entropy: they get one
        # forward_backward carrying the custom loss's metrics, below.
        forward_out = self._forward("forward", probe, "cross_entropy", None, watch=False).result()
        logprobs = [
            torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32, requires_grad=True)
            for out in forward_out.loss_fn_outputs
        ]
        loss, metrics = loss_fn(data, logprobs)
        grads = torch.autograd.grad(loss, logprobs, allow_unused=True)
        linear = [
            self._linear_datum(datum, -(grad.detach().numpy() if grad is not None else np.zeros(len(lp), np.float32)))
            for datum, lp, grad in zip(data, logprobs, grads)
        ]
        custom_metrics = {"loss:sum": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
        future = map_future(
            self._forward("forward_backward", linear, "cross_entropy", None, watch=False),
            lambda out: types.ForwardBackwardOutput(
                loss_fn_output_type=out.loss_fn_output_type,
                loss_fn_outputs=out.loss_fn_outputs,
                metrics=custom_metrics,
            ),
        )
        self._watch(future, "forward_backward", lambda out: out.metrics)
        return future

    @staticmethod
    def _linear_datum(datum: types.Datum, weights: np.ndarray) -> types.Datum:
        return types.Datum(model_input=datum.model_input,
                           loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"],
                                           "weights": weights})

    def optim_step(self, adam_params: types.AdamParams) -> APIFuture[types.OptimStepResponse]:
        if isinstance(adam_params, dict):
            adam_params = types.AdamParams(**adam_params)
        args = {"model_id": self.model_id, "adam_params": adam_params.model_dump()}
        future = map_future(self._connection.call("optim_step", args),
                            lambda r: types.OptimStepResponse(metrics=r.get("metrics")))
        self._watch(future, "optim_step", lambda out: out.metrics or {})
        return future

    def rewind(self, steps: int = 1) -> APIFuture[types.RewindResponse]:
        """Undo this run's last `steps` optim_steps (a workbench extension; Tinker has none):
        its weights and AdamW state (moments, step count) become exactly, bit for bit, what
        they were before them, and gradients accumulated since the last optim_step are
        discarded; training then goes on as if those steps had never been taken. Queued in
        order with this client's other calls, like optim_step. The server keeps the state
        before each of a run's last few steps (its --rewind-depth, default 4; a checkpoint
        load starts afresh): asking for more fails with InvalidRequestError, changing nothing.
        `optim_steps` (and the step listeners get) goes back by `steps` before the future
        resolves; listeners get kind "rewind" with metrics {"steps": steps}."""

        def rewound(reply: dict) -> types.RewindResponse:
            out = types.RewindResponse(steps=reply["steps"], step=reply["step"], rewindable=reply["rewindable"])
            self._optim_steps = max(0, self._optim_steps - out.steps)
            self._tell("rewind", {"steps": float(out.steps)})
            return out

        return map_future(self._connection.call("rewind", {"model_id": self.model_id, "steps": steps}), rewound)

    # ---------------------------------------------------------- checkpoints

    def save_state(self, name: str) -> APIFuture[types.SaveWeightsResponse]:
        """Weights + optimizer state, at wb://<run_id>/weights/<name>."""
        return map_future(self._connection.call("save_state", {"model_id": self.model_id, "name": name}),
                          lambda r: types.SaveWeightsResponse(path=r["path"]))

    def save_weights_for_sampler(self, name: str) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Weights only (immutable), at wb://<run_id>/sampler_weights/<name>."""
        args = {"model_id": self.model_id, "name": name}
        return map_future(self._connection.call("save_weights_for_sampler", args),
                          lambda r: types.SaveWeightsForSamplerResponse(path=r["path"]))

    def save_weights_and_get_sampling_client(self, name: Optional[str] = None):
        """Snapshot the current weights and return a SamplingClient on that snapshot."""
        args = {"model_id": self.model_id, "name": name}
        path = self._connection.call("save_weights_for_sampler", args).result()["path"]
        return self._service.create_sampling_client(model_path=path)

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load weights from a checkpoint (the optimizer state is reset)."""
        return self._load(path, optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return self._load(path, optimizer=True)

    def _load(self, path: str, optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        args = {"model_id": self.model_id, "path": path, "optimizer": optimizer}
        return map_future(self._connection.call("load_state", args),
                          lambda r: types.LoadWeightsResponse(path=r["path"]))

    def unload_model(self) -> APIFuture[None]:
        """Free this run on the server (its adapter, gradients and optimizer state) once the
        work queued before this call has run; its checkpoints stay and
        `create_training_client_from_state` resumes from them. Later calls on this client
        fail with NotFoundError. A server caps each tenant's live runs (--max-runs-per-tenant)."""
        return map_future(self._connection.call("unload_model", {"model_id": self.model_id}), lambda _: None)

    # ---------------------------------------------------------------- info

    def get_info(self) -> types.GetInfoResponse:
        return types.GetInfoResponse(
            model_id=self.model_id,
            model_data=types.ModelData(arch=self.arch, model_name=self.base_model,
                                       tokenizer_id=self.base_model),
            model_name=self.base_model,
            is_lora=True,
            lora_rank=self.lora_rank,
        )

    def get_tokenizer(self) -> Any:
        from .tokenizer_cache import get_tokenizer

        return get_tokenizer(self._connection, self.base_model)

    def create_sampling_client(self, model_path: str):
        return self._service.create_sampling_client(model_path=model_path)

    # ------------------------------------------------------------ listeners

    @property
    def optim_steps(self) -> int:
        """How many optim_steps of this client have completed (the step listeners receive)."""
        return self._optim_steps

    def add_listener(self, fn: Listener) -> None:
        """fn(step, kind, metrics) for every result as it arrives (on the I/O thread).

        `step` counts optim_steps completed so far; kind is forward, forward_backward,
        optim_step or rewind (then `step` went back by metrics["steps"]). The notebook layer
        draws live views from this.
        """
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def _watch(self, future: APIFuture, kind: str, metrics_of) -> None:
        def notify(f: APIFuture) -> None:
            if f.exception() is not None:
                return
            if kind == "optim_step":
                self._optim_steps += 1
            self._tell(kind, dict(metrics_of(f.result())))

        future.add_done_callback(notify)

    def _tell(self, kind: str, metrics: dict) -> None:
        for fn in list(self._listeners):
            try:
                fn(self._optim_steps, kind, dict(metrics))
            except Exception:  # a broken listener must not break the I/O thread
                import traceback

                traceback.print_exc()

    # ------------------------------------------------------- async variants

    async def forward_backward_async(self, data, loss_fn, loss_fn_config=None):
        return self.forward_backward(data, loss_fn, loss_fn_config)

    async def forward_async(self, data, loss_fn, loss_fn_config=None):
        return self.forward(data, loss_fn, loss_fn_config)

    async def forward_backward_custom_async(self, data, loss_fn):
        import asyncio

        return await asyncio.to_thread(self.forward_backward_custom, data, loss_fn)

    async def optim_step_async(self, adam_params):
        return self.optim_step(adam_params)

    async def save_state_async(self, name):
        return self.save_state(name)

    async def save_weights_for_sampler_async(self, name):
        return self.save_weights_for_sampler(name)

    async def load_state_async(self, path):
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path):
        return self.load_state_with_optimizer(path)

    async def unload_model_async(self):
        return self.unload_model()

    async def rewind_async(self, steps=1):
        return self.rewind(steps)

    async def save_weights_and_get_sampling_client_async(self, name=None):
        import asyncio

        return await asyncio.to_thread(self.save_weights_and_get_sampling_client, name)

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self.base_model!r}, rank={self.lora_rank})"
