"""Unit tests of workbench.wire: the msgpack + raw-frames codec, envelopes and op schema."""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest

from workbench import errors, types
from workbench import wire as W
from workbench.errors import ProtocolError
from workbench.wire import WireError

WIRE_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
               "uint64", "float16", "float32", "float64"]
SHAPES = [(), (0,), (5,), (2, 3), (2, 0, 3)]


# ---------------------------------------------------------------------------- helpers

def assert_same(got, want, path="message"):
    """Deep equality; arrays must match in dtype, shape and value; tuples arrive as lists."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: {type(got)} is not an array"
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=path)
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {type(got)} is not a map"
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list), f"{path}: {type(got)} is not a list"
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, np.generic):
        assert got == want.item() and type(got) is type(want.item()), path
    else:
        assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
        assert got == want, f"{path}: {got!r} != {want!r}"


def round_trip(message):
    frames = W.encode(message)
    assert isinstance(frames, list) and len(frames) >= 1
    return W.decode(frames)


def make_array(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if dtype == "bool":
        flat = rng.integers(0, 2, size).astype(bool)
    elif dtype.startswith("float"):
        flat = (rng.standard_normal(size) * 100).astype(dtype)
    else:
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, size, dtype=dtype, endpoint=True)
    return flat.reshape(shape)


def make_datum(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return types.Datum(
        model_input=types.ModelInput.from_ints(rng.integers(0, 50_000, n).tolist()),
        loss_fn_inputs={
            "target_tokens": rng.integers(0, 50_000, n),
            "weights": (rng.random(n) > 0.3).astype(np.float32),
            "logprobs": -rng.random(n),
            "advantages": rng.standard_normal(n),
        },
    )


def datum_array(array_like):
    return np.asarray(array_like)


# ------------------------------------------------------------------- error hierarchy

def test_wire_error_is_protocol_error():
    assert issubclass(WireError, ProtocolError)
    assert issubclass(WireError, errors.RequestFailedError)
    assert WireError("x").category == "user"


# --------------------------------------------------------------- envelopes and ops

def test_envelope_helpers_shape():
    req = W.request("r1", "get_info", "key-1", {"model_id": "m"})
    assert req == {"v": W.PROTOCOL_VERSION, "id": "r1", "op": "get_info", "key": "key-1",
                   "args": {"model_id": "m"}}
    ok = W.ok_reply("r1", {"path": "p"})
    assert ok == {"v": W.PROTOCOL_VERSION, "id": "r1", "ok": True, "result": {"path": "p"}}
    err = W.error_reply(None, {"type": "ServerError", "message": "boom", "where": None})
    assert err["ok"] is False and err["id"] is None and err["v"] == W.PROTOCOL_VERSION


def _adam():
    return types.AdamParams(learning_rate=3e-4, weight_decay=0.01).model_dump()


def _sampling():
    return types.SamplingParams(max_tokens=32, seed=7, stop=["\n\nUser:", "é"],
                                temperature=0.8, top_k=40, top_p=0.95).model_dump()


OP_ARGS = {
    "hello": {"client": {"name": "workbench", "version": "0.1.0", "pid": 12345}},
    "get_server_capabilities": {},
    "get_tokenizer": {"base_model": "tiny-llama"},
    "create_model": {"base_model": "tiny-llama", "rank": 32, "seed": None, "train_mlp": True,
                     "train_attn": True, "train_unembed": False,
                     "user_metadata": {"renderer": "role_colon", "note": "ünïcødé ✓ 日本"}},
    "get_info": {"model_id": "run-0001"},
    "forward": {"model_id": "run-0001",
                "data": [W.datum_to_wire(make_datum(5, s)) for s in range(3)],
                "loss_fn": "cross_entropy", "loss_fn_config": None},
    "forward_backward": {"model_id": "run-0001",
                         "data": [W.datum_to_wire(make_datum(n, n)) for n in (1, 7, 0)],
                         "loss_fn": "ppo",
                         "loss_fn_config": {"clip_low_threshold": 0.8,
                                            "clip_high_threshold": 1.2}},
    "optim_step": {"model_id": "run-0001", "adam_params": _adam()},
    "save_state": {"model_id": "run-0001", "name": "step-10"},
    "save_weights_for_sampler": {"model_id": "run-0001", "name": "sampler-10"},
    "load_state": {"model_id": "run-0001", "path": "workbench://run-0001/weights/step-10",
                   "optimizer": True},
    "create_sampling_session": {"model_path": "workbench://run-0001/sampler_weights/s"},
    "create_sampling_session_base": {"base_model": "tiny-llama"},
    "sample": {"sampler_id": "s-1", "prompt": np.arange(12, dtype=np.int32),
               "num_samples": 4, "sampling_params": _sampling(),
               "include_prompt_logprobs": True, "topk_prompt_logprobs": 5},
    "compute_logprobs": {"sampler_id": "s-1", "prompt": np.array([1, 2, 3], np.int32)},
}

OP_RESULTS = {
    "hello": {"protocol": W.PROTOCOL_VERSION, "server": "workbench 0.1.0",
              "tenant": "alice"},
    "get_server_capabilities": types.GetServerCapabilitiesResponse(
        supported_models=[types.SupportedModel(model_name="tiny-llama")]).model_dump(),
    "get_tokenizer": {"files": {"tokenizer.json": b'{"model": {}}',
                                "tokenizer_config.json": "{}".encode(),
                                "weird.bin": bytes(range(256))}},
    "create_model": {"model_id": "run-0001"},
    "get_info": types.GetInfoResponse(
        model_id="run-0001", model_name="tiny-llama", lora_rank=32,
        model_data=types.ModelData(arch="llama", model_name="tiny-llama",
                                   tokenizer_id="/tmp/tok")).model_dump(),
    "forward": W.forward_output_to_wire(
        "cross_entropy", [{"logprobs": -np.random.default_rng(1).random(5)
                           .astype(np.float32)}] * 3, {"loss:sum": np.float32(3.5)}),
    "forward_backward": W.forward_output_to_wire(
        "ppo", [{"logprobs": np.zeros(n, np.float32)} for n in (1, 7, 0)],
        {"loss:sum": 1.25, "clipped:mean": 0.0}),
    "optim_step": {"metrics": {"grad_norm:mean": 0.5}},
    "save_state": {"path": "workbench://run-0001/weights/step-10"},
    "save_weights_for_sampler": {"path": "workbench://run-0001/sampler_weights/sampler-10"},
    "load_state": {"path": "workbench://run-0001/weights/step-10"},
    "create_sampling_session": {"sampler_id": "s-1", "base_model": "tiny-llama"},
    "create_sampling_session_base": {"sampler_id": "s-2", "base_model": "tiny-llama"},
    "sample": W.sample_response_to_wire(
        [{"tokens": np.array([5, 6, 2], np.int32),
          "logprobs": np.array([-0.1, -0.2, -0.3], np.float32), "stop_reason": "stop"},
         {"tokens": np.zeros(0, np.int32), "logprobs": np.zeros(0, np.float32),
          "stop_reason": "length"}],
        [None, -1.5, -0.25]),
    "compute_logprobs": {"logprobs": [None, -2.0, -0.5]},
}


@pytest.mark.parametrize("op", sorted(OP_ARGS))
def test_request_round_trip_every_op(op):
    wire_op = "create_sampling_session" if op.endswith("_base") else op
    message = W.request(f"req-{op}", wire_op, "tml-secret-key", OP_ARGS[op])
    decoded = round_trip(message)
    assert_same(decoded, message)
    assert W.check_request(decoded) is decoded


@pytest.mark.parametrize("op", sorted(OP_RESULTS))
def test_ok_reply_round_trip_every_op(op):
    message = W.ok_reply(f"req-{op}", OP_RESULTS[op])
    assert_same(round_trip(message), message)


def test_error_reply_round_trip():
    exc = errors.InvalidRequestError("weights has length 3, expected 4",
                                     where="data[2].loss_fn_inputs.weights")
    message = W.error_reply("req-9", exc.to_wire())
    decoded = round_trip(message)
    assert_same(decoded, message)
    rebuilt = errors.error_from_wire(decoded["error"])
    assert type(rebuilt) is errors.InvalidRequestError
    assert rebuilt.where == "data[2].loss_fn_inputs.weights"


def test_event_round_trip():
    event = {"v": W.PROTOCOL_VERSION, "topic": "progress", "run": "run-0001", "step": 3,
             "metrics": {"loss:sum": 1.5}, "done": False}
    assert_same(round_trip(event), event)


def test_scalar_and_container_values():
    message = {
        "none": None, "t": True, "f": False, "zero": 0, "neg": -1,
        "big": 2**63 - 1, "bigneg": -(2**63), "ubig": 2**64 - 1,
        "float": 1.5, "tiny": 5e-324, "inf": float("inf"),
        "str": "", "unicode": "héllo wörld ✓ 日本語 🚀", "bytes": b"\x00\xff" * 10,
        "empty_bytes": b"", "bytearray_": bytearray(b"ab"),
        "nested": {"a": [1, [2, [3, {"b": None}]]], "c": {}},
        "tuple": (1, "two", 3.0), "list": [], "np_scalars": [np.int16(-3), np.float32(0.5),
                                                            np.bool_(True), np.uint64(2**64 - 1)],
    }
    decoded = round_trip(message)
    expected = dict(message, bytearray_=b"ab")
    assert_same(decoded, expected)
    assert type(decoded["bytearray_"]) is bytes


def test_nan_float_survives():
    decoded = round_trip({"x": float("nan")})
    assert decoded["x"] != decoded["x"]


def test_no_arrays_means_one_frame():
    frames = W.encode({"a": [1, 2], "b": "c"})
    assert len(frames) == 1


# --------------------------------------------------------------------------- arrays

@pytest.mark.parametrize("dtype", WIRE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_array_round_trip(dtype, shape):
    array = make_array(dtype, shape)
    frames = W.encode({"a": array})
    assert len(frames) == 2
    assert len(memoryview(frames[1]).cast("B")) == array.nbytes
    decoded = W.decode(frames)["a"]
    assert type(decoded) is np.ndarray
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)
    assert decoded.tobytes() == array.tobytes()  # bit exact, NaNs and -0.0 included


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_noncontiguous_array_round_trip(dtype):
    base = make_array(dtype, (4, 6), seed=3)
    for view in (base[:, ::2], base[::-1], base.T, base[1:3, 1:5], np.asfortranarray(base)):
        assert_same(round_trip([view])[0], np.ascontiguousarray(view))
    assert not base[:, ::2].flags.c_contiguous  # the case the codec must copy


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64", "uint32", "float16", "float32",
                                   "float64"])
def test_byte_swapped_array_round_trip(dtype):
    swapped = np.arange(6).astype(np.dtype(dtype).newbyteorder("S")).reshape(2, 3)
    decoded = round_trip({"a": swapped})["a"]
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, np.arange(6).reshape(2, 3).astype(dtype))


def test_contiguous_array_is_not_copied():
    array = np.arange(10, dtype=np.int64)
    frames = W.encode([array])
    assert np.shares_memory(np.frombuffer(frames[1], np.int64), array)


def test_many_arrays_keep_order():
    arrays = [make_array(WIRE_DTYPES[i % len(WIRE_DTYPES)], SHAPES[i % len(SHAPES)], seed=i)
              for i in range(40)]
    message = {"first": arrays[:20], "nested": {"x": arrays[20:30], "y": [[a] for a in arrays[30:]]}}
    frames = W.encode(message)
    assert len(frames) == 41
    assert_same(W.decode(frames), message)


def test_same_array_twice_makes_two_frames():
    array = np.arange(3, dtype=np.float32)
    frames = W.encode([array, array])
    assert len(frames) == 3
    decoded = W.decode(frames)
    assert_same(decoded, [array, array])


def test_decode_accepts_bytes_and_memoryview_frames():
    message = {"a": np.arange(5, dtype=np.int32), "b": np.ones((2, 2), np.float64)}
    frames = W.encode(message)
    assert_same(W.decode([bytes(f) for f in frames]), message)
    assert_same(W.decode([memoryview(bytes(f)) for f in frames]), message)
    assert_same(W.decode([bytearray(f) for f in frames]), message)


def test_decode_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    message = {"a": np.arange(5, dtype=np.int32), "s": "x"}
    frames = [zmq.Frame(bytes(f)) for f in W.encode(message)]
    assert_same(W.decode(frames), message)


# ------------------------------------------------------------------------- refusals

class _Thing:
    pass


@pytest.mark.parametrize("value, words", [
    (np.array([1, "a"], dtype=object), "object"),
    (np.array([1 + 2j]), "complex128"),
    (np.array([1 + 2j], np.complex64), "complex64"),
    (np.array(["abc"]), "str"),
    (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64"),
    (np.zeros(2, dtype=[("a", "i4")]), "void"),
    (_Thing(), "_Thing"),
    ({1, 2}, "set"),
    (frozenset(), "frozenset"),
    (1 + 2j, "complex"),
    (object(), "object"),
    (2**64, "cannot encode"),
    (-(2**63) - 1, "cannot encode"),
])
def test_encode_refuses(value, words):
    with pytest.raises(WireError, match=words) as info:
        W.encode({"args": {"x": [value]}})
    assert str(info.value)


# ---------------------------------------------------------------------- corruption

def _good_frames():
    return W.encode({"a": np.arange(6, dtype=np.int32).reshape(2, 3), "s": "hello",
                     "b": [np.ones(4, np.float32)]})


def _header_with(descriptor_bytes, code=W.ARRAY_EXT):
    return msgpack.packb({"a": msgpack.ExtType(code, descriptor_bytes)}, use_bin_type=True)


def _desc(index, dtype, shape):
    return msgpack.packb([index, dtype, shape])


CORRUPT = {
    "empty_frame_list": [],
    "garbage_header": [b"\xc1\xc1\xc1garbage"],
    "empty_header": [b""],
    "none_header": [None],
    "str_header": ["not bytes"],
    "trailing_bytes_after_header": [msgpack.packb({"a": 1}) + b"\x01"],
    "missing_frame": _good_frames()[:2],
    "missing_all_frames": _good_frames()[:1],
    "wrong_length_short": [_good_frames()[0], b"\x00" * 23, _good_frames()[2]],
    "wrong_length_long": [_good_frames()[0], b"\x00" * 25, _good_frames()[2]],
    "extra_unused_frame": [*_good_frames(), b"extra"],
    "extra_empty_frame": [*_good_frames(), b""],
    "truncated_header": [bytes(_good_frames()[0])[:-3], *_good_frames()[1:]],
    "unknown_ext_code": [_header_with(b"abc", code=7)],
    "negative_ext_code": [b"\x81\xa1a\xd6\xfbabcd", b""],  # {"a": ExtType(-5, b"abcd")}
    "dtype_object": [_header_with(_desc(1, "object", [1])), b"\x00" * 8],
    "dtype_complex": [_header_with(_desc(1, "complex128", [1])), b"\x00" * 16],
    "dtype_not_a_string": [_header_with(_desc(1, 5, [1])), b"\x00" * 8],
    "dtype_unhashable": [_header_with(_desc(1, ["int8"], [1])), b"\x00"],
    "negative_shape": [_header_with(_desc(1, "int8", [-1])), b""],
    "shape_not_a_list": [_header_with(_desc(1, "int8", 3)), b"\x00" * 3],
    "shape_float": [_header_with(_desc(1, "int8", [1.0])), b"\x00"],
    "shape_overflowing_product": [_header_with(_desc(1, "int8", [2**32, 2**32])), b""],
    "shape_beyond_int64": [_header_with(_desc(1, "int8", [2**64 - 1])), b""],
    "index_zero": [_header_with(_desc(0, "int8", [1])), b"\x00"],
    "index_negative": [_header_with(_desc(-1, "int8", [1])), b"\x00"],
    "index_string": [_header_with(_desc("1", "int8", [1])), b"\x00"],
    "index_out_of_range": [_header_with(_desc(5, "int8", [1])), b"\x00"],
    "descriptor_garbage": [_header_with(b"\xc1\xc1"), b""],
    "descriptor_empty": [_header_with(b""), b""],
    "descriptor_not_a_list": [_header_with(msgpack.packb(7)), b""],
    "descriptor_too_short": [_header_with(msgpack.packb([1, "int8"])), b"\x00"],
    "descriptor_too_long": [_header_with(msgpack.packb([1, "int8", [1], 0])), b"\x00"],
    "array_frame_not_bytes": [_header_with(_desc(1, "int8", [1])), None],
    "non_str_map_key": [msgpack.packb({1: "a"})],
    "list_map_key": [b"\x81\x91\x01\xa1a"],  # {[1]: "a"}
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupted_message_raises_wire_error(name):
    with pytest.raises(WireError) as info:
        W.decode(CORRUPT[name])
    assert str(info.value)


def test_corruption_messages_are_helpful():
    with pytest.raises(WireError, match="empty"):
        W.decode([])
    with pytest.raises(WireError, match="frame 1"):
        W.decode(_good_frames()[:1])
    with pytest.raises(WireError, match="bytes, expected 24"):
        W.decode(CORRUPT["wrong_length_short"])
    with pytest.raises(WireError, match="3 array frames, header uses 2"):
        W.decode([*_good_frames(), b"x"])
    with pytest.raises(WireError, match="extension type 7"):
        W.decode(CORRUPT["unknown_ext_code"])
    with pytest.raises(WireError, match="object"):
        W.decode(CORRUPT["dtype_object"])
    with pytest.raises(WireError, match="shape"):
        W.decode(CORRUPT["negative_shape"])


def _assert_wire_error_or_decodes(frames):
    try:
        W.decode(frames)
    except WireError:
        pass  # anything else propagates and fails the test


def test_fuzz_random_bytes():
    rng = random.Random(0)
    for _ in range(300):
        header = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        extra = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 16)))
                 for _ in range(rng.randint(0, 2))]
        _assert_wire_error_or_decodes([header, *extra])


def test_fuzz_mutated_valid_messages():
    rng = random.Random(0)
    message = {
        "v": 1, "id": "r", "op": "forward_backward", "key": "k",
        "args": {"data": [W.datum_to_wire(make_datum(4))], "loss_fn": "cross_entropy",
                 "x": [None, True, 2**40, -3, 1.5, "ü", b"\x00"]},
    }
    frames = [bytes(f) for f in W.encode(message)]
    header, buffers = frames[0], frames[1:]
    decoded_ok = 0
    for i in range(400):
        mutated = bytearray(header)
        kind = i % 4
        if kind == 0:  # truncation
            mutated = mutated[:rng.randrange(len(mutated))]
        elif kind == 1:  # bit flips
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif kind == 2:  # byte overwrite
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        else:  # bit flip plus a dropped or truncated buffer
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        bufs = list(buffers)
        if kind == 3 and bufs:
            j = rng.randrange(len(bufs))
            if rng.random() < 0.5:
                del bufs[j]
            else:
                bufs[j] = bufs[j][:rng.randrange(len(bufs[j]) + 1)]
        try:
            W.decode([bytes(mutated), *bufs])
            decoded_ok += 1
        except WireError:
            pass
    assert decoded_ok < 400  # the mutations really did break most messages


# -------------------------------------------------------------------- check_request

def _good_request(**changes):
    message = W.request("req-1", "get_info", "tml-key", {"model_id": "m"})
    message.update(changes)
    return message


def test_check_request_accepts_good_envelope():
    message = _good_request()
    assert W.check_request(message) is message
    decoded = round_trip(message)
    assert W.check_request(decoded) == message


@pytest.mark.parametrize("bad", [None, [], "request", 5, b"\x80", [("v", 1)]])
def test_check_request_rejects_non_map(bad):
    with pytest.raises(ProtocolError, match="map"):
        W.check_request(bad)


@pytest.mark.parametrize("version", [0, 2, 99, "1", None])
def test_check_request_rejects_wrong_version(version):
    with pytest.raises(ProtocolError) as info:
        W.check_request(_good_request(v=version))
    text = str(info.value)
    assert "version" in text
    assert str(version) in text
    assert str(W.PROTOCOL_VERSION) in text


def test_check_request_rejects_missing_version():
    message = _good_request()
    del message["v"]
    with pytest.raises(ProtocolError, match="version"):
        W.check_request(message)


@pytest.mark.parametrize("field", ["id", "op", "key", "args"])
@pytest.mark.parametrize("bad", ["<missing>", None, 5, ["x"], b"bytes"])
def test_check_request_rejects_bad_fields(field, bad):
    message = _good_request()
    if bad == "<missing>":
        del message[field]
    else:
        message[field] = bad
    with pytest.raises(ProtocolError) as info:
        W.check_request(message)
    assert info.value.where == field
    assert repr(field) in info.value.message


def test_check_request_args_must_be_a_map_even_if_string():
    with pytest.raises(ProtocolError) as info:
        W.check_request(_good_request(args="{}"))
    assert info.value.where == "args"


# ----------------------------------------------------------------- op schema helpers

def test_datum_wire_round_trip():
    datum = make_datum(8, seed=4)
    wire_datum = W.datum_to_wire(datum)
    assert wire_datum["tokens"].dtype == np.int32
    assert wire_datum["tokens"].tolist() == datum.model_input.to_ints()
    assert wire_datum["loss_fn_inputs"]["target_tokens"].dtype == np.int64
    for name in ("weights", "logprobs", "advantages"):
        assert wire_datum["loss_fn_inputs"][name].dtype == np.float32
    for via_codec in (False, True):
        message = round_trip({"d": wire_datum})["d"] if via_codec else wire_datum
        back = W.datum_from_wire(message)
        assert back.model_input.to_ints() == datum.model_input.to_ints()
        assert set(back.loss_fn_inputs) == set(datum.loss_fn_inputs)
        for name, td in datum.loss_fn_inputs.items():
            got = back.loss_fn_inputs[name]
            assert got.dtype == td.dtype, name
            assert got.shape == td.shape, name
            assert got.to_numpy().tobytes() == td.to_numpy().tobytes(), name
        assert back == datum


def test_datum_wire_round_trip_2d_and_empty():
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [4, 5, 6],
                                        "dist": np.arange(6.0).reshape(3, 2)})
    back = W.datum_from_wire(round_trip(W.datum_to_wire(datum)))
    assert back == datum
    assert back.loss_fn_inputs["dist"].shape == [3, 2]
    empty = types.Datum(model_input=types.ModelInput.empty())
    back = W.datum_from_wire(round_trip(W.datum_to_wire(empty)))
    assert back.model_input.to_ints() == [] and back.model_input.length == 0
    assert back.loss_fn_inputs == {}
    multi = types.Datum(model_input=types.ModelInput.from_ints([1]).append_int(2))
    assert W.datum_from_wire(W.datum_to_wire(multi)).model_input.to_ints() == [1, 2]


def test_forward_output_wire_round_trip():
    outputs = [{"logprobs": np.array([-0.5, -1.0, -0.25], np.float32),
                "entropy": np.ones((3,), np.float32)},
               {"logprobs": np.zeros(0, np.float32), "entropy": np.zeros(0, np.float32)}]
    metrics = {"loss:sum": np.float32(1.75), "tokens:sum": 3, "kl:mean": 0.125}
    message = W.forward_output_to_wire("cross_entropy", iter(outputs), metrics)
    assert all(type(v) is float for v in message["metrics"].values())
    for wire_message in (message, round_trip(message)):
        out = W.forward_output_from_wire(wire_message)
        assert isinstance(out, types.ForwardBackwardOutput)
        assert out.loss_fn_output_type == "cross_entropy"
        assert out.metrics == {"loss:sum": 1.75, "tokens:sum": 3.0, "kl:mean": 0.125}
        assert len(out.loss_fn_outputs) == 2
        for got, want in zip(out.loss_fn_outputs, outputs):
            assert set(got) == set(want)
            for name in want:
                assert got[name].dtype == "float32"
                assert got[name].shape == list(want[name].shape)
                np.testing.assert_array_equal(got[name].to_numpy(), want[name])


def test_sample_response_wire_round_trip():
    sequences = [
        {"tokens": np.array([11, 12, 2], np.int32),
         "logprobs": np.array([-0.5, -0.25, -0.125], np.float32), "stop_reason": "stop"},
        {"tokens": np.array([13], np.int64), "logprobs": np.array([-3.0], np.float32),
         "stop_reason": "length"},
        {"tokens": np.zeros(0, np.int32), "logprobs": np.zeros(0, np.float32),
         "stop_reason": "length"},
    ]
    topk = [None, [[5, -0.5], [6, -1.5]], [[7, -0.25]]]
    message = W.sample_response_to_wire(sequences, [None, -1.5, -0.5], topk)
    for wire_message in (message, round_trip(message)):
        resp = W.sample_response_from_wire(wire_message)
        assert isinstance(resp, types.SampleResponse)
        assert [s.stop_reason for s in resp.sequences] == ["stop", "length", "length"]
        assert resp.sequences[0].tokens == [11, 12, 2]
        assert all(type(t) is int for t in resp.sequences[0].tokens)
        assert resp.sequences[0].logprobs == [-0.5, -0.25, -0.125]
        assert resp.sequences[1].tokens == [13] and resp.sequences[1].logprobs == [-3.0]
        assert resp.sequences[2].tokens == [] and resp.sequences[2].logprobs == []
        assert resp.prompt_logprobs == [None, -1.5, -0.5]
        assert resp.topk_prompt_logprobs == [None, [(5, -0.5), (6, -1.5)], [(7, -0.25)]]

    plain = W.sample_response_from_wire(round_trip(W.sample_response_to_wire(sequences[:1],
                                                                              None)))
    assert plain.prompt_logprobs is None and plain.topk_prompt_logprobs is None
    assert plain.sequences[0].tokens == [11, 12, 2]


# ------------------------------------------------------------------- errors on the wire

ERROR_CLASSES = [errors.RequestFailedError, errors.InvalidRequestError, errors.NotFoundError,
                 errors.AuthenticationError, errors.ProtocolError, errors.QueueFullError,
                 errors.ServerError, errors.ConnectionFailedError]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("where", [None, "data[3].loss_fn_inputs.weights"])
def test_error_from_wire_rebuilds_class(cls, where):
    original = cls("something went wrong: ü", where=where)
    wire_error = round_trip(W.error_reply("r", original.to_wire()))["error"]
    assert wire_error == {"type": cls.__name__, "message": "something went wrong: ü",
                          "where": where}
    rebuilt = errors.error_from_wire(wire_error)
    assert type(rebuilt) is cls
    assert rebuilt.message == original.message
    assert rebuilt.where == where
    assert str(rebuilt) == str(original)
    assert rebuilt.category == original.category
    if where:
        assert where in str(rebuilt)


def test_wire_error_travels_as_protocol_error():
    exc = WireError("bad frame", where="frames[1]")
    rebuilt = errors.error_from_wire(exc.to_wire())
    assert type(rebuilt) is errors.ProtocolError  # travels as its nearest public ancestor
    assert rebuilt.message == "bad frame"


@pytest.mark.parametrize("error", [
    {"type": "KeyError", "message": "boom", "where": "x"},
    {"type": "WorkbenchError", "message": "boom", "where": None},
    {"type": None, "message": "boom"},
    {"message": "boom"},
    {"type": "Exception", "message": "boom"},
])
def test_error_from_wire_unknown_type_is_server_error(error):
    rebuilt = errors.error_from_wire(error)
    assert type(rebuilt) is errors.ServerError
    assert rebuilt.message == "boom"
    assert rebuilt.where == error.get("where")
    assert rebuilt.category == "server"


def test_error_from_wire_missing_message():
    rebuilt = errors.error_from_wire({"type": "NotFoundError"})
    assert type(rebuilt) is errors.NotFoundError
    assert rebuilt.message == "" and rebuilt.where is None
