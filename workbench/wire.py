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
    event    {"v": PROTOCOL_VERSION, "topic": str, ...}            (no "id": on the request
                                                                   socket to a subscribed
                                                                   connection; on the PUB
                                                                   socket one frame topic +
                                                                   message frames)

Events are private to their tenant (DESIGN §7). A connection that sent `subscribe_events`
gets its tenant's events on the request socket (authenticated by the API key, CURVE-encrypted
when the server uses CURVE), by topic:

    cycle    {cycle, start (unix s), seconds, tenants, runs, requests: {op: count}, tokens,
              queue_depth, queue_depth_by_tenant: {own tenant: n} (empty when none queued),
              run_metrics: {own run or sampler id: {op: metrics}}}
    session  {session, state: "parked" | "resumed", runs, samplers,
              reason: "silent" | "finished" (parked only)}      (own sessions only)

The PUB socket at hello's events_url carries only the anonymous aggregate of each cycle, for
anyone: topic cycle with {cycle, start, seconds, tenants, runs, requests, tokens,
queue_depth}: no run ids, no tenant names, no metrics, no session events.

Ops (args -> result; arrays are numpy on both sides). The server's op table
(`server/ops.py`) holds each op's phase, required arguments, owner and cost; the payload
conversions below are used on both sides (the client builds and reads, the server reads and
builds the same shapes through them).

    hello                    {client}                         -> {protocol, server, tenant,
                                                                  events_url, ...}
    ping                     {}                               -> {time, cycle}
    heartbeat                {session_id}                     -> {session_id, timeout}
                             (immediate; sent per ServiceClient every third of the
                             timeout, at most 5 s; a session silent for `timeout` seconds
                             has its runs parked until its next request; create_model may
                             carry session_id, and a run created without one is its own session)
    get_server_capabilities  {}                               -> GetServerCapabilitiesResponse
    subscribe_events         {topics: ["cycle", "session"]}   -> {topics, lease}
                             (immediate; this connection gets its tenant's events on those
                             topics, [] ends it; a lease of `lease` seconds, renewed by
                             sending it again: the SDK does, every third of it)
    end_session              {session_id}                     -> {session_id}
                             (immediate; the client's goodbye, sent by ServiceClient.close():
                             the session is parked at once and its requests still queued fail
                             with "cancelled: the client session ended"; running ones finish.
                             A session silent for `timeout` ends the same way)
    get_tokenizer            {base_model}                     -> {files: {name: bytes}}
    create_model             {base_model, rank, seed, train_mlp, train_attn, train_unembed,
                              user_metadata, session_id}      -> {model_id, base_model, rank,
                                                                  arch, trainable_parameters}
    forward / forward_backward
                             {model_id, data: [datum], loss_fn, loss_fn_config}
                                                              -> ForwardBackwardOutput
    optim_step               {model_id, adam_params}          -> OptimStepResponse
    save_state               {model_id, name}                 -> {path}
    save_weights_for_sampler {model_id, name}                 -> {path}
    load_state               {model_id, path, optimizer}      -> {path}
    unload_model             {model_id}                       -> {model_id} (frees the run's
                                                                 adapter and optimizer state;
                                                                 its checkpoints stay)
    rewind                   {model_id, steps}                -> {model_id, steps, step,
                                                                  rewindable}
                             (workbench only: undoes the run's last `steps` optim_steps,
                             weights and AdamW state bit for bit, gradients accumulated
                             since discarded; queued in order with the run's other work.
                             `step`: the run's optim_step count now; `rewindable`: how many
                             more can be undone. Beyond the server's --rewind-depth, or
                             what the run has taken since its creation or last load: an
                             InvalidRequestError that changes nothing)
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
from .errors import InvalidRequestError, ProtocolError

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


def datum_arrays(message: Any, where: str = "data[0]") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A datum as it arrives, as arrays: (tokens int64[N], {name: array}). The border
    check of its layout: InvalidRequestError (at `where`) for anything but a map with 1-D
    integer tokens and numeric loss inputs. The server reads datums through this."""
    if not isinstance(message, dict) or not isinstance(message.get("loss_fn_inputs"), dict):
        raise InvalidRequestError("a datum is a map of tokens and loss_fn_inputs", where)
    tokens = _numeric(message.get("tokens"), f"{where}.model_input", "tokens")
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise InvalidRequestError(
            f"tokens must be a 1-D array of integer token ids, got dtype {tokens.dtype} and shape "
            f"{list(tokens.shape)}", f"{where}.model_input")
    inputs = {}
    for name, value in message["loss_fn_inputs"].items():
        inputs[name] = _numeric(value, f"{where}.loss_fn_inputs.{name}", name)
    return tokens.astype(np.int64, copy=False), inputs


def _numeric(value: Any, where: str, name: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # ragged nested lists
        array = None
    if array is None or array.dtype.kind not in "biuf":
        raise InvalidRequestError(f"{name} must be an array of numbers", where)
    return array


def datum_from_wire(message: dict) -> types.Datum:
    tokens, inputs = datum_arrays(message)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens.tolist()),
        loss_fn_inputs={name: types.TensorData.from_numpy(array) for name, array in inputs.items()},
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


def sequence_to_wire(tokens: Iterable[int], logprobs: Iterable[float], stop_reason: str) -> dict:
    """One sampled sequence, as `sample_response_to_wire` takes it."""
    return {"tokens": np.asarray(tokens, dtype=np.int32).reshape(-1),
            "logprobs": np.asarray(logprobs, dtype=np.float32).reshape(-1),
            "stop_reason": stop_reason}


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


# ------------------------------------------------ the server process's handshake facts
# How a launcher learns where a started server listens (its ready line on stdout) and what
# a CURVE key must look like. Both ends use these: the server prints the ready line and
# checks its secret file; clients (workbench.local, ServiceClient) parse and check.

READY_PREFIX = "workbench-server ready url="


def parse_ready_line(line: str) -> Optional[tuple[str, dict[str, str]]]:
    """(url, extra fields) from a ready line; None for any other line. Fields are
    space-separated name=value pairs; a value may itself contain '=' (z85 keys do)."""
    if not line.startswith(READY_PREFIX):
        return None
    url, *rest = line[len(READY_PREFIX):].split()
    return url, dict(field.split("=", 1) for field in rest if "=" in field)


_PUBLIC_KEY_HINT = ("expected the 40-character public key the server printed as curve_public_key= "
                    "(also in its --curve-secret-file PATH.pub)")


def check_curve_key(value: "str | bytes", name: str = "server_public_key",
                    hint: str = _PUBLIC_KEY_HINT) -> bytes:
    """A CURVE key as ZeroMQ wants it: 40 z85 characters (32 bytes). Surrounding whitespace
    (a key pasted from a file) is dropped; anything else wrong raises a ValueError naming
    `name`, followed by `hint` (what the value should have been)."""
    from zmq.utils import z85  # here, not at the top: the codec above needs no ZeroMQ

    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{name}: not a z85 CURVE key (non-ASCII bytes)") from None
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a 40-character z85 string, got {type(value).__name__}")
    key = value.strip()
    bad = sorted(set(key) - set(z85.Z85CHARS.decode()))
    if len(key) != 40 or bad:
        why = f"{len(key)} characters" if len(key) != 40 else f"characters not in z85: {''.join(bad)!r}"
        raise ValueError(f"{name}: not a z85 CURVE key ({why}); {hint}")
    try:
        z85.decode(key)  # 5 characters over 2**32 are z85-shaped but invalid
    except Exception:
        raise ValueError(f"{name}: not a valid z85 CURVE key (a 5-character group overflows); {hint}") from None
    return key.encode("ascii")
