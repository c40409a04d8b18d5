"""Protobuf messages of Tinker's HTTP protocol: forward_backward requests in,
ForwardBackwardOutput and SampleResponse out.

The schema is declared here field by field (numbers and types as in the official SDK's
`tinker_public` package), so the server needs `protobuf` but never the `tinker` SDK. Only
the messages the gateway reads or writes are declared; protobuf skips unknown fields, and
the few inputs we cannot serve (image / audio chunks, sparse tensors) are declared so that
they are refused with a clear error instead of being dropped silently.

Encodings (the SDK's): tokens are int32 little-endian bytes; dense tensors are raw bytes in
their dtype; per-datum outputs are one BatchedTensor per field (concatenated data, int64 byte
offsets with a leading 0, and the trailing shape after the per-datum length).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "workbench_tinker_public"  # not the SDK's name: the two may share a process

_F = descriptor_pb2.FieldDescriptorProto
_BYTES, _STRING, _MSG, _ENUM = _F.TYPE_BYTES, _F.TYPE_STRING, _F.TYPE_MESSAGE, _F.TYPE_ENUM
_INT32, _INT64, _UINT32, _DOUBLE, _BOOL = _F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_DOUBLE, _F.TYPE_BOOL
_REP = "repeated"

# message -> [(field, number, type, type name or None, "repeated" | oneof name | None)]
_MESSAGES: dict[str, list[tuple]] = {
    "SampledSequence": [("stop_reason", 1, _ENUM, "StopReason", None), ("tokens", 2, _BYTES, None, None),
                        ("logprobs", 3, _BYTES, None, "?")],
    "SampleResponse": [("sequences", 1, _MSG, "SampledSequence", _REP), ("prompt_logprobs", 2, _BYTES, None, "?"),
                       ("prompt_cache_hit_tokens", 4, _INT32, None, None)],
    "SparseCsr": [("values", 1, _BYTES, None, None), ("crow_indices", 2, _BYTES, None, None),
                  ("col_indices", 3, _BYTES, None, None)],
    "Tensor": [("dense", 1, _BYTES, None, "encoding"), ("sparse_csr", 2, _MSG, "SparseCsr", "encoding"),
               ("dtype", 3, _ENUM, "DType", None), ("shape", 4, _INT64, None, _REP)],
    "BatchedTensor": [("data", 1, _BYTES, None, None), ("offsets", 2, _BYTES, None, None),
                      ("dtype", 3, _ENUM, "DType", None), ("trailing_shape", 4, _INT64, None, _REP)],
    "ArrayRecord.FieldsEntry": [("key", 1, _STRING, None, None), ("value", 2, _MSG, "BatchedTensor", None)],
    "ArrayRecord": [("type_tag", 1, _STRING, None, None), ("fields", 2, _MSG, "ArrayRecord.FieldsEntry", _REP),
                    ("num_datums", 3, _INT64, None, None)],
    "ForwardBackwardOutput.MetricsEntry": [("key", 1, _STRING, None, None), ("value", 2, _DOUBLE, None, None)],
    "ForwardBackwardOutput": [("loss_fn_output_type", 1, _STRING, None, None),
                              ("loss_fn_outputs", 2, _MSG, "ArrayRecord", _REP),
                              ("metrics", 3, _MSG, "ForwardBackwardOutput.MetricsEntry", _REP)],
    "LossConfigValue": [("number", 1, _DOUBLE, None, "value"), ("text", 2, _STRING, None, "value")],
    "ForwardBackwardRequest.LossFnConfigEntry": [("key", 1, _STRING, None, None), ("value", 2, _DOUBLE, None, None)],
    "ForwardBackwardRequest.LossFnConfigV2Entry": [("key", 1, _STRING, None, None),
                                                   ("value", 2, _MSG, "LossConfigValue", None)],
    "ForwardBackwardRequest": [("model_id", 1, _STRING, None, None), ("seq_id", 2, _INT32, None, None),
                               ("data", 3, _MSG, "Datum", _REP), ("loss_fn", 4, _STRING, None, None),
                               ("loss_fn_config", 5, _MSG, "ForwardBackwardRequest.LossFnConfigEntry", _REP),
                               ("forward_only", 6, _BOOL, None, None),
                               ("loss_fn_config_v2", 7, _MSG, "ForwardBackwardRequest.LossFnConfigV2Entry", _REP)],
    "Datum.LossFnInputsEntry": [("key", 1, _STRING, None, None), ("value", 2, _MSG, "Tensor", None)],
    "Datum": [("model_input", 1, _MSG, "Chunk", _REP), ("loss_fn_inputs", 2, _MSG, "Datum.LossFnInputsEntry", _REP)],
    "EncodedTextChunk": [("tokens", 1, _BYTES, None, None)],
    "ImageChunk": [("data", 1, _BYTES, None, None), ("format", 2, _STRING, None, None)],
    "DmelChunk": [("dmel", 1, _BYTES, None, None)],
    "Chunk": [("encoded_text", 1, _MSG, "EncodedTextChunk", "chunk"), ("image", 2, _MSG, "ImageChunk", "chunk"),
              ("dmel", 3, _MSG, "DmelChunk", "chunk")],
}
_ENUMS = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [("DTYPE_UNSPECIFIED", 0), ("DTYPE_FLOAT32", 1), ("DTYPE_INT64", 2), ("DTYPE_INT32", 3),
              ("DTYPE_BFLOAT16", 4)],
}
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32 = 1, 2, 3
_NUMPY_OF_DTYPE = {DTYPE_FLOAT32: np.float32, DTYPE_INT64: np.int64, DTYPE_INT32: np.int32}
_DTYPE_OF_NUMPY = {np.dtype(np.float32): DTYPE_FLOAT32, np.dtype(np.int64): DTYPE_INT64,
                   np.dtype(np.int32): DTYPE_INT32}
_STOP_REASONS = {"stop": 0, "length": 1}


def _add_message(owner, name: str, fields: list[tuple]) -> None:
    message = owner.message_type.add() if hasattr(owner, "message_type") else owner.nested_type.add()
    message.name = name
    if name.endswith("Entry"):
        message.options.map_entry = True
    oneofs: list[str] = []
    for field_name, number, kind, type_name, label in fields:
        field = message.field.add(name=field_name, number=number, type=kind)
        field.label = _F.LABEL_REPEATED if label == _REP else _F.LABEL_OPTIONAL
        if type_name:
            field.type_name = f".{_PACKAGE}.{type_name}"
        if label not in (None, _REP):
            oneof = f"_{field_name}" if label == "?" else label  # "?" = proto3 `optional`
            field.proto3_optional = label == "?"
            if oneof not in oneofs:
                oneofs.append(oneof)
                message.oneof_decl.add(name=oneof)
            field.oneof_index = oneofs.index(oneof)


def _build() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="workbench_tinker_public.proto", package=_PACKAGE,
                                              syntax="proto3")
    for name, values in _ENUMS.items():
        enum = file.enum_type.add(name=name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    tops = {}
    for name, fields in _MESSAGES.items():  # map entries are nested in their owner
        if "." in name:
            continue
        _add_message(file, name, fields)
        tops[name] = file.message_type[-1]
    for name, fields in _MESSAGES.items():
        if "." in name:
            owner, nested = name.split(".")
            _add_message(tops[owner], nested, fields)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in _MESSAGES if "." not in name}


_CLASSES = _build()


class ProtoInputError(ValueError):
    """A forward_backward body we cannot read; `where` names the part (e.g. data[2].model_input)."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.message, self.where = message, where


def _tensor(msg, where: str) -> np.ndarray:
    if msg.WhichOneof("encoding") == "sparse_csr":
        raise ProtoInputError("sparse tensors are not supported by this server; send dense data", where)
    dtype = _NUMPY_OF_DTYPE.get(msg.dtype)
    if dtype is None:
        raise ProtoInputError(f"unsupported tensor dtype {msg.dtype} (float32, int64 or int32)", where)
    if len(msg.dense) % np.dtype(dtype).itemsize:
        raise ProtoInputError("tensor bytes are not a whole number of elements", where)
    array = np.frombuffer(msg.dense, dtype=dtype).copy()
    if msg.shape:
        if int(np.prod(msg.shape)) != array.size:
            raise ProtoInputError(f"tensor of {array.size} elements does not fit shape {list(msg.shape)}", where)
        array = array.reshape(list(msg.shape))
    return array


def decode_forward_backward(body: bytes) -> dict:
    """ForwardBackwardRequest bytes -> {model_id, seq_id, forward_only, loss_fn, loss_fn_config,
    data: [{tokens: int32[N], loss_fn_inputs: {name: array}}]} (our wire's datum layout)."""
    msg = _CLASSES["ForwardBackwardRequest"]()
    try:
        msg.ParseFromString(body)
    except Exception as exc:
        raise ProtoInputError(f"forward_backward body is not a ForwardBackwardRequest protobuf: {exc}") from None
    config: dict[str, Any] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():  # v2 wins: it also carries strings
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    data = []
    for i, datum in enumerate(msg.data):
        tokens = []
        for j, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise ProtoInputError(f"{kind or 'empty'} chunks are not supported by this server (text tokens only)",
                                      f"data[{i}].model_input.chunks[{j}]")
            tokens.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
        data.append({
            "tokens": np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32),
            "loss_fn_inputs": {name: _tensor(t, f"data[{i}].loss_fn_inputs.{name}")
                               for name, t in datum.loss_fn_inputs.items()},
        })
    return {"model_id": msg.model_id, "seq_id": int(msg.seq_id), "forward_only": bool(msg.forward_only),
            "loss_fn": msg.loss_fn, "loss_fn_config": config or None, "data": data}


def _batched(arrays: list[np.ndarray]) -> Any:
    """Per-datum arrays (same dtype and trailing shape) -> one BatchedTensor."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
    if dtype not in _DTYPE_OF_NUMPY:
        arrays = [a.astype(np.float32 if dtype.kind == "f" else np.int64) for a in arrays]
        dtype = arrays[0].dtype
    sizes = [a.nbytes for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    bt = _CLASSES["BatchedTensor"](data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(),
                                   dtype=_DTYPE_OF_NUMPY[dtype])
    if arrays:
        bt.trailing_shape.extend(arrays[0].shape[1:])
    return bt


def encode_forward_backward_output(output_type: str, outputs: list[dict], metrics: dict) -> bytes:
    """Our forward result -> ForwardBackwardOutput bytes (one ArrayRecord for all datums)."""
    msg = _CLASSES["ForwardBackwardOutput"](loss_fn_output_type=output_type)
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    record = msg.loss_fn_outputs.add(type_tag=output_type, num_datums=len(outputs))
    for name in (outputs[0].keys() if outputs else ()):
        record.fields[name].CopyFrom(_batched([np.asarray(o[name]) for o in outputs]))
    return msg.SerializeToString()


def encode_sample_response(sequences: list[dict], prompt_logprobs: Optional[list]) -> bytes:
    """Our sample result -> SampleResponse bytes; a prompt logprob of None travels as NaN."""
    msg = _CLASSES["SampleResponse"]()
    for seq in sequences:
        out = msg.sequences.add(stop_reason=_STOP_REASONS[seq["stop_reason"]],
                                tokens=np.asarray(seq["tokens"], dtype="<i4").tobytes())
        out.logprobs = np.asarray(seq["logprobs"], dtype="<f4").tobytes()
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray([np.nan if v is None else v for v in prompt_logprobs],
                                         dtype="<f4").tobytes()
    return msg.SerializeToString()
