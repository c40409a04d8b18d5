"""The op table (server/ops.py) is the one list of ops: every client call, every gateway
route and every runner handler maps onto exactly one entry, and every entry is reached."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server import ops
from server.frontend import Frontend
from server.runner import CycleRunner
from server.scheduler import Scheduler, Work
from workbench import wire
from workbench.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parents[1]


def _string_args(tree: ast.AST, method: str, position: int) -> set[str]:
    """String constants passed as positional argument `position` of calls to `*.method(...)`
    (or `method(...)`)."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or len(node.args) <= position:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        arg = node.args[position]
        if name == method and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.add(arg.value)
    return found


def client_ops() -> set[str]:
    """Every op the SDK sends: `connection.call("op", ...)`, `wire.request(id, "op", ...)`,
    and the training client's `_forward("op", ...)`."""
    sent = set()
    for path in (ROOT / "workbench").rglob("*.py"):
        tree = ast.parse(path.read_text())
        sent |= _string_args(tree, "call", 0) | _string_args(tree, "request", 1) | _string_args(tree, "_forward", 0)
    return sent


def gateway_ops() -> dict[str, set[str]]:
    """Per route handler of the Tinker gateway, the ops it queues: constants given to
    `_submit(tenant, "op", ...)` / `_rest(request, "op", ...)`, or chosen as `op = "a" if ... else "b"`."""
    tree = ast.parse((ROOT / "server" / "tinker_http.py").read_text())
    per_handler = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.AsyncFunctionDef) or fn.name in ("_rest",):
            continue
        queued = _string_args(fn, "_submit", 1) | _string_args(fn, "_rest", 1)
        for node in ast.walk(fn):
            if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "op" for t in node.targets)
                    and isinstance(node.value, ast.IfExp)):
                queued |= {v.value for v in (node.value.body, node.value.orelse) if isinstance(v, ast.Constant)}
        if queued:
            per_handler[fn.name] = queued
    return per_handler


def test_phases_are_an_ordered_enum_without_gaps():
    assert [p.value for p in ops.Phase] == list(range(len(ops.Phase)))
    assert ops.Phase.ADMIN < ops.Phase.TRAIN < ops.Phase.OPTIM < ops.Phase.SAMPLE < ops.Phase.CHECKPOINT


def test_every_client_call_is_one_entry_and_every_entry_is_called():
    sent = client_ops()
    assert sent - set(ops.OPS) == set(), "the SDK sends ops the server does not have"
    # ping is a liveness probe for tools and tests (no SDK method); every other op is reachable.
    assert set(ops.OPS) - sent == {"ping"}


def test_every_gateway_route_queues_ops_of_the_table():
    routes = gateway_ops()
    assert routes, "no gateway handler found"
    for handler, queued in routes.items():
        for name in queued:
            assert name in ops.OPS and ops.OPS[name].queued, f"{handler} queues {name!r}"
    # The gateway is a second frontend on the same scheduler: it queues nothing the SDK does not.
    assert set().union(*routes.values()) <= client_ops()


def test_every_queued_op_has_exactly_one_executor_in_the_runner():
    runner = CycleRunner(engine=None, store=None)
    for name, op in ops.OPS.items():
        if not op.queued:
            assert name not in runner.handlers
            continue
        batched = op.phase in runner.batched
        assert batched != (name in runner.handlers), f"{name}: handled {'twice' if batched else 'nowhere'}"
    assert set(runner.handlers) <= set(ops.OPS)


def test_every_immediate_op_is_answered_by_the_frontend():
    frontend = Frontend(Scheduler(), keys={}, info=lambda: {})
    for name, op in ops.OPS.items():
        if not op.queued:
            assert isinstance(frontend._immediate(name, {"session_id": "s"}, "tenant"), dict), name


def test_the_wire_docstring_documents_every_op():
    documented = wire.__doc__
    for name in ops.OPS:
        assert f"\n    {name} " in documented or f" {name}\n" in documented or f"{name} /" in documented \
            or f"/ {name}" in documented, f"{name} is missing from workbench.wire's op list"


def test_check_args_names_the_op_and_the_field():
    with pytest.raises(InvalidRequestError, match="unknown op 'nope'"):
        ops.check_args("nope", {}, ops.Limits())
    with pytest.raises(InvalidRequestError) as info:
        ops.check_args("load_state", {"model_id": "run-1"}, ops.Limits())
    assert info.value.where == "path" and "load_state needs argument 'path'" in info.value.message
    with pytest.raises(InvalidRequestError, match=r"rank must be an integer in \[1, 8\]"):
        ops.check_args("create_model", {"base_model": "m", "rank": 16}, ops.Limits(max_rank=8))
    args = {"model_id": "run-1", "adam_params": {"learning_rate": 0.5}}
    ops.check_args("optim_step", args, ops.Limits())
    assert args["adam_params"]["beta1"] == 0.9  # normalised to AdamParams' full field set


def test_queue_and_cost_come_from_the_table():
    def of(name, args):
        return Work.of(name, "t", args, done=lambda result, error: None)

    assert of("optim_step", {"model_id": "run-1"}).queue == "run-1"
    assert of("save_state", {"model_id": "run-1"}).phase is ops.Phase.CHECKPOINT
    assert of("get_training_run", {"run_id": "run-1"}).queue == "admin:t"  # a listing is admin work
    assert of("compute_logprobs", {"sampler_id": "s", "prompt": [1, 2]}).tokens == 2
