"""The protocol between client and server: message envelope, codec and op schema.

A message is a list of ZeroMQ frames:

    frame 0      msgpack header (a map)
    frame 1..n   raw array buffers, in the order the header references them

Inside the header an array is an msgpack extension (code ARRAY_EXT) holding
``[frame_index, dtype, shape]``; the bytes live in their own frame so numpy buffers are
sent without copying and never pass through msgpack. Data only: no pickle, no code.

Envelopes::

    request  {"v": PROTOCOL_VERSION, "id": str, "op": str, "key": str, "args": map}
    reply    {"v": PROTOCOL_VERSION, "id": str, "ok": true,  "result": any}
             {"v": PROTOCOL_VERSION, "id": str, "ok": false, "error": {type, message, where}}
    event    {"v": PROTOCOL_VERSION, "topic": str, ...}            (PUB socket, one frame
                                                                   topic + message frames)

Events (PUB socket at hello's events_url), by topic:

    cycle    {cycle, start (unix s), seconds, tenants, runs, requests: {op: count}, tokens,
              queue_depth, queue_depth_by_tenant: {tenant: n},
              run_metrics: {run or sampler id: {op: metrics}}}
    session  {session, state: "parked" | "resumed", runs, samplers,
              reason: "silent" | "finished" (parked only)}

Ops (args -> result; arrays are numpy on both sides):

    hello                    {client}                         -> {protocol, server, tenant}
    heartbeat                {session_id}                     -> {session_id, timeout}
                             (immediate; sent per ServiceClient every third of the
                             timeout, at most 5 s; a session silent for `timeout` seconds
                             has its runs parked until its next request; create_model may
                             carry session_id, and a run created without one is its own session)
    get_server_capabilities  {}                               -> GetServerCapabilitiesResponse
    get_tokenizer            {base_model}                     -> {files: {name: bytes}}
    create_model             {base_model, rank, seed, train_mlp, train_attn, train_unembed,
                              user_metadata, session_id}      -> {model_id}
    get_info                 {model_id}                       -> GetInfoResponse
    forward / forward_backward
                             {model_id, data: [datum], loss_fn, loss_fn_config}
                                                              -> ForwardBackwardOutput
    optim_step               {model_id, adam_params}          -> OptimStepResponse
    save_state               {model_id, name}                 -> {path}
    save_weights_for_sampler {model_id, name}                 -> {path}
    load_state               {model_id, path, optimizer}      -> {path}
    create_sampling_session  {model_path | base_model, session_id}
                                                              -> {sampler_id, base_model}
    sample                   {sampler_id, prompt, num_samples, sampling_params,
                              include_prompt_logprobs, topk_prompt_logprobs}
                                                              -> SampleResponse
    compute_logprobs         {sampler_id, prompt}             -> {logprobs}
    list_training_runs       {limit, offset}                  -> TrainingRunsResponse
    get_training_run         {run_id}                         -> TrainingRun
    list_checkpoints         {run_id}                         -> CheckpointsListResponse
    list_user_checkpoints    {limit, offset}                  -> CheckpointsListResponse (newest
                                                                 first, with a cursor)
    delete_checkpoint        {path}                           -> {}
    get_checkpoint_files     {path}                           -> {files: {name: bytes}}

Runs and checkpoints of another tenant answer NotFound, exactly like missing ones.

A datum on the wire is ``{"tokens": int32[N], "loss_fn_inputs": {name: array}}``.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import msgpack
import numpy as np

from . import types
from .errors import ProtocolError

PROTOCOL_VERSION = 1
ARRAY_EXT = 1

# dtypes allowed on the wire; anything else (object arrays above all) is refused.
_WIRE_DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}


class WireError(ProtocolError):
    """A message that cannot be encoded or decoded."""


# ---------------------------------------------------------------------------- codec

def encode(message: Any) -> list:
    """Encode a message (maps, lists, scalars, str, bytes, numpy arrays) into frames."""
    buffers: list = []

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            dtype = obj.dtype.name
            if dtype not in _WIRE_DTYPES:
                raise WireError(f"arrays of dtype {dtype} cannot be sent")
            # The receiver reads the bytes in native byte order: a byte-swapped array
            # would otherwise arrive silently scrambled, so convert it like a strided one.
            if obj.flags.c_contiguous and obj.dtype.isnative:
                array = obj
            else:
                array = np.array(obj, dtype=obj.dtype.newbyteorder("="), order="C")
            buffers.append(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
            meta = msgpack.packb([len(buffers), dtype, list(array.shape)])
            return msgpack.ExtType(ARRAY_EXT, meta)
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, tuple):
            return list(obj)
        raise WireError(f"cannot encode a {type(obj).__name__} on the wire")

    try:
        header = msgpack.packb(message, default=default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode message: {exc}") from exc
    return [header, *buffers]


def decode(frames: list) -> Any:
    """Decode frames produced by `encode`; any inconsistency raises WireError."""
    if not frames:
        raise WireError("empty message")
    used: set[int] = set()

    def ext_hook(code: int, data: bytes) -> Any:
        if code != ARRAY_EXT:
            raise WireError(f"unknown msgpack extension type {code}")
        try:
            index, dtype, shape = msgpack.unpackb(data)
        except Exception as exc:
            raise WireError(f"corrupted array descriptor: {exc}") from exc
        if dtype not in _WIRE_DTYPES:
            raise WireError(f"arrays of dtype {dtype!r} are not allowed")
        if not isinstance(index, int) or not 1 <= index < len(frames):
            raise WireError(f"array refers to frame {index}, message has {len(frames)} frames")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise WireError(f"bad array shape {shape!r}")
        buffer = frames[index]
        buffer = buffer.buffer if hasattr(buffer, "buffer") else buffer  # zmq.Frame
        np_dtype = np.dtype(dtype)
        expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if len(memoryview(buffer).cast("B")) != expected:
            raise WireError(
                f"array frame {index} has {len(memoryview(buffer).cast('B'))} bytes, "
                f"expected {expected} for {dtype}{shape}"
            )
        used.add(index)
        return np.frombuffer(buffer, dtype=np_dtype).reshape(shape)

    header = frames[0]
    header = header.bytes if hasattr(header, "bytes") else header
    try:
        message = msgpack.unpackb(header, ext_hook=ext_hook, raw=False, strict_map_key=True)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise WireError(f"malformed message header: {exc}") from exc
    if len(used) != len(frames) - 1:
        raise WireError(f"message has {len(frames) - 1} array frames, header uses {len(used)}")
    return message


# ------------------------------------------------------------------------- envelopes

def request(request_id: str, op: str, key: str, args: dict) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op, "key": key, "args": args}


def ok_reply(request_id: str, result: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: Optional[str], error: dict) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error}


def check_request(message: Any) -> dict:
    """Validate a request envelope; raise ProtocolError naming what is wrong."""
    if not isinstance(message, dict):
        raise ProtocolError("a request must be a map")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: client speaks {version}, server speaks "
            f"{PROTOCOL_VERSION}; install the same tinker-workbench version on both sides"
        )
    for field, kind in (("id", str), ("op", str), ("key", str), ("args", dict)):
        if not isinstance(message.get(field), kind):
            raise ProtocolError(f"request field {field!r} must be a {kind.__name__}", where=field)
    return message


# ------------------------------------------------------------- op schema conversions

def datum_to_wire(datum: types.Datum) -> dict:
    return {
        "tokens": np.asarray(datum.model_input.to_ints(), dtype=np.int32),
        "loss_fn_inputs": {
            name: tensor.to_numpy() for name, tensor in datum.loss_fn_inputs.items()
        },
    }


def datum_from_wire(message: dict) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(np.asarray(message["tokens"]).tolist()),
        loss_fn_inputs={
            name: types.TensorData.from_numpy(np.asarray(array))
            for name, array in message["loss_fn_inputs"].items()
        },
    )


def forward_output_to_wire(output_type: str, outputs: Iterable[dict], metrics: dict) -> dict:
    return {
        "loss_fn_output_type": output_type,
        "loss_fn_outputs": [dict(o) for o in outputs],
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def forward_output_from_wire(message: dict) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_output_type=message["loss_fn_output_type"],
        loss_fn_outputs=[
            {name: types.TensorData.from_numpy(np.asarray(a)) for name, a in out.items()}
            for out in message["loss_fn_outputs"]
        ],
        metrics=dict(message["metrics"]),
    )


def sample_response_to_wire(
    sequences: list[dict],
    prompt_logprobs: Optional[list],
    topk_prompt_logprobs: Optional[list] = None,
) -> dict:
    """sequences: dicts with tokens (int array), logprobs (float array), stop_reason."""
    return {
        "sequences": sequences,
        "prompt_logprobs": prompt_logprobs,
        "topk_prompt_logprobs": topk_prompt_logprobs,
    }


def sample_response_from_wire(message: dict) -> types.SampleResponse:
    return types.SampleResponse(
        sequences=[
            types.SampledSequence(
                stop_reason=s["stop_reason"],
                tokens=np.asarray(s["tokens"]).tolist(),
                logprobs=np.asarray(s["logprobs"], dtype=np.float64).tolist(),
            )
            for s in message["sequences"]
        ],
        prompt_logprobs=message.get("prompt_logprobs"),
        topk_prompt_logprobs=message.get("topk_prompt_logprobs"),
    )
