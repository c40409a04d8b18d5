"""The scheduler's books alone (no engine, no sockets): fair shares, prefixes, shutdown."""

from __future__ import annotations

import threading

import pytest

from server.scheduler import Scheduler, Work, finish, run_loop
from workbench.errors import QueueFullError, ServerError


def work(op: str, tenant: str, queue: str, tokens: int = 0) -> Work:
    return Work(op, tenant, queue, {}, done=lambda result, error: None, tokens=tokens)


def taken(plan) -> list[tuple[str, str]]:
    return [(w.queue, w.op) for w in plan.works()]


def test_a_flooding_tenant_gets_its_share_and_the_other_tenant_its_step():
    books = Scheduler(cycle_tokens=40)
    for _ in range(10):
        books.submit(work("forward", "flood", "run-a", tokens=15))
    books.submit(work("forward_backward", "quiet", "run-b", tokens=15))
    books.submit(work("optim_step", "quiet", "run-b"))
    first = taken(books.next_plan())
    assert first.count(("run-a", "forward")) == 1  # 40 tokens / 2 tenants = 20 each: 15, then 15 > 5 left
    assert ("run-b", "forward_backward") in first and ("run-b", "optim_step") in first
    cycles = 1
    while books.queue_depth():
        plan = taken(books.next_plan())
        cycles += 1
        assert len(plan) <= 2  # alone, the flood may use all 40 tokens: 15 + 15 (+ 15 > 10 left)
    assert cycles == 6  # 1 + ceil(9 / 2)


def test_without_a_cap_a_run_takes_its_whole_prefix_up_to_one_optim_step():
    books = Scheduler()
    for op in ("forward_backward", "forward_backward", "optim_step", "forward_backward", "optim_step"):
        books.submit(work(op, "t", "run", tokens=1000))
    assert [op for _, op in taken(books.next_plan())] == ["forward_backward", "forward_backward", "optim_step"]
    assert [op for _, op in taken(books.next_plan())] == ["forward_backward", "optim_step"]


def test_the_first_request_of_a_run_is_taken_even_over_the_share():
    books = Scheduler(cycle_tokens=10)
    books.submit(work("forward_backward", "t", "run", tokens=500))
    books.submit(work("optim_step", "t", "run"))
    assert [op for _, op in taken(books.next_plan())] == ["forward_backward", "optim_step"]


def test_queue_limit_and_close():
    books = Scheduler(queue_limit=2)
    books.submit(work("forward", "t", "run"))
    books.submit(work("forward", "t", "run"))
    with pytest.raises(QueueFullError, match="limit 2"):
        books.submit(work("forward", "t", "run"))
    books.submit(work("forward", "other", "run-2"))  # the limit is per tenant
    assert len(books.close()) == 3 and books.queue_depth() == 0
    with pytest.raises(ServerError, match="shutting down"):
        books.submit(work("forward", "t", "run"))


def test_work_of_picks_the_queue_and_the_token_cost_every_frontend_uses():
    def of(op, args):
        return Work.of(op, "t", args, done=lambda result, error: None)

    train = of("forward_backward", {"model_id": "run-1", "data": [{"tokens": [1, 2, 3]}, {"tokens": [4]}]})
    assert (train.queue, train.tokens) == ("run-1", 4)
    sample = of("sample", {"sampler_id": "s-1", "prompt": [1, 2], "num_samples": 3,
                           "sampling_params": {"max_tokens": 5}})
    assert (sample.queue, sample.tokens) == ("s-1", 2 + 3 * 5)
    assert (of("compute_logprobs", {"sampler_id": "s-1", "prompt": [1, 2, 3]}).tokens) == 3
    admin = of("create_model", {"base_model": "m", "rank": 8})
    assert (admin.queue, admin.tokens) == ("admin:t", 0)
    assert of("sample", {"sampler_id": "s-1", "prompt": None}).tokens == 0  # malformed: the runner rejects it


def test_queue_depth_by_tenant_counts_what_stays_queued():
    books = Scheduler(cycle_tokens=20)
    for _ in range(3):
        books.submit(work("forward", "flood", "run-a", tokens=15))
    books.submit(work("forward", "quiet", "run-b", tokens=5))
    assert books.queue_depth_by_tenant() == {"flood": 3, "quiet": 1}
    books.next_plan()  # a share of 10 each: one request of each tenant
    assert books.queue_depth_by_tenant() == {"flood": 2}
    assert books.queue_depth() == sum(books.queue_depth_by_tenant().values())
    books.close()
    assert books.queue_depth_by_tenant() == {}


def test_cycle_events_carry_the_queue_depth_per_tenant_beside_the_total():
    books = Scheduler(cycle_tokens=20)
    for _ in range(3):
        books.submit(work("forward", "flood", "run-a", tokens=15))
    books.submit(work("forward", "quiet", "run-b", tokens=5))
    events: list[dict] = []
    stop = threading.Event()

    def execute(plan) -> dict:
        for w in plan.works():
            finish(w, {})
        return {"runs": len({w.queue for w in plan.works()})}

    def on_cycle(event: dict) -> None:
        events.append(event)
        if not books.queue_depth():
            stop.set()

    loop = threading.Thread(target=run_loop, args=(books, execute, stop, 0, on_cycle))
    loop.start()
    loop.join(10)
    stop.set()
    assert not loop.is_alive()
    assert [e["queue_depth_by_tenant"] for e in events] == [{"flood": 2}, {"flood": 1}, {}]
    assert [e["queue_depth"] for e in events] == [2, 1, 0]
    assert [e["tenants"] for e in events] == [2, 1, 1]


def test_with_several_tenants_a_backlog_takes_at_most_the_quantum_of_a_cycle():
    books = Scheduler(cycle_tokens=100_000, tenant_quantum=40)
    for _ in range(50):
        books.submit(work("forward_backward", "flood", "run-a", tokens=15))
    books.submit(work("forward_backward", "quiet", "run-b", tokens=15))
    books.submit(work("optim_step", "quiet", "run-b"))
    first = taken(books.next_plan())
    assert first.count(("run-a", "forward_backward")) == 2  # 15 + 15; a third would pass 40
    assert ("run-b", "optim_step") in first
    alone = taken(books.next_plan())  # the flood alone is not held back by the quantum
    assert len(alone) == 48


def test_clients_stepping_in_lockstep_share_cycles_instead_of_taking_turns():
    """Two tenants each send their next step when their last one is answered; one of them a few
    milliseconds later than the other. The engine waits (at most gather_ms after a cycle's
    replies) for a run it just served, so both share every cycle: without that wait the first
    arrival would start a cycle alone and the two would alternate."""
    import time

    books = Scheduler()
    steps = {"alice": 0, "bob": 0}
    stop = threading.Event()
    events: list[dict] = []

    def send(tenant: str) -> None:
        if steps[tenant] == 6:
            return
        steps[tenant] += 1

        def done(result, error, tenant=tenant):  # the client: next step on reply, bob 3 ms late
            threading.Timer(0.003 if tenant == "bob" else 0.0, send, args=(tenant,)).start()

        books.submit(Work("forward_backward", tenant, f"run-{tenant}", {}, done=lambda r, e: None))
        books.submit(Work("optim_step", tenant, f"run-{tenant}", {}, done=done))

    def execute(plan) -> dict:
        time.sleep(0.01)  # the engine's pass
        for w in plan.works():
            finish(w, {})
        return {}

    def on_cycle(event: dict) -> None:
        events.append(event)
        if steps == {"alice": 6, "bob": 6} and not books.queue_depth():
            stop.set()

    send("alice")
    send("bob")
    loop = threading.Thread(target=run_loop, args=(books, execute, stop, 0, on_cycle), kwargs={"gather_ms": 150})  # wide: a loaded CI box
    loop.start()
    loop.join(20)
    stop.set()
    assert not loop.is_alive()
    assert [e["tenants"] for e in events] == [2] * 6
