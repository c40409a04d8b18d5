"""The op table: every request op the server knows, one entry each.

An entry says when a cycle runs the op (its `Phase`, or None when a frontend answers it at
once), the arguments it requires and their types, what the caller must own, and what it
costs in engine tokens. Both frontends check requests with `check_args`, the scheduler
orders and costs work by `OPS[op]`, and the runner dispatches by it. Adding an op is one
entry here plus its handler in the runner; tests/test_ops.py ties every client call and
every gateway route to an entry, and every queued entry to a runner handler.

No torch and no sockets here: the books and the frontends import this.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

from workbench.errors import InvalidRequestError


class Phase(enum.IntEnum):
    """The order a cycle executes in (DESIGN §4). A run's queue is taken up to the first
    request whose phase goes backwards, so a forward_backward and the optim_step behind it
    share a cycle."""

    ADMIN = 0  # create runs and samplers, tokenizers, store listings: alone, in arrival order
    TRAIN = 1  # forward / forward_backward of all runs, packed into shared passes
    OPTIM = 2  # the optim_steps of the runs that asked, in one multi-tensor AdamW
    SAMPLE = 3  # sample / compute_logprobs of all samplers, batched together
    CHECKPOINT = 4  # save_state, save_weights_for_sampler, load_state


# What the caller must own for the op to reach anything:
#   server   nothing: answered from the server's own facts (any valid key)
#   session  its client session (named by session_id)
#   tenant   its own records: new runs and samplers, its runs and checkpoints in the store
#   run      the training run args["model_id"] (another tenant's reads as not found)
#   sampler  the sampling session args["sampler_id"]
Owner = Literal["server", "session", "tenant", "run", "sampler"]


@dataclass(frozen=True)
class Limits:
    """Per-request bounds every frontend applies before queueing (server flags)."""

    max_rank: int = 128  # --max-rank
    max_samples: int = 256  # --max-samples: num_samples of one sample request
    max_request_tokens: int = 1 << 20  # --max-request-tokens: engine tokens of one request


def _no_cost(args: dict) -> int:
    return 0


def _train_cost(args: dict) -> int:
    return sum(len(d["tokens"]) for d in args["data"])


def _prompt_cost(args: dict) -> int:
    return len(args["prompt"])


def _sample_cost(args: dict) -> int:
    """The prompt plus every token the request may generate."""
    params = args.get("sampling_params") or {}
    return len(args["prompt"]) + int(params.get("max_tokens") or 0) * int(args.get("num_samples", 1))


def _check_cost(name: str, args: dict, limits: Limits) -> None:
    tokens = token_cost(name, args)
    if tokens > limits.max_request_tokens:
        raise InvalidRequestError(
            f"this {name.replace('_', ' ')} would cost {tokens} engine tokens, over this server's limit of "
            f"{limits.max_request_tokens} per request (--max-request-tokens); split it into "
            "smaller requests", "data" if name == "forward" else "prompt" if name == "compute_logprobs"
            else "num_samples")


def _check_data(args: dict, limits: Limits) -> None:
    for i, datum in enumerate(args["data"]):
        if not isinstance(datum, dict) or "tokens" not in datum or not isinstance(datum.get("loss_fn_inputs"), dict):
            raise InvalidRequestError("each datum needs tokens and loss_fn_inputs", f"data[{i}]")
    _check_cost("forward", args, limits)


def _check_sample(args: dict, limits: Limits) -> None:
    """Bounds the engine memory one request can take: its rows (num_samples) and tokens."""
    num_samples = args.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or not 1 <= num_samples <= limits.max_samples:
        raise InvalidRequestError(
            f"num_samples must be an integer in [1, {limits.max_samples}] (this server's "
            f"--max-samples), got {num_samples!r}", "num_samples")
    _check_cost("sample", args, limits)


def _check_prompt(args: dict, limits: Limits) -> None:
    _check_cost("compute_logprobs", args, limits)


def _check_adam(args: dict, limits: Limits) -> None:
    """Normalises adam_params in place to AdamParams' full, validated field set."""
    from workbench.types import AdamParams  # pydantic: only when an optim_step arrives

    try:
        args["adam_params"] = AdamParams(**args["adam_params"]).model_dump()
    except Exception as exc:
        raise InvalidRequestError(f"bad adam_params: {exc}", "adam_params") from None


def _check_rewind(args: dict, limits: Limits) -> None:
    steps = args["steps"]
    if isinstance(steps, bool) or steps < 1:
        raise InvalidRequestError(f"rewind: steps must be an integer >= 1 (how many optim_steps to undo), "
                                  f"got {steps!r}", "steps")


def _check_new_run(args: dict, limits: Limits) -> None:
    if args.get("from_state"):
        return  # the checkpoint's rank, checked when it is read
    rank = args.get("rank", 32)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limits.max_rank:
        raise InvalidRequestError(
            f"rank must be an integer in [1, {limits.max_rank}] (this server's --max-rank), "
            f"got {rank!r}", "rank")


@dataclass(frozen=True)
class Op:
    name: str
    phase: Optional[Phase]  # None: a frontend answers at once; never queued
    owner: Owner
    args: Mapping[str, type] = field(default_factory=dict)  # required name -> type (object: any)
    cost: Callable[[dict], int] = _no_cost  # engine tokens, what a tenant's fair share counts
    check: Optional[Callable[[dict, Limits], None]] = None  # checks beyond the types (no model)

    @property
    def queued(self) -> bool:
        return self.phase is not None


_TABLE = (
    # answered by the frontend at once
    Op("hello", None, "server"),
    Op("ping", None, "server"),
    Op("heartbeat", None, "session", {"session_id": str}),
    Op("get_server_capabilities", None, "server"),
    Op("subscribe_events", None, "tenant"),  # this connection gets its tenant's events
    Op("end_session", None, "session", {"session_id": str}),  # goodbye: queued work cancelled
    # admin
    Op("get_tokenizer", Phase.ADMIN, "server", {"base_model": str}),
    Op("create_model", Phase.ADMIN, "tenant", check=_check_new_run),
    Op("create_sampling_session", Phase.ADMIN, "tenant"),
    Op("list_training_runs", Phase.ADMIN, "tenant"),
    Op("get_training_run", Phase.ADMIN, "tenant", {"run_id": str}),
    Op("list_checkpoints", Phase.ADMIN, "tenant", {"run_id": str}),
    Op("list_user_checkpoints", Phase.ADMIN, "tenant"),
    Op("delete_checkpoint", Phase.ADMIN, "tenant", {"path": str}),
    Op("get_checkpoint_files", Phase.ADMIN, "tenant", {"path": str}),
    # training
    Op("forward", Phase.TRAIN, "run", {"model_id": str, "data": list, "loss_fn": str},
       _train_cost, _check_data),
    Op("forward_backward", Phase.TRAIN, "run", {"model_id": str, "data": list, "loss_fn": str},
       _train_cost, _check_data),
    Op("optim_step", Phase.OPTIM, "run", {"model_id": str, "adam_params": dict}, check=_check_adam),
    # sampling
    Op("sample", Phase.SAMPLE, "sampler", {"sampler_id": str, "prompt": object}, _sample_cost, _check_sample),
    Op("compute_logprobs", Phase.SAMPLE, "sampler", {"sampler_id": str, "prompt": object}, _prompt_cost,
       _check_prompt),
    # checkpoints
    Op("save_state", Phase.CHECKPOINT, "run", {"model_id": str}),
    Op("save_weights_for_sampler", Phase.CHECKPOINT, "run", {"model_id": str}),
    Op("load_state", Phase.CHECKPOINT, "run", {"model_id": str, "path": str}),
    # after the run's queued work of the cycle (Tinker's unload_model)
    Op("unload_model", Phase.CHECKPOINT, "run", {"model_id": str}),
    # undo optim_steps (workbench only): after the run's train and optim work taken with it,
    # in submission order, so gradients queued before it are discarded and work after it
    # waits for the next cycle
    Op("rewind", Phase.CHECKPOINT, "run", {"model_id": str, "steps": int}, check=_check_rewind),
)

OPS: Mapping[str, Op] = {op.name: op for op in _TABLE}
assert len(OPS) == len(_TABLE), "an op is listed twice"


def get(name: Any) -> Op:
    """The entry of op `name`; InvalidRequestError for an op the server does not have."""
    op = OPS.get(name) if isinstance(name, str) else None
    if op is None:
        raise InvalidRequestError(f"unknown op {name!r}", "op")
    return op


def check_args(name: str, args: dict, limits: Limits) -> Op:
    """What every frontend checks before it queues an op (no model needed): a known op, the
    types of the fields it relies on, and the op's own checks. Returns the entry."""
    op = get(name)
    for arg, kind in op.args.items():
        if arg not in args:
            raise InvalidRequestError(f"{name} needs argument {arg!r}", arg)
        if kind is not object and not isinstance(args[arg], kind):
            raise InvalidRequestError(f"{name}: {arg} must be a {kind.__name__}", arg)
    if op.check is not None:
        op.check(args, limits)
    return op


def token_cost(name: str, args: dict) -> int:
    """Engine tokens a request will cost: what the fair share of a cycle is counted in.
    Malformed values count 0 (the runner rejects them)."""
    try:
        return max(0, OPS[name].cost(args))
    except (TypeError, ValueError, AttributeError, OverflowError, KeyError):
        return 0


def queue_of(name: str, tenant: str, args: dict) -> str:
    """The queue a request waits in: its run's, its sampler's, or its tenant's admin queue
    (admin work runs alone, in arrival order)."""
    owner = OPS[name].owner
    queue = {"run": args.get("model_id"), "sampler": args.get("sampler_id")}.get(owner)
    return queue if isinstance(queue, str) and queue else f"admin:{tenant}"
