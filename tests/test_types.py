"""Unit tests of workbench.types: the Tinker-mirroring data types (no server, no GPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workbench import types as T
from workbench.types import (
    AdamParams,
    Checkpoint,
    CheckpointsListResponse,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GetInfoResponse,
    ModelData,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)


# ------------------------------------------------------------------------ ModelInput

def test_model_input_from_ints_to_ints_length():
    mi = ModelInput.from_ints([5, 6, 7])
    assert mi.to_ints() == [5, 6, 7]
    assert mi.length == 3
    assert len(mi.chunks) == 1
    assert mi.chunks[0].type == "encoded_text"
    assert mi.chunks[0].length == 3


def test_model_input_from_ints_accepts_numpy_and_ranges():
    mi = ModelInput.from_ints(np.arange(4, dtype=np.int32))
    assert mi.to_ints() == [0, 1, 2, 3]
    assert all(type(t) is int for t in mi.to_ints())
    assert ModelInput.from_ints(range(3)).to_ints() == [0, 1, 2]


def test_model_input_empty():
    mi = ModelInput.empty()
    assert mi.chunks == []
    assert mi.to_ints() == []
    assert mi.length == 0
    assert ModelInput.from_ints([]).length == 0


def test_model_input_append_returns_new_object():
    original = ModelInput.from_ints([1, 2])
    extended = original.append(EncodedTextChunk(tokens=[3, 4, 5]))
    assert extended is not original
    assert extended.to_ints() == [1, 2, 3, 4, 5]
    assert extended.length == 5
    assert [c.length for c in extended.chunks] == [2, 3]
    # the original is untouched
    assert original.to_ints() == [1, 2]
    assert original.length == 2
    assert len(original.chunks) == 1


def test_model_input_append_int_returns_new_object():
    original = ModelInput.from_ints([1])
    a = original.append_int(2)
    b = a.append_int(np.int64(3))
    assert original.to_ints() == [1]
    assert a.to_ints() == [1, 2]
    assert b.to_ints() == [1, 2, 3]
    assert type(b.to_ints()[-1]) is int
    assert [c.length for c in b.chunks] == [1, 1, 1]
    assert ModelInput.empty().append_int(9).to_ints() == [9]


def test_model_input_chunk_lengths_sum():
    mi = ModelInput(chunks=[EncodedTextChunk(tokens=[1, 2, 3]), EncodedTextChunk(tokens=[]),
                            EncodedTextChunk(tokens=[4])])
    assert [c.length for c in mi.chunks] == [3, 0, 1]
    assert mi.length == 4
    assert mi.to_ints() == [1, 2, 3, 4]


def test_model_input_rejects_extra_fields_and_bad_tokens():
    with pytest.raises(ValidationError):
        ModelInput(chunks=[], extra=1)
    with pytest.raises(ValidationError):
        EncodedTextChunk(tokens=[1], foo="bar")
    with pytest.raises(ValidationError):
        EncodedTextChunk(tokens=["a"])
    with pytest.raises(ValidationError):
        EncodedTextChunk(tokens=[1], type="image")


def test_model_input_dump_validate_round_trip():
    mi = ModelInput.from_ints([1, 2]).append_int(3)
    dumped = mi.model_dump()
    assert dumped == {"chunks": [{"tokens": [1, 2], "type": "encoded_text"},
                                 {"tokens": [3], "type": "encoded_text"}]}
    assert ModelInput.model_validate(dumped) == mi
    assert ModelInput.model_validate_json(mi.model_dump_json()) == mi


# ------------------------------------------------------------------------ TensorData

@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32,
                                   np.bool_])
@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 3), (2, 0, 3)])
def test_tensor_data_from_numpy_int(dtype, shape):
    array = (np.arange(int(np.prod(shape))) % 2 if dtype is np.bool_
             else np.arange(int(np.prod(shape)))).astype(dtype).reshape(shape)
    td = TensorData.from_numpy(array)
    assert td.dtype == "int64"
    assert td.shape == list(shape)
    assert len(td.data) == array.size
    back = td.to_numpy()
    assert back.dtype == np.int64
    assert back.shape == shape
    np.testing.assert_array_equal(back, array.astype(np.int64))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 3), (2, 0, 3)])
def test_tensor_data_from_numpy_float(dtype, shape):
    array = (np.arange(int(np.prod(shape))) * 0.25 - 1.0).astype(dtype).reshape(shape)
    td = TensorData.from_numpy(array)
    assert td.dtype == "float32"
    assert td.shape == list(shape)
    back = td.to_numpy()
    assert back.dtype == np.float32
    assert back.shape == shape
    np.testing.assert_array_equal(back, array.astype(np.float32))


def test_tensor_data_float32_values_exact():
    array = np.array([0.1, 1 / 3, -2.5e-8, 3.4e38], dtype=np.float32)
    back = TensorData.from_numpy(array).to_numpy()
    assert back.tobytes() == array.tobytes()


def test_tensor_data_from_numpy_accepts_lists_and_noncontiguous():
    td = TensorData.from_numpy([[1, 2], [3, 4]])
    assert td.dtype == "int64" and td.shape == [2, 2] and td.data == [1, 2, 3, 4]
    strided = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    td = TensorData.from_numpy(strided)
    assert td.shape == [3, 2]
    np.testing.assert_array_equal(td.to_numpy(), strided.astype(np.float32))


def test_tensor_data_without_shape_is_flat():
    td = TensorData(data=[1, 2, 3], dtype="int64")
    assert td.shape is None
    assert td.to_numpy().shape == (3,)
    assert td.tolist() == [1, 2, 3]


def test_tensor_data_tolist():
    td = TensorData.from_numpy(np.arange(6).reshape(2, 3))
    assert td.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert all(type(x) is int for row in td.tolist() for x in row)
    td = TensorData.from_numpy(np.array([[0.5], [1.5]]))
    assert td.tolist() == [[0.5], [1.5]]
    assert TensorData.from_numpy(np.float32(2.5)).tolist() == 2.5


@pytest.mark.parametrize("tensor, dtype, torch_dtype", [
    (torch.arange(6, dtype=torch.int32).reshape(2, 3), "int64", torch.int64),
    (torch.arange(4, dtype=torch.int64), "int64", torch.int64),
    (torch.tensor([True, False]), "int64", torch.int64),
    (torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2), "float32", torch.float32),
    (torch.ones(2, 2, dtype=torch.float16), "float32", torch.float32),
    (torch.tensor([0.5, -1.25], dtype=torch.bfloat16), "float32", torch.float32),
    (torch.zeros(0, dtype=torch.float32), "float32", torch.float32),
])
def test_tensor_data_torch_round_trip(tensor, dtype, torch_dtype):
    td = TensorData.from_torch(tensor)
    assert td.dtype == dtype
    assert td.shape == list(tensor.shape)
    back = td.to_torch()
    assert isinstance(back, torch.Tensor)
    assert back.dtype == torch_dtype
    assert tuple(back.shape) == tuple(tensor.shape)
    assert torch.equal(back, tensor.to(torch_dtype))


def test_tensor_data_from_torch_requires_grad_tensor():
    tensor = torch.ones(3, requires_grad=True) * 2
    td = TensorData.from_torch(tensor)
    assert td.data == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("bad", [
    np.array([1 + 2j, 3j]),
    np.array([1, "a"], dtype=object),
    np.array(["a", "b"]),
    np.array([b"x"]),
    np.array(["2020-01-01"], dtype="datetime64[D]"),
])
def test_tensor_data_from_numpy_bad_dtype(bad):
    with pytest.raises(TypeError, match="integer and float"):
        TensorData.from_numpy(bad)


def test_tensor_data_validation():
    with pytest.raises(ValidationError):
        TensorData(data=[1], dtype="float64")
    with pytest.raises(ValidationError):
        TensorData(data=[1], dtype="int64", shape=[1], extra=True)
    with pytest.raises(ValidationError):
        TensorData(data=["a"], dtype="int64")
    td = TensorData.from_numpy(np.arange(4.0).reshape(2, 2))
    assert TensorData.model_validate(td.model_dump()) == td
    assert TensorData.model_validate_json(td.model_dump_json()) == td


# ----------------------------------------------------------------------------- Datum

def _mi(n=4):
    return ModelInput.from_ints(list(range(n)))


def _check(td, dtype, values, shape=None):
    assert isinstance(td, TensorData)
    assert td.dtype == dtype
    array = td.to_numpy()
    assert array.dtype == (np.int64 if dtype == "int64" else np.float32)
    np.testing.assert_array_equal(array, np.asarray(values, dtype=array.dtype))
    if shape is not None:
        assert td.shape == list(shape)


def test_datum_from_python_lists():
    d = Datum(model_input=_mi(), loss_fn_inputs={
        "target_tokens": [1, 2, 3, 4], "weights": [0.0, 1.0, 1.0, 0.5]})
    _check(d.loss_fn_inputs["target_tokens"], "int64", [1, 2, 3, 4], [4])
    _check(d.loss_fn_inputs["weights"], "float32", [0, 1, 1, 0.5], [4])


def test_datum_key_dtypes_override_given_kind():
    d = Datum(model_input=_mi(), loss_fn_inputs={
        "target_tokens": [1.0, 2.0, 3.0, 4.0],            # floats -> int64
        "weights": [0, 1, 1, 1],                           # ints -> float32
        "advantages": np.array([1, -1, 2, 0], np.int32),   # int array -> float32
        "logprobs": np.array([-1.5, -0.5, -2, -3], np.float64),  # float64 -> float32
    })
    _check(d.loss_fn_inputs["target_tokens"], "int64", [1, 2, 3, 4])
    _check(d.loss_fn_inputs["weights"], "float32", [0, 1, 1, 1])
    _check(d.loss_fn_inputs["advantages"], "float32", [1, -1, 2, 0])
    _check(d.loss_fn_inputs["logprobs"], "float32", [-1.5, -0.5, -2, -3])


def test_datum_from_numpy_arrays():
    d = Datum(model_input=_mi(3), loss_fn_inputs={
        "target_tokens": np.array([7, 8, 9], dtype=np.int32),
        "weights": np.array([1, 0, 1], dtype=np.float16),
    })
    _check(d.loss_fn_inputs["target_tokens"], "int64", [7, 8, 9], [3])
    _check(d.loss_fn_inputs["weights"], "float32", [1, 0, 1], [3])


def test_datum_from_torch_tensors():
    d = Datum(model_input=_mi(3), loss_fn_inputs={
        "target_tokens": torch.tensor([3, 4, 5]),
        "weights": torch.tensor([1.0, -2.0, 0.5], requires_grad=True),
        "advantages": torch.tensor([1, 2, 3], dtype=torch.int32),
        "logprobs": torch.tensor([-0.5, -1.0, -2.0], dtype=torch.bfloat16),
        "target_float": torch.tensor([1.0, 2.0, 3.0]).double(),
    })
    _check(d.loss_fn_inputs["target_tokens"], "int64", [3, 4, 5], [3])
    _check(d.loss_fn_inputs["weights"], "float32", [1, -2, 0.5], [3])
    _check(d.loss_fn_inputs["advantages"], "float32", [1, 2, 3], [3])
    _check(d.loss_fn_inputs["logprobs"], "float32", [-0.5, -1.0, -2.0], [3])
    _check(d.loss_fn_inputs["target_float"], "float32", [1, 2, 3], [3])


def test_datum_tensor_data_and_dict_inputs():
    tt = TensorData(data=[1, 2], dtype="int64", shape=[2])
    d = Datum(model_input=_mi(2), loss_fn_inputs={
        "target_tokens": tt,
        "weights": {"data": [0.5, 1.0], "dtype": "float32", "shape": [2]},
    })
    assert d.loss_fn_inputs["target_tokens"] == tt
    _check(d.loss_fn_inputs["weights"], "float32", [0.5, 1.0], [2])
    with pytest.raises(ValidationError):
        Datum(model_input=_mi(2), loss_fn_inputs={"weights": {"data": [1.0], "dtype": "f"}})


def test_datum_unknown_input_names_keep_inferred_dtype():
    d = Datum(model_input=_mi(2), loss_fn_inputs={"mask": [1, 0], "scale": [0.5, 2.0],
                                                  "grid": np.ones((2, 3))})
    _check(d.loss_fn_inputs["mask"], "int64", [1, 0])
    _check(d.loss_fn_inputs["scale"], "float32", [0.5, 2.0])
    _check(d.loss_fn_inputs["grid"], "float32", np.ones((2, 3)), [2, 3])


def test_datum_empty_and_default_inputs():
    assert Datum(model_input=_mi()).loss_fn_inputs == {}
    d = Datum(model_input=ModelInput.empty(), loss_fn_inputs={"target_tokens": [],
                                                              "weights": []})
    _check(d.loss_fn_inputs["target_tokens"], "int64", [], [0])
    _check(d.loss_fn_inputs["weights"], "float32", [], [0])


@pytest.mark.parametrize("bad", [5, [1, 2], "weights", None, (("weights", [1.0]),)])
def test_datum_rejects_non_dict_inputs(bad):
    with pytest.raises(ValidationError, match="dict"):
        Datum(model_input=_mi(), loss_fn_inputs=bad)


@pytest.mark.parametrize("name, value", [
    ("weights", [1 + 2j, 3j]),           # complex: no silent cast to real
    ("foo", np.array([1j])),
    ("weights", [object()]),
    ("target_tokens", ["a", "b"]),
    ("foo", np.array(["a"])),
])
def test_datum_rejects_non_numeric_inputs(name, value):
    with pytest.raises(ValidationError, match=name):
        Datum(model_input=_mi(), loss_fn_inputs={name: value})


def test_datum_rejects_extra_fields():
    with pytest.raises(ValidationError):
        Datum(model_input=_mi(), loss_fn_inputs={}, extra=1)
    with pytest.raises(ValidationError):
        Datum(loss_fn_inputs={})  # model_input is required


def test_datum_dump_validate_round_trip():
    d = Datum(model_input=_mi(3), loss_fn_inputs={"target_tokens": [1, 2, 3],
                                                  "weights": [1.0, 0.0, 0.25]})
    again = Datum.model_validate(d.model_dump())
    assert again == d
    assert Datum.model_validate_json(d.model_dump_json()) == d


# ----------------------------------------------------------- SamplingParams/AdamParams

def test_sampling_params_defaults_match_tinker():
    p = SamplingParams()
    assert p.max_tokens is None
    assert p.seed is None
    assert p.stop is None
    assert p.temperature == 1.0
    assert p.top_k == -1
    assert p.top_p == 1.0
    assert p.model_dump() == {"max_tokens": None, "seed": None, "stop": None,
                              "temperature": 1.0, "top_k": -1, "top_p": 1.0}


@pytest.mark.parametrize("stop", ["\n\nUser:", ["a", "bc"], [1, 2, 3], [], None])
def test_sampling_params_stop_kinds(stop):
    p = SamplingParams(stop=stop, max_tokens=16, seed=3, temperature=0.7, top_k=50,
                       top_p=0.9)
    assert p.stop == stop
    if isinstance(stop, list) and stop:
        assert type(p.stop[0]) is type(stop[0])
    assert SamplingParams.model_validate(p.model_dump()) == p


def test_sampling_params_rejects_bad_values():
    with pytest.raises(ValidationError):
        SamplingParams(stop=5)
    with pytest.raises(ValidationError):
        SamplingParams(stop=[1, "a"])
    with pytest.raises(ValidationError):
        SamplingParams(temperature="hot")
    with pytest.raises(ValidationError):
        SamplingParams(max_new_tokens=5)


def test_adam_params_defaults_match_tinker():
    p = AdamParams()
    assert p.learning_rate == 1e-4
    assert p.beta1 == 0.9
    assert p.beta2 == 0.95
    assert p.eps == 1e-12
    assert p.weight_decay == 0.0
    assert p.grad_clip_norm == 0.0
    assert p.model_dump() == {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95,
                              "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}


def test_adam_params_accepts_valid_edges():
    p = AdamParams(learning_rate=0, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.01,
                   grad_clip_norm=1.0)
    assert p.learning_rate == 0.0 and p.beta1 == 0.0
    assert AdamParams.model_validate(p.model_dump()) == p


@pytest.mark.parametrize("kwargs, field", [
    ({"learning_rate": -1e-5}, "learning_rate"),
    ({"learning_rate": math.nan}, "learning_rate"),
    ({"beta1": 1.0}, "beta1"),
    ({"beta1": -0.1}, "beta1"),
    ({"beta2": 1.5}, "beta2"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
])
def test_adam_params_rejects_bad_values(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        AdamParams(**kwargs)


def test_adam_params_rejects_extra_fields():
    with pytest.raises(ValidationError):
        AdamParams(lr=1e-3)


# --------------------------------------------------------------------- response types

def test_forward_backward_output_round_trip():
    out = ForwardBackwardOutput(
        loss_fn_output_type="cross_entropy",
        loss_fn_outputs=[
            {"logprobs": TensorData.from_numpy(np.array([-0.5, -1.5], np.float32))},
            {"logprobs": TensorData.from_numpy(np.zeros(0, np.float32))},
        ],
        metrics={"loss:sum": 2.0, "tokens:sum": 2},
    )
    assert out.metrics["tokens:sum"] == 2.0
    dumped = out.model_dump()
    assert dumped["loss_fn_outputs"][0]["logprobs"] == {"data": [-0.5, -1.5],
                                                        "dtype": "float32", "shape": [2]}
    again = ForwardBackwardOutput.model_validate(dumped)
    assert again == out
    assert isinstance(again.loss_fn_outputs[0]["logprobs"], TensorData)
    assert ForwardBackwardOutput.model_validate_json(out.model_dump_json()) == out
    with pytest.raises(ValidationError):
        ForwardBackwardOutput(loss_fn_output_type="x", loss_fn_outputs=[], metrics={},
                              extra=1)
    with pytest.raises(ValidationError):
        ForwardBackwardOutput(loss_fn_output_type="x", loss_fn_outputs=[])


def test_sampled_sequence_and_sample_response():
    seq = SampledSequence(stop_reason="stop", tokens=[1, 2, 3], logprobs=[-0.1, -0.2, -0.3])
    assert SampledSequence(stop_reason="length", tokens=[]).logprobs is None
    with pytest.raises(ValidationError):
        SampledSequence(stop_reason="eos", tokens=[1])
    with pytest.raises(ValidationError):
        SampledSequence(stop_reason="stop", tokens=[1], text="hi")

    resp = SampleResponse(
        sequences=[seq, SampledSequence(stop_reason="length", tokens=[4], logprobs=[-1.0])],
        prompt_logprobs=[None, -0.5, -1.25],
        topk_prompt_logprobs=[None, [(5, -0.1), (6, -2.0)], None],
    )
    assert resp.type == "sample"
    assert resp.sequences[0].tokens == [1, 2, 3]
    assert resp.topk_prompt_logprobs[1][0] == (5, -0.1)
    assert SampleResponse.model_validate(resp.model_dump()) == resp
    assert SampleResponse.model_validate_json(resp.model_dump_json()) == resp
    minimal = SampleResponse(sequences=[])
    assert minimal.prompt_logprobs is None and minimal.topk_prompt_logprobs is None
    with pytest.raises(ValidationError):
        SampleResponse(sequences=[], type="other")


def test_checkpoint_tinker_path_and_round_trip():
    ck = Checkpoint(checkpoint_id="weights/step-10", checkpoint_type="training",
                    time="2025-01-01T00:00:00Z", path="workbench://run-1/weights/step-10",
                    size_bytes=1234)
    assert ck.tinker_path == ck.path == "workbench://run-1/weights/step-10"
    assert Checkpoint.model_validate(ck.model_dump()) == ck
    listing = CheckpointsListResponse(checkpoints=[ck])
    assert CheckpointsListResponse.model_validate_json(listing.model_dump_json()) == listing
    with pytest.raises(ValidationError):
        Checkpoint(checkpoint_id="a", checkpoint_type="other", time="t", path="p")
    with pytest.raises(ValidationError):
        Checkpoint(checkpoint_id="a", checkpoint_type="sampler", time="t", path="p",
                   tinker_path="p")


def test_small_response_types():
    assert OptimStepResponse().metrics is None
    assert OptimStepResponse(metrics={"lr": 1e-4}).metrics == {"lr": 1e-4}
    assert T.SaveWeightsResponse(path="p").type == "save_weights"
    assert T.SaveWeightsForSamplerResponse(path="p").type == "save_weights_for_sampler"
    assert T.LoadWeightsResponse(path="p").type == "load_weights"
    info = GetInfoResponse(model_id="m1", model_name="tiny",
                           model_data=ModelData(arch="llama", model_name="tiny",
                                                tokenizer_id="/tmp/tok"))
    assert info.is_lora is True and info.lora_rank is None and info.type == "get_info"
    assert GetInfoResponse.model_validate(info.model_dump()) == info
    caps = T.GetServerCapabilitiesResponse(supported_models=[T.SupportedModel(model_name="a")])
    assert T.GetServerCapabilitiesResponse.model_validate(caps.model_dump()) == caps
    run = T.TrainingRun(training_run_id="r", base_model="tiny",
                        user_metadata={"renderer": "role_colon"})
    assert T.TrainingRun.model_validate_json(run.model_dump_json()) == run
    with pytest.raises(ValidationError):
        T.TrainingRun(training_run_id="r", base_model="tiny", user_metadata={"a": 1})


@pytest.mark.parametrize("cls, kwargs", [
    (OptimStepResponse, {}),
    (T.SaveWeightsResponse, {"path": "p"}),
    (ModelData, {"arch": "a", "model_name": "m"}),
    (T.SupportedModel, {"model_name": "m"}),
    (T.TrainingRun, {"training_run_id": "r", "base_model": "b"}),
    (SamplingParams, {}),
])
def test_every_type_forbids_unknown_fields(cls, kwargs):
    cls(**kwargs)
    with pytest.raises(ValidationError, match="surprise"):
        cls(**kwargs, surprise=1)


def test_all_exports_exist():
    for name in T.__all__:
        assert hasattr(T, name), name
