"""The session book alone (no server, no sockets): signs of life, parking after silence,
unparking on the next request, finishing, tenants kept apart, and threads."""

from __future__ import annotations

import threading

import pytest

from server.sessions import Sessions


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Book:
    """A Sessions with a hand-driven clock that records every callback, in order."""

    def __init__(self, timeout: float = 10.0):
        self.clock = Clock()
        self.calls: list[tuple[str, list[str]]] = []
        self.events: list[dict] = []
        self.sessions = Sessions(timeout, on_park=lambda ids: self.calls.append(("park", ids)),
                                 on_unpark=lambda ids: self.calls.append(("unpark", ids)),
                                 publish=self.events.append, clock=self.clock)

    def later(self, seconds: float) -> None:
        self.clock.now += seconds


def test_silence_parks_a_sessions_runs_and_samplers_and_its_next_request_unparks_them():
    book = Book(timeout=10)
    s = book.sessions
    s.touch("alice", "nb-1")
    s.attach("alice", "nb-1", "run-a")
    s.attach("alice", "nb-1", "sampler-x", kind="sampler")
    book.later(9.9)
    assert s.sweep() == [] and book.calls == []
    s.touch("alice", "nb-1")  # a heartbeat resets the clock
    book.later(9.9)
    assert s.sweep() == []
    book.later(0.2)
    assert s.sweep() == [("alice", "nb-1")] and s.is_parked("alice", "nb-1")
    assert book.calls == [("park", ["run-a", "sampler-x"])]
    assert book.events == [{"session": "nb-1", "state": "parked", "reason": "silent",
                            "runs": ["run-a"], "samplers": ["sampler-x"]}]
    book.later(100)
    assert s.sweep() == [] and len(book.calls) == 1  # parked once, not again on every sweep
    # A request naming the sampler is a sign of life of its session: everything comes back.
    assert s.touch_member("alice", "sampler-x") == ("alice", "nb-1")
    assert book.calls[-1] == ("unpark", ["run-a", "sampler-x"]) and not s.is_parked("alice", "nb-1")
    assert book.events[-1]["state"] == "resumed" and book.events[-1]["runs"] == ["run-a"]
    s.touch_member("alice", "run-a")  # not parked: no second unpark
    assert [c[0] for c in book.calls] == ["park", "unpark"]


def test_a_member_without_a_session_is_a_session_of_its_own():
    book = Book(timeout=5)
    s = book.sessions
    assert s.attach("t", None, "run-1") == ("t", "run:run-1")
    assert s.attach("t", None, "sampler-2", kind="sampler") == ("t", "sampler:sampler-2")
    assert s.session_of("t", "run-1") == "run:run-1"
    book.later(5)
    assert sorted(s.sweep()) == [("t", "run:run-1"), ("t", "sampler:sampler-2")]
    assert sorted(ids for _, ids in book.calls) == [["run-1"], ["sampler-2"]]
    with pytest.raises(ValueError, match="kind"):
        s.attach("t", None, "x", kind="model")


def test_a_request_is_a_sign_of_life_of_the_session_it_names_or_its_run_or_samplers():
    """touch_request, the one rule both frontends apply to every request they queue."""
    book = Book(timeout=10)
    s = book.sessions
    s.attach("alice", "nb-1", "run-a")
    s.attach("alice", "nb-2", "sampler-x", kind="sampler")
    book.later(10)
    assert sorted(s.sweep()) == [("alice", "nb-1"), ("alice", "nb-2")]
    assert s.touch_request("alice", {"model_id": "run-a", "data": []}) == ("alice", "nb-1")
    assert not s.is_parked("alice", "nb-1") and s.is_parked("alice", "nb-2")
    assert s.touch_request("alice", {"sampler_id": "sampler-x"}) == ("alice", "nb-2")
    assert not s.is_parked("alice", "nb-2")
    # A named session wins over members; unknown, foreign or missing names touch nothing.
    assert s.touch_request("alice", {"session_id": "nb-3", "model_id": "run-a"}) == ("alice", "nb-3")
    assert s.touch_request("bob", {"model_id": "run-a"}) is None
    assert s.touch_request("alice", {"model_id": "run-zzz"}) is None
    assert s.touch_request("alice", {"session_id": "", "base_model": "tiny-qwen3"}) is None
    assert [c[0] for c in book.calls] == ["park", "park", "unpark", "unpark"]


def test_silent_sessions_without_members_are_forgotten_not_parked():
    book = Book(timeout=1)
    s = book.sessions
    s.touch("t", "empty")
    book.later(2)
    assert s.sweep() == [] and book.calls == [] and book.events == []
    assert s.members("t", "empty") == {"runs": [], "samplers": []}
    s.attach("t", "empty", "run-late")  # the same id later: a fresh session, with its run
    assert s.members("t", "empty") == {"runs": ["run-late"], "samplers": []}


def test_tenants_are_kept_apart():
    book = Book(timeout=10)
    s = book.sessions
    s.attach("alice", "same-id", "run-a")
    s.attach("bob", "same-id", "run-b")
    assert s.members("alice", "same-id")["runs"] == ["run-a"]
    assert s.touch_member("bob", "run-a") is None  # another tenant's run is no sign of life
    assert s.session_of("bob", "run-a") is None and s.session_of("alice", "run-a") == "same-id"
    book.later(6)
    s.touch("bob", "same-id")
    book.later(5)
    assert s.sweep() == [("alice", "same-id")]
    assert book.calls == [("park", ["run-a"])]
    s.touch_member("bob", "run-a")
    assert s.is_parked("alice", "same-id")  # still parked: bob cannot wake alice's runs


def test_finish_parks_at_once_and_marks_the_session_finished():
    book = Book(timeout=60)
    s = book.sessions
    s.attach("t", "sdk-1", "run-1")
    s.finish("t", "sdk-1")
    assert s.finished("t", "sdk-1") and not s.finished("other", "sdk-1")
    assert book.calls == [("park", ["run-1"])]
    assert book.events[-1]["reason"] == "finished"
    s.finish("t", "sdk-1")  # twice: nothing more to park
    assert len(book.calls) == 1
    # Its run keeps its state: a request to it brings it back.
    s.touch_member("t", "run-1")
    assert book.calls[-1] == ("unpark", ["run-1"])
    # Finishing an unknown or empty session only remembers it (heartbeats get refused).
    s.touch("t", "empty")
    s.finish("t", "empty")
    s.finish("t", "never-seen")
    assert s.finished("t", "empty") and s.finished("t", "never-seen") and len(book.calls) == 2


def test_finished_sessions_are_remembered_boundedly():
    s = Sessions(1.0, remember_finished=2)
    for name in ("a", "b", "c"):
        s.finish("t", name)
    assert [s.finished("t", n) for n in ("a", "b", "c")] == [False, True, True]


def test_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout"):
        Sessions(0)


def test_park_and_unpark_reach_the_callbacks_in_decision_order_across_threads():
    """Frontend threads touch while another sweeps: the callbacks alternate park, unpark,
    park, ... (never two of a kind in a row), and the book ends consistent with them."""
    clock = Clock()
    calls: list[str] = []
    s = Sessions(1.0, on_park=lambda ids: calls.append("park"),
                 on_unpark=lambda ids: calls.append("unpark"), clock=clock)
    s.attach("t", "nb", "run-1")
    stop = threading.Event()

    def toucher() -> None:
        while not stop.is_set():
            s.touch_member("t", "run-1")

    threads = [threading.Thread(target=toucher) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(300):
        clock.now += 2.0  # every sweep sees the session silent for longer than the timeout
        s.sweep()
    stop.set()
    for thread in threads:
        thread.join()
    assert calls and calls[0] == "park"
    assert all(a != b for a, b in zip(calls, calls[1:])), calls[:20]
    assert s.is_parked("t", "nb") == (calls[-1] == "park")
