"""Data types of the training API, mirroring Tinker's Python SDK (`tinker.types`).

Same names, fields and defaults as Tinker 0.38, so code ports by changing the import.
Everything here is plain data (pydantic models): no torch import at module level, no
sockets. How these objects travel over the wire is `workbench.wire`'s business.

Next-token alignment (as in Tinker): for a Datum whose model_input has N tokens, every
per-token loss input (`target_tokens`, `weights`, `logprobs`, `advantages`) has length N
and position i of the input predicts `target_tokens[i]`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The losses (names, inputs, config keys, the request check) live in the registry,
# workbench.losses; importable from here as in Tinker and as before.
from .losses import LOSS_CONFIG_KEYS, LOSS_INPUTS, LossFnType, loss_request_problem  # noqa: F401

__all__ = [
    "AdamParams",
    "Checkpoint",
    "CheckpointsListResponse",
    "Cursor",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "LoadWeightsResponse",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "ModelInputChunk",
    "OptimStepResponse",
    "RewindResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorDtype",
    "TrainingRun",
    "TrainingRunsResponse",
]


class StrictBase(BaseModel):
    """Base of every API type: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


# --------------------------------------------------------------------------- inputs

class EncodedTextChunk(StrictBase):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


# Image chunks exist in Tinker for vision models; the workbench serves text models only.
ModelInputChunk = EncodedTextChunk


class ModelInput(StrictBase):
    """A sequence of token chunks fed to the model."""

    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> "ModelInput":
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for chunk in self.chunks:
            out.extend(chunk.tokens)
        return out

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> "ModelInput":
        """A new ModelInput with `chunk` added at the end (this one is unchanged)."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> "ModelInput":
        """A new ModelInput with one more token at the end (this one is unchanged)."""
        return self.append(EncodedTextChunk(tokens=[int(token)]))


TensorDtype = Literal["int64", "float32"]

_NUMPY_DTYPE = {"int64": np.int64, "float32": np.float32}


class TensorData(StrictBase):
    """A flat list of numbers plus dtype and shape (Tinker's tensor container)."""

    data: Union[list[int], list[float]]
    dtype: TensorDtype
    shape: Optional[list[int]] = None

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "TensorData":
        array = np.asarray(array)
        if array.dtype.kind in "iub":
            dtype: TensorDtype = "int64"
        elif array.dtype.kind == "f":
            dtype = "float32"
        else:
            raise TypeError(f"TensorData supports integer and float arrays, got dtype {array.dtype}")
        array = array.astype(_NUMPY_DTYPE[dtype], copy=False)
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> "TensorData":
        return cls.from_numpy(_torch_to_numpy(tensor))

    def to_numpy(self) -> np.ndarray:
        array = np.asarray(self.data, dtype=_NUMPY_DTYPE[self.dtype])
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> Any:
        import torch  # only forward_backward_custom users need torch on the client

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():  # numpy has no bfloat16; TensorData floats are float32
        tensor = tensor.float()
    return tensor.numpy()


# Loss inputs whose dtype is fixed by their meaning (Tinker converts the same way): token
# ids, and the per-token numbers the registry's losses read (weights, logprobs, advantages).
_LOSS_INPUT_DTYPES: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    **{name: "float32" for inputs in LOSS_INPUTS.values() for name in inputs},
}


def _to_tensor_data(name: str, value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, dict):
        return TensorData.model_validate(value)
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        value = _torch_to_numpy(value)
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":  # not object, complex (no silent cast), str, ...
        raise ValueError(
            f"loss_fn_inputs[{name!r}] must be integer or float numbers, "
            f"got {type(value).__name__} of dtype {array.dtype}"
        )
    dtype = _LOSS_INPUT_DTYPES.get(name)
    if dtype is not None:
        array = array.astype(_NUMPY_DTYPE[dtype])
    return TensorData.from_numpy(array)


class Datum(StrictBase):
    """One training example: the model input plus the loss function's per-token inputs."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_inputs(cls, value: Any) -> Any:
        # ValueError, not TypeError: pydantic turns only the former into a ValidationError.
        if not isinstance(value, dict):
            raise ValueError(
                f"loss_fn_inputs must be a dict of name -> array, got {type(value).__name__}"
            )
        return {name: _to_tensor_data(name, v) for name, v in value.items()}


class SamplingParams(StrictBase):
    max_tokens: Optional[int] = None
    seed: Optional[int] = None
    # A string, a list of strings, or a list of token ids. None keeps the implicit
    # end-of-sequence stop.
    stop: Union[str, list[str], list[int], None] = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class AdamParams(StrictBase):
    """AdamW hyperparameters (decoupled weight decay; grad_clip_norm 0 = no clipping)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "AdamParams":
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0 or not self.grad_clip_norm >= 0:
            raise ValueError("weight_decay and grad_clip_norm must be >= 0")
        return self


# -------------------------------------------------------------------------- outputs

class ForwardBackwardOutput(StrictBase):
    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


class OptimStepResponse(StrictBase):
    metrics: Optional[dict[str, float]] = None


class RewindResponse(StrictBase):
    """TrainingClient.rewind's result (a workbench extension; Tinker has no rewind)."""

    steps: int  # optim_steps undone
    step: int  # the run's optim_step count now (the server's, checkpoints included)
    rewindable: int  # how many more can be undone
    type: Literal["rewind"] = "rewind"


class SaveWeightsResponse(StrictBase):
    path: str
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerResponse(StrictBase):
    path: str
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class LoadWeightsResponse(StrictBase):
    path: str
    type: Literal["load_weights"] = "load_weights"


StopReason = Literal["length", "stop"]


class SampledSequence(StrictBase):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: Optional[list[float]] = None


class SampleResponse(StrictBase):
    sequences: list[SampledSequence]
    prompt_logprobs: Optional[list[Optional[float]]] = None
    topk_prompt_logprobs: Optional[list[Optional[list[tuple[int, float]]]]] = None
    type: Literal["sample"] = "sample"


class ModelData(StrictBase):
    arch: str
    model_name: str
    tokenizer_id: Optional[str] = None


class GetInfoResponse(StrictBase):
    model_id: str
    model_data: ModelData
    model_name: str
    is_lora: bool = True
    lora_rank: Optional[int] = None
    type: Literal["get_info"] = "get_info"


class SupportedModel(StrictBase):
    model_name: str
    parameters: Optional[int] = None  # of the base model, LoRA excluded
    context_length: Optional[int] = None  # max tokens of one sequence
    family: Optional[str] = None  # transformers model_type, e.g. "qwen3", "llama"
    tokenizer: Optional[str] = None  # tokenizer class, or the name get_tokenizer takes


class GetServerCapabilitiesResponse(StrictBase):
    supported_models: list[SupportedModel]
    losses: list[str] = []  # loss_fn names forward_backward accepts
    max_lora_rank: Optional[int] = None
    cycle_mode: Optional[str] = None  # "continuous" or "clock <N> ms"


class Checkpoint(StrictBase):
    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler"]
    time: str
    path: str
    size_bytes: Optional[int] = None

    @property
    def tinker_path(self) -> str:  # Tinker's name for the same thing
        return self.path


class Cursor(StrictBase):
    """Pagination of a listing: where this page starts, its size and how many exist."""

    offset: int
    limit: int
    total_count: int


class CheckpointsListResponse(StrictBase):
    checkpoints: list[Checkpoint]
    cursor: Optional[Cursor] = None  # None for unpaginated listings (one run's checkpoints)


class TrainingRun(StrictBase):
    training_run_id: str
    base_model: str
    model_owner: str = ""
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: Optional[int] = None
    last_request_time: Optional[str] = None
    last_checkpoint: Optional[Checkpoint] = None
    last_sampler_checkpoint: Optional[Checkpoint] = None
    user_metadata: Optional[dict[str, str]] = None


class TrainingRunsResponse(StrictBase):
    training_runs: list[TrainingRun]
    cursor: Cursor
