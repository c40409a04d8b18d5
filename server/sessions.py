"""Client sessions, one book for both frontends (ZeroMQ and the Tinker HTTP gateway).

A session is a client's lifetime on the server, keyed by (tenant, session id): the same id
of two tenants names two sessions. Its members are the training runs and the samplers
(snapshot adapters) created in it; a member created without a session is a session of its
own (``run:<id>`` / ``sampler:<id>``).

- Sign of life: a heartbeat, or any request that names the session or one of its members
  (`touch`, `touch_member`); attaching a member counts too.
- Parking: `sweep` parks every session silent for `timeout` seconds: `on_park(ids)` with
  its members' ids (state kept, adapters off the accelerator). A session without members
  has nothing to keep and is forgotten instead.
- Unparking: the next sign of life of a parked session calls `on_unpark(ids)` before the
  caller queues its request, so the adapters come back first.
- Finishing (the Tinker SDK's ``sessions/{id}/finish``, i.e. its ``close()``): the session's
  members are parked at once, as if it had gone silent, and `finished` tells the frontend to
  refuse its heartbeats. A later request to one of its members still unparks it: the runs
  keep their state, and whoever holds their id may use them.

- Ending: whenever a session is parked (silent or finished) or forgotten, `on_gone(tenant,
  session id, member ids)` lets the owner cancel the requests it still has queued (the
  server's `scheduler.cancel_session`). Signs of life that those cancellations cause (a
  frontend touching the session as a request completes) are ignored: they do not unpark it.

Every change publishes ``publish({session, state: "parked" | "resumed", runs, samplers,
reason?})`` (parked events say why: "silent" or "finished"); with `publish_to` it is
``publish_to(tenant, event)`` instead, so that the frontend sends it to that tenant only (topic
"session" of its event subscriptions), never to other tenants.

Thread-safe: both frontends' threads and the engine thread (request completions) call in.
The callbacks run under the lock, so parks and unparks reach them in the order they were
decided; they must be quick and must not call back into this object from another thread
(queueing the action, as `server.__main__.Parking` does, is the intended use).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

Key = tuple[str, str]  # (tenant, session id)


def _ignore(*_args) -> None:
    return None


@dataclass
class _Session:
    seen: float  # clock time of the last sign of life
    runs: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    parked: bool = False

    @property
    def members(self) -> list[str]:
        return [*self.runs, *self.samplers]


class Sessions:
    def __init__(
        self,
        timeout: float,
        on_park: Callable[[list[str]], None] = _ignore,
        on_unpark: Callable[[list[str]], None] = _ignore,
        publish: Callable[[dict], None] = _ignore,
        clock: Callable[[], float] = time.monotonic,
        remember_finished: int = 4096,
        on_gone: Callable[[str, str, list[str]], None] = _ignore,
        publish_to: Optional[Callable[[str, dict], None]] = None,
    ):
        if timeout <= 0:
            raise ValueError(f"session timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self.on_park, self.on_unpark, self.publish = on_park, on_unpark, publish
        self.on_gone, self.publish_to = on_gone, publish_to
        self._ending: set[Key] = set()  # sessions whose on_gone is running (on this thread)
        self.clock = clock
        self._lock = threading.RLock()
        self._sessions: dict[Key, _Session] = {}
        self._owner: dict[str, Key] = {}  # run or sampler id -> its session
        # Finished sessions, bounded: only used to refuse their heartbeats.
        self._finished: "OrderedDict[Key, None]" = OrderedDict()
        self._remember_finished = remember_finished

    # ------------------------------------------------------------ signs of life

    def touch(self, tenant: str, session_id: str) -> Key:
        """A sign of life of a session (created if new); unparks it if it was parked."""
        key = (tenant, session_id)
        with self._lock:
            if key in self._ending:  # a cancelled request's completion: no sign of life
                return key
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = _Session(self.clock())
            self._alive(key, session)
        return key

    def touch_member(self, tenant: str, member_id: str) -> Optional[Key]:
        """A sign of life of the session that holds run or sampler `member_id`; None when
        no session of `tenant` holds it (unknown, or another tenant's: the request then
        fails as "not found" further on)."""
        with self._lock:
            key = self._owner.get(member_id)
            if key is None or key[0] != tenant:
                return None
            if key not in self._ending:
                self._alive(key, self._sessions[key])
            return key

    def touch_request(self, tenant: str, args: dict) -> Optional[Key]:
        """A sign of life of the session a request belongs to: the one its `session_id`
        names, else the one holding its `model_id` or `sampler_id`; None when it names no
        known session. Both frontends call this for every request they queue."""
        session_id = args.get("session_id")
        if isinstance(session_id, str) and session_id:
            return self.touch(tenant, session_id)
        for name in ("model_id", "sampler_id"):
            if isinstance(args.get(name), str):
                return self.touch_member(tenant, args[name])
        return None

    def _alive(self, key: Key, session: _Session) -> None:
        session.seen = self.clock()
        if session.parked:
            session.parked = False
            self.on_unpark(session.members)
            self._emit(key, {"session": key[1], "state": "resumed", "runs": list(session.runs),
                             "samplers": list(session.samplers)})

    # ------------------------------------------------------------ membership

    def attach(self, tenant: str, session_id: Optional[str], member_id: str, kind: str = "run") -> Key:
        """Record that run (kind "run") or sampler (kind "sampler") `member_id` was created
        in `session_id` (a session of its own when None); a sign of life of that session."""
        if kind not in ("run", "sampler"):
            raise ValueError(f"kind must be 'run' or 'sampler', got {kind!r}")
        key = self.touch(tenant, session_id or f"{kind}:{member_id}")
        with self._lock:
            session = self._sessions[key]
            members = session.runs if kind == "run" else session.samplers
            if member_id not in members:
                members.append(member_id)
            self._owner[member_id] = key
        return key

    def session_of(self, tenant: str, member_id: str) -> Optional[str]:
        """The session id holding `member_id` for `tenant`, or None."""
        with self._lock:
            key = self._owner.get(member_id)
        return key[1] if key is not None and key[0] == tenant else None

    def members(self, tenant: str, session_id: str) -> dict[str, list[str]]:
        """{"runs": [...], "samplers": [...]} of a session (empty lists if unknown)."""
        with self._lock:
            session = self._sessions.get((tenant, session_id))
            if session is None:
                return {"runs": [], "samplers": []}
            return {"runs": list(session.runs), "samplers": list(session.samplers)}

    def is_parked(self, tenant: str, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.get((tenant, session_id))
            return session is not None and session.parked

    # ------------------------------------------------------------ parking

    def sweep(self) -> list[Key]:
        """Park every session silent for `timeout` seconds; returns the keys parked now.
        Silent sessions without members are forgotten."""
        parked = []
        with self._lock:
            now = self.clock()
            for key, session in list(self._sessions.items()):
                if session.parked or now - session.seen < self.timeout:
                    continue
                if not session.members:
                    del self._sessions[key]
                    self._gone(key, [])
                    continue
                self._park(key, session, "silent")
                parked.append(key)
        return parked

    def finish(self, tenant: str, session_id: str) -> None:
        """The client ended its session: park its members now and refuse its heartbeats."""
        key = (tenant, session_id)
        with self._lock:
            self._finished[key] = None
            self._finished.move_to_end(key)
            while len(self._finished) > self._remember_finished:
                self._finished.popitem(last=False)
            session = self._sessions.get(key)
            if session is None:
                return
            if not session.members:
                del self._sessions[key]
                self._gone(key, [])
            elif not session.parked:
                self._park(key, session, "finished")
            else:  # parked after silence already: nothing left queued, but make sure
                self._gone(key, session.members)

    def finished(self, tenant: str, session_id: str) -> bool:
        with self._lock:
            return (tenant, session_id) in self._finished

    def _park(self, key: Key, session: _Session, reason: str) -> None:
        session.parked = True
        self.on_park(session.members)
        self._emit(key, {"session": key[1], "state": "parked", "reason": reason,
                         "runs": list(session.runs), "samplers": list(session.samplers)})
        self._gone(key, session.members)

    def _gone(self, key: Key, members: list[str]) -> None:
        """The session's client is gone: let the owner cancel its queued requests. The
        completions that cancelling causes may touch the session: `_ending` ignores them."""
        self._ending.add(key)
        try:
            self.on_gone(key[0], key[1], list(members))
        finally:
            self._ending.discard(key)

    def _emit(self, key: Key, event: dict) -> None:
        if self.publish_to is not None:
            self.publish_to(key[0], event)
        else:
            self.publish(event)
