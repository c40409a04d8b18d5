"""SamplingClient: sample from, and score with, one fixed set of weights."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from . import types, wire
from .connection import connection_for
from .futures import APIFuture, map_future


class SamplingClient:
    """Samples from a sampler session on the server (a weight snapshot or the base model).

    Pickles to (URL, key, sampler id, CURVE server key) only, so rollouts can run in worker
    processes; the copy opens its own connection there, encrypted when the original was.
    """

    def __init__(self, connection, sampler_id: str, base_model: str, model_path: Optional[str] = None):
        self._connection = connection
        self.sampler_id = sampler_id
        self.base_model = base_model
        self.model_path = model_path
        self._listeners: list = []
        self._results = 0  # results received so far: the `step` listeners are given

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[types.SampleResponse]:
        if topk_prompt_logprobs:
            raise NotImplementedError("topk_prompt_logprobs is not supported by this server yet")
        if isinstance(sampling_params, dict):
            sampling_params = types.SamplingParams(**sampling_params)
        args = {
            "sampler_id": self.sampler_id,
            "prompt": np.asarray(_ints(prompt), dtype=np.int32),
            "num_samples": int(num_samples),
            "sampling_params": sampling_params.model_dump(),
            "include_prompt_logprobs": bool(include_prompt_logprobs),
        }
        future = map_future(self._connection.call("sample", args), wire.sample_response_from_wire)
        future.add_done_callback(lambda f: self._notify(f, "sample", _sample_metrics))
        return future

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[Optional[float]]]:
        """[None, logp(t1 | t0), logp(t2 | t0 t1), ...] under this sampler's weights."""
        args = {"sampler_id": self.sampler_id, "prompt": np.asarray(_ints(prompt), dtype=np.int32)}
        future = map_future(self._connection.call("compute_logprobs", args), lambda r: list(r["logprobs"]))
        future.add_done_callback(lambda f: self._notify(f, "compute_logprobs", _logprob_metrics))
        return future

    async def sample_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.SampleResponse]:
        return self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> APIFuture[list[Optional[float]]]:
        return self.compute_logprobs(prompt)

    def get_tokenizer(self) -> Any:
        from .tokenizer_cache import get_tokenizer

        return get_tokenizer(self._connection, self.base_model)

    def add_listener(self, fn) -> None:
        """fn(step, kind, metrics) for every result as it arrives (on the I/O thread), like
        TrainingClient.add_listener: `step` counts this client's results so far (1, 2, ...),
        kind is sample or compute_logprobs, metrics summarise the result (num_sequences,
        tokens:sum, logprob:mean for sample; tokens, logprob:sum for compute_logprobs)."""
        self._listeners.append(fn)

    def remove_listener(self, fn) -> None:
        self._listeners.remove(fn)

    def _notify(self, future: APIFuture, kind: str, metrics_of) -> None:
        if future.exception() is not None:
            return
        self._results += 1
        for fn in list(self._listeners):
            try:
                fn(self._results, kind, metrics_of(future.result()))
            except Exception:  # a broken listener must not break the I/O thread
                import traceback

                traceback.print_exc()

    def __reduce__(self):
        return (_restore, (self._connection.url, self._connection.api_key, self.sampler_id,
                           self.base_model, self.model_path,
                           self._connection.server_public_key))

    def __repr__(self) -> str:
        return f"SamplingClient({self.model_path or self.base_model!r}, sampler_id={self.sampler_id!r})"


def _sample_metrics(response: types.SampleResponse) -> dict:
    logprobs = [lp for seq in response.sequences for lp in (seq.logprobs or [])]
    return {"num_sequences": float(len(response.sequences)),
            "tokens:sum": float(sum(len(seq.tokens) for seq in response.sequences)),
            "logprob:mean": float(np.mean(logprobs)) if logprobs else 0.0}


def _logprob_metrics(logprobs: list) -> dict:
    known = [lp for lp in logprobs if lp is not None]
    return {"tokens": float(len(logprobs)), "logprob:sum": float(sum(known))}


def _ints(prompt: Any) -> Sequence[int]:
    if isinstance(prompt, types.ModelInput):
        return prompt.to_ints()
    if isinstance(prompt, (list, tuple, np.ndarray)):
        return [int(t) for t in prompt]
    raise TypeError(f"prompt must be a types.ModelInput, got {type(prompt).__name__}")


def _restore(url: str, api_key: str, sampler_id: str, base_model: str, model_path: Optional[str],
             server_public_key: Optional[bytes] = None):
    # server_public_key defaults to None so pickles made before CURVE existed still load.
    return SamplingClient(connection_for(url, api_key, server_public_key=server_public_key),
                          sampler_id, base_model, model_path)
