"""Clock cycles: per-run queues -> a cycle plan -> the engine -> replies.

Invariant of a cycle: for every run, the cycle takes the longest prefix of its queue whose
phases never go backwards and which holds at most one optim_step. Phases (`ops.Phase`, one
per op in the op table `server.ops`) are the order a cycle executes in: admin, train, optim,
sample, checkpoint. So a forward_backward and an optim_step submitted back to back land in
the same cycle, and a run's later requests wait for the next cycle. `Scheduler` only keeps
books (queues -> plan); `CycleRunner` executes a plan against the engine and the store.

When a client session ends (its goodbye, or the sweep that parks it after silence), its
requests still queued are taken out with `Scheduler.cancel` and answered with
`SessionEnded` (`cancel_session`); work a cycle already took finishes normally.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from workbench.errors import QueueFullError, RequestFailedError, ServerError, WorkbenchError

from .ops import OPS, Phase, queue_of, token_cost


@dataclass
class Work:
    """One accepted request waiting for its cycle."""

    op: str
    tenant: str
    queue: str  # run id, sampler id, or "admin:<tenant>"
    args: dict
    done: Callable[[Any, Optional[BaseException]], None]  # called once, on the engine thread
    tokens: int = 0
    submitted: float = field(default_factory=time.time)
    # The client session the request belongs to (named, or its run's / sampler's), when the
    # frontend knows it: the session's end cancels the request while it is still queued.
    session: Optional[str] = None

    @property
    def phase(self) -> Phase:
        return OPS[self.op].phase

    @classmethod
    def of(cls, op: str, tenant: str, args: dict, done: Callable) -> "Work":
        """A request as every frontend queues it: on its run's (or sampler's) queue, else
        the tenant's admin queue, costed in engine tokens (both from the op table)."""
        return cls(op, tenant, queue_of(op, tenant, args), args, done, tokens=token_cost(op, args))


@dataclass
class CyclePlan:
    cycle: int
    by_phase: dict[Phase, list[Work]]

    def works(self) -> list[Work]:
        return [w for phase in sorted(self.by_phase) for w in self.by_phase[phase]]


class Scheduler:
    """Thread-safe books: frontends submit, the engine thread takes cycle plans."""

    def __init__(self, queue_limit: int = 256, cycle_tokens: int = 0, tenant_quantum: int = 0):
        self.queue_limit = queue_limit
        self.cycle_tokens = cycle_tokens  # train tokens per cycle, shared by tenants; 0 = no cap
        # With several tenants at work, none takes more than this many tokens of a cycle (its
        # first request excepted), so another's step waits for at most that much of its work
        # per cycle, however long its backlog; 0 = no quantum. A lone tenant is not held back.
        self.tenant_quantum = tenant_quantum
        self._queues: dict[str, deque[Work]] = {}
        self._per_tenant: dict[str, int] = {}
        self._cond = threading.Condition()
        self._cycle = 0
        self._closed = False
        # Queues served by the last cycle, and when its replies went out: clients that
        # step in lockstep send their next request within milliseconds of that.
        self._last_served: frozenset[str] = frozenset()
        self._last_done = -float("inf")

    @property
    def cycle(self) -> int:
        return self._cycle

    def submit(self, work: Work) -> None:
        with self._cond:
            if self._closed:
                raise ServerError("the server is shutting down; this request was not run")
            pending = self._per_tenant.get(work.tenant, 0)
            if pending >= self.queue_limit:
                raise QueueFullError(
                    f"tenant {work.tenant!r} has {pending} requests queued (limit "
                    f"{self.queue_limit}); wait for earlier results before submitting more"
                )
            self._queues.setdefault(work.queue, deque()).append(work)
            self._per_tenant[work.tenant] = pending + 1
            self._cond.notify_all()

    def queue_depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def queue_depth_by_tenant(self) -> dict[str, int]:
        """Requests still queued, per tenant that has any (what --queue-limit counts)."""
        with self._cond:
            return {tenant: n for tenant, n in self._per_tenant.items() if n > 0}

    def wait_for_work(self, timeout: Optional[float]) -> bool:
        with self._cond:
            if not any(self._queues.values()):
                self._cond.wait(timeout)
            return any(self._queues.values())

    def expecting_more(self, window: float) -> bool:
        """True while, within `window` seconds, more work is most likely on the wire:
        - some run's queue ends in a forward_backward submitted less than `window` ago (its
          optim_step follows and should land in the same cycle), or
        - the last cycle's replies went out less than `window` ago and a queue it served has
          nothing queued yet (that client is sending its next step: several clients training
          in lockstep then share each cycle instead of taking turns by a millisecond)."""
        now = time.time()  # the clock of Work.submitted
        with self._cond:
            if now - self._last_done < window and any(not self._queues.get(name) for name in self._last_served):
                return True
            return any(
                q and q[-1].op == "forward_backward" and now - q[-1].submitted < window
                for q in self._queues.values()
            )

    def cycle_done(self, served: Iterable[str]) -> None:
        """The engine finished a cycle that served these queues (its replies are out)."""
        with self._cond:
            self._last_served = frozenset(served)
            self._last_done = time.time()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def cancel(self, predicate: Callable[[Work], bool]) -> list[Work]:
        """Remove every queued request for which `predicate(work)` holds and return them, in
        queue order, so that the caller answers them (work already taken by a cycle is not
        in the queues: it finishes normally)."""
        with self._cond:
            removed: list[Work] = []
            for name, queue in list(self._queues.items()):
                kept = deque()
                for work in queue:
                    (removed if predicate(work) else kept).append(work)
                if len(kept) != len(queue):
                    if kept:
                        self._queues[name] = kept
                    else:
                        del self._queues[name]
            for work in removed:
                self._per_tenant[work.tenant] -= 1
            return removed

    def close(self) -> list[Work]:
        """Refuse further work (submit raises ServerError) and return every queued request,
        removed, so that the caller answers them: the server is shutting down."""
        with self._cond:
            self._closed = True
            works = [w for q in self._queues.values() for w in q]
            self._queues.clear()
            self._per_tenant.clear()
            return works

    def next_plan(self) -> CyclePlan:
        """Take this cycle's work from every queue (see the module docstring).

        Fairness: with a `cycle_tokens` cap, each tenant that has work may take an equal
        share of it (at least one request per run, so every run moves), however many
        requests it has queued; the rest stays queued for later cycles.
        """
        with self._cond:
            self._cycle += 1
            by_phase: dict[Phase, list[Work]] = {}
            by_tenant: dict[str, list[str]] = {}
            for name, queue in self._queues.items():
                if queue:
                    by_tenant.setdefault(queue[0].tenant, []).append(name)
            share = self.cycle_tokens // len(by_tenant) if self.cycle_tokens and by_tenant else None
            if self.tenant_quantum and len(by_tenant) > 1:
                share = self.tenant_quantum if share is None else min(share, self.tenant_quantum)
            for names in by_tenant.values():
                budget = [share]  # one tenant's remaining share, spent across its runs
                for name in names:
                    for work in _take_prefix(self._queues[name], budget):
                        by_phase.setdefault(work.phase, []).append(work)
                        self._per_tenant[work.tenant] -= 1
            for name in [n for n, q in self._queues.items() if not q]:
                del self._queues[name]
            return CyclePlan(self._cycle, by_phase)


def _take_prefix(queue: deque[Work], budget: list) -> list[Work]:
    """The run's longest phase-ordered prefix with at most one optim_step, stopping once
    the tenant's token budget (budget[0], None = unlimited) is spent; the first request
    of a queue is always taken so that no run waits forever behind a large request."""
    taken: list[Work] = []
    phase = -1
    optim_steps = 0
    while queue:
        work = queue[0]
        if work.phase < phase or (work.phase == Phase.OPTIM and optim_steps):
            break
        if work.phase == Phase.ADMIN and taken:  # admin work runs alone, in arrival order
            break
        if taken and budget[0] is not None and work.tokens > budget[0]:
            break
        optim_steps += work.phase == Phase.OPTIM
        phase = work.phase
        taken.append(queue.popleft())
        if budget[0] is not None:
            budget[0] = max(0, budget[0] - work.tokens)
        if work.phase == Phase.ADMIN:
            break
    return taken


def finish(work: Work, result: Any = None, error: Optional[BaseException] = None) -> None:
    try:
        work.done(result, error)
    except Exception:  # a broken reply path must not take the engine thread down
        import traceback

        traceback.print_exc()


def run_loop(
    scheduler: Scheduler,
    execute: Callable[[CyclePlan], dict],
    stop: threading.Event,
    cycle_ms: int = 0,
    on_cycle: Optional[Callable[[dict], None]] = None,
    gather_ms: float = 20.0,
    max_gather_ms: float = 200.0,
    idle: Optional[Callable[[], None]] = None,
) -> None:
    """The engine thread: wait for work (or the clock), run a cycle, publish its figures.
    `idle` runs on this thread whenever a wait ends without work (engine housekeeping, such
    as parking the adapters of silent sessions, must not wait for the next request).

    With cycle_ms 0 a cycle starts as soon as work is queued, except that it waits (up to
    max_gather_ms) while `Scheduler.expecting_more(gather_ms)`: a run's queue ends in a
    forward_backward that arrived less than gather_ms ago (the optim_step a client sends right
    behind it joins the cycle), or a run the last cycle served has not sent its next request
    yet and that cycle ended less than gather_ms ago (runs in lockstep share cycles).
    """
    period = cycle_ms / 1000.0
    next_tick = time.monotonic()
    while not stop.is_set():
        if period > 0:
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            else:
                next_tick = time.monotonic()
            if not scheduler.wait_for_work(0):
                if idle is not None:
                    idle()
                continue
        elif not scheduler.wait_for_work(0.25):
            if idle is not None:
                idle()
            continue
        else:
            deadline = time.monotonic() + max_gather_ms / 1000.0
            while time.monotonic() < deadline and scheduler.expecting_more(gather_ms / 1000.0):
                stop.wait(gather_ms / 4000.0)
        plan = scheduler.next_plan()
        if not plan.by_phase:
            continue
        started = time.time()
        run_metrics = _collect_metrics(plan)
        # Whose each run / sampler is: the frontend sends a tenant only its own run_metrics.
        owners = {w.queue: w.tenant for w in plan.works()}
        figures = execute(plan)
        scheduler.cycle_done(owners)
        event = {
            "cycle": plan.cycle,
            "start": started,
            "seconds": time.time() - started,
            "tenants": len({w.tenant for w in plan.works()}),
            "queue_depth": scheduler.queue_depth(),
            "queue_depth_by_tenant": scheduler.queue_depth_by_tenant(),
            **figures,
            "run_metrics": run_metrics,
            "owners": owners,  # server-side only: frontends never publish it
        }
        if on_cycle is not None:
            on_cycle(event)


def _collect_metrics(plan: CyclePlan) -> dict[str, dict[str, dict]]:
    """Wrap each work's reply callback so that the metrics of its successful result land
    in the returned dict, {run or sampler id: {op: metrics}}, filled while the cycle runs.
    Several requests of one op in a cycle: metrics named "*:sum" add up, others keep the last."""
    collected: dict[str, dict[str, dict]] = {}
    for work in plan.works():
        def done(result: Any, error: Optional[BaseException], work=work, reply=work.done) -> None:
            if error is None and isinstance(result, dict) and isinstance(result.get("metrics"), dict):
                into = collected.setdefault(work.queue, {}).setdefault(work.op, {})
                for key, value in result["metrics"].items():  # several requests: ":sum" adds up
                    into[key] = into.get(key, 0.0) + value if key.endswith(":sum") else value
            reply(result, error)
        work.done = done
    return collected


class SessionEnded(RequestFailedError):
    """A queued request cancelled because its client session ended before it ran (travels
    as a RequestFailedError)."""


def cancel_session(scheduler: Scheduler, tenant: str, session_id: str, members: list[str]) -> list[Work]:
    """Cancel the queued requests of `tenant`'s session `session_id`: those the frontend
    tagged with the session, and those on the queues of its runs and samplers (`members`).
    Each is answered with SessionEnded; returns them."""
    members = set(members)
    works = scheduler.cancel(lambda w: w.tenant == tenant and (w.session == session_id or w.queue in members))
    for work in works:
        finish(work, error=SessionEnded(
            f"cancelled: the client session ended (session {session_id!r} closed or went silent) "
            f"before this {work.op} ran; nothing was changed. Send it again from a live client"))
    return works


def as_error(exc: BaseException) -> WorkbenchError:
    """The error a client is told: a WorkbenchError as it is (the engine's input errors are
    InvalidRequestErrors), anything else as a ServerError naming the exception."""
    if isinstance(exc, WorkbenchError):
        return exc
    return ServerError(f"{type(exc).__name__}: {exc}")
