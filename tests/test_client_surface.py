"""The public surface matches Tinker's Python SDK (reference/tinker-api.md, DESIGN §2) name
for name: every listed method with its argument names and defaults, the `_async` variants,
the methods returning futures, and the types importable from `workbench` and `workbench.types`."""

from __future__ import annotations

import inspect

import pytest

import workbench
from workbench import types

REQUIRED = inspect.Parameter.empty

# method -> [(argument, default)], in order; REQUIRED marks an argument without a default.
SURFACE = {
    workbench.ServiceClient: {
        "__init__": [("base_url", None), ("api_key", None)],
        "create_lora_training_client": [("base_model", REQUIRED), ("rank", 32), ("seed", None), ("train_mlp", True),
                                        ("train_attn", True), ("train_unembed", True), ("user_metadata", None)],
        "create_training_client_from_state": [("path", REQUIRED)],
        "create_training_client_from_state_with_optimizer": [("path", REQUIRED)],
        "create_sampling_client": [("model_path", None), ("base_model", None)],
        "get_server_capabilities": [],
        "create_rest_client": [],
    },
    workbench.TrainingClient: {
        "forward_backward": [("data", REQUIRED), ("loss_fn", REQUIRED), ("loss_fn_config", None)],
        "forward": [("data", REQUIRED), ("loss_fn", REQUIRED), ("loss_fn_config", None)],
        "forward_backward_custom": [("data", REQUIRED), ("loss_fn", REQUIRED)],
        "optim_step": [("adam_params", REQUIRED)],
        "save_state": [("name", REQUIRED)],
        "load_state": [("path", REQUIRED)],
        "load_state_with_optimizer": [("path", REQUIRED)],
        "save_weights_for_sampler": [("name", REQUIRED)],
        "save_weights_and_get_sampling_client": [("name", None)],
        "get_info": [],
        "get_tokenizer": [],
        "add_listener": [("fn", REQUIRED)],
    },
    workbench.SamplingClient: {
        "sample": [("prompt", REQUIRED), ("num_samples", REQUIRED), ("sampling_params", REQUIRED),
                   ("include_prompt_logprobs", False), ("topk_prompt_logprobs", 0)],
        "compute_logprobs": [("prompt", REQUIRED)],
        "get_tokenizer": [],
        "add_listener": [("fn", REQUIRED)],
    },
    workbench.RestClient: {
        "get_server_capabilities": [],
        "list_training_runs": [("limit", 20), ("offset", 0), ("access_scope", "owned"), ("project_id", None)],
        "get_training_run": [("training_run_id", REQUIRED), ("access_scope", "owned")],
        "get_training_run_by_tinker_path": [("tinker_path", REQUIRED), ("access_scope", "owned")],
        "list_checkpoints": [("training_run_id", REQUIRED)],
        "list_user_checkpoints": [("limit", 100), ("offset", 0)],
        "delete_checkpoint": [("training_run_id", REQUIRED), ("checkpoint_id", REQUIRED)],
        "delete_checkpoint_from_tinker_path": [("tinker_path", REQUIRED)],
        "download_checkpoint": [("path", REQUIRED), ("dest_dir", REQUIRED)],
    },
}

# Methods with an `_async` twin taking the same arguments (DESIGN §2: "The _async variants exist too").
ASYNC = {
    workbench.ServiceClient: ["create_lora_training_client", "create_training_client_from_state",
                              "create_training_client_from_state_with_optimizer", "create_sampling_client",
                              "get_server_capabilities"],
    workbench.TrainingClient: ["forward_backward", "forward", "forward_backward_custom", "optim_step", "save_state",
                               "load_state", "load_state_with_optimizer", "save_weights_for_sampler",
                               "save_weights_and_get_sampling_client"],
    workbench.SamplingClient: ["sample", "compute_logprobs"],
    workbench.RestClient: [m for m in SURFACE[workbench.RestClient]],
}

# Methods that return an APIFuture at once (the rest return their result).
FUTURES = {
    workbench.TrainingClient: ["forward_backward", "forward", "forward_backward_custom", "optim_step", "save_state",
                               "load_state", "load_state_with_optimizer", "save_weights_for_sampler"],
    workbench.SamplingClient: ["sample", "compute_logprobs"],
    workbench.RestClient: [m for m in SURFACE[workbench.RestClient]],
}

TYPES = ["ModelInput", "EncodedTextChunk", "TensorData", "Datum", "SamplingParams", "AdamParams",
         "ForwardBackwardOutput", "OptimStepResponse", "SaveWeightsResponse", "SaveWeightsForSamplerResponse",
         "LoadWeightsResponse", "SampleResponse", "SampledSequence", "StopReason", "GetInfoResponse",
         "GetServerCapabilitiesResponse", "Checkpoint", "CheckpointsListResponse", "TrainingRun",
         "TrainingRunsResponse", "Cursor", "LossFnType"]


def params_of(fn) -> list[tuple[str, object]]:
    sig = inspect.signature(fn)
    return [(p.name, p.default) for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("cls", list(SURFACE), ids=lambda c: c.__name__)
def test_methods_arguments_and_defaults_match_tinker(cls):
    for method, expected in SURFACE[cls].items():
        assert hasattr(cls, method), f"{cls.__name__}.{method} is missing"
        got = params_of(getattr(cls, method))
        assert got[:len(expected)] == expected, f"{cls.__name__}.{method}: {got} != {expected}"
        extra = got[len(expected):]  # additions beyond Tinker's must be optional
        assert all(default is not REQUIRED for _, default in extra), f"{cls.__name__}.{method}: {extra}"


@pytest.mark.parametrize("cls", list(ASYNC), ids=lambda c: c.__name__)
def test_async_variants_exist_with_the_same_arguments(cls):
    for method in ASYNC[cls]:
        twin = getattr(cls, method + "_async", None)
        assert twin is not None and inspect.iscoroutinefunction(twin), f"{cls.__name__}.{method}_async"
        sync, async_ = params_of(getattr(cls, method)), params_of(twin)
        if async_:  # `*args, **kwargs` forwarding twins pass every argument through
            assert async_ == sync, f"{cls.__name__}.{method}_async: {async_} != {sync}"


@pytest.mark.parametrize("cls", list(FUTURES), ids=lambda c: c.__name__)
def test_calls_are_annotated_to_return_futures(cls):
    for method in FUTURES[cls]:
        annotation = str(inspect.signature(getattr(cls, method)).return_annotation)
        assert annotation.startswith("APIFuture"), f"{cls.__name__}.{method} -> {annotation}"


def test_types_importable_from_both_places():
    for name in TYPES:
        assert name in types.__all__, name
        assert getattr(workbench, name) is getattr(types, name), name
    for name in ("APIFuture", "ServiceClient", "TrainingClient", "SamplingClient", "RestClient"):
        assert hasattr(workbench, name), name


def test_type_fields_and_defaults_match_tinker():
    assert types.SamplingParams().model_dump() == dict(max_tokens=None, seed=None, stop=None, temperature=1.0,
                                                       top_k=-1, top_p=1.0)
    assert types.AdamParams().model_dump() == dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12,
                                                   weight_decay=0.0, grad_clip_norm=0.0)
    assert set(types.TrainingRun.model_fields) >= {"training_run_id", "base_model", "model_owner", "is_lora",
                                                   "corrupted", "lora_rank", "last_request_time", "last_checkpoint",
                                                   "last_sampler_checkpoint", "user_metadata"}
    assert set(types.TrainingRunsResponse.model_fields) == {"training_runs", "cursor"}
    assert set(types.Cursor.model_fields) == {"offset", "limit", "total_count"}
    assert set(types.CheckpointsListResponse.model_fields) == {"checkpoints", "cursor"}
    assert {"checkpoint_id", "checkpoint_type", "time", "size_bytes"} <= set(types.Checkpoint.model_fields)
    assert hasattr(types.Checkpoint, "tinker_path")
    mi = types.ModelInput.from_ints([1, 2])
    for name in ("from_ints", "to_ints", "length", "empty", "append", "append_int"):
        assert hasattr(mi, name), name
    for name in ("from_numpy", "from_torch", "to_numpy", "to_torch", "tolist"):
        assert hasattr(types.TensorData, name), name
