"""Step panel: drive a training client one step at a time from buttons.

Buttons only enqueue commands; one background worker thread runs them against the SDK.
That matters in Jupyter: button clicks (comm messages) are handled on the kernel's shell
channel, so a handler that waited for the server would freeze the notebook, and clicks made
while a cell runs wait until it ends. Here the cell returns at once and buttons keep working
while a "run N" is going (pause / resume act between steps).
"""

from __future__ import annotations

import html
import itertools
import queue
import threading
import traceback
from typing import Any, Iterable, Iterator, Optional

from workbench.events import EventStream

from .common import Throttle, widget_bundle


def _as_batch(item: Any) -> list:
    from workbench import types

    if isinstance(item, types.Datum):
        return [item]
    if not isinstance(item, (list, tuple)):
        raise TypeError(f"a batch must be a list of Datum, got {type(item).__name__}")
    batch = list(item)
    for i, datum in enumerate(batch):
        if not isinstance(datum, (types.Datum, dict)):
            raise TypeError(f"batch item {i} is a {type(datum).__name__}, expected a types.Datum")
    return batch


class BatchSource:
    """Batches from a list (cycled, so "run N" never runs dry) or an iterator (used once)."""

    def __init__(self, batches: Any):
        import pydantic

        from workbench import types

        if isinstance(batches, (types.Datum, pydantic.BaseModel, str, bytes, dict)):
            raise TypeError("--batches needs a list or iterable of batches (lists of Datum), "
                            f"got {type(batches).__name__}")
        if isinstance(batches, (list, tuple)):
            if not batches:
                raise ValueError("--batches is an empty list")
            # A flat list of datums is one batch, repeated.
            if all(isinstance(b, types.Datum) for b in batches):
                batches = [list(batches)]
            for i, batch in enumerate(batches):  # fail now, not on the first click
                try:
                    _as_batch(batch)
                except TypeError as exc:
                    raise TypeError(f"--batches[{i}]: {exc}") from None
            self._it: Iterator = itertools.cycle(batches)
        elif isinstance(batches, Iterable):
            self._it = iter(batches)
        else:
            raise TypeError(f"--batches must be a list or iterable of batches, got {type(batches).__name__}")
        self.served = 0

    def next(self) -> list:
        batch = _as_batch(next(self._it))  # StopIteration propagates: the source is exhausted
        self.served += 1
        return batch


class _Tracked:
    """A submitted future whose result() also waits until the panel has counted it done
    (a future's waiters wake before its done-callbacks run)."""

    def __init__(self, future: Any):
        self.future = future
        self.counted = threading.Event()

    def result(self) -> Any:
        value = self.future.result()
        self.counted.wait(5)
        return value


class StepPanel:
    def __init__(self, client: Any, batches: Any, learning_rate: float = 1e-4,
                 loss_fn: str = "cross_entropy", events: Optional[EventStream] = None, run_n: int = 10):
        import ipywidgets as w

        if not hasattr(client, "forward_backward") or not hasattr(client, "optim_step"):
            raise TypeError(f"the step panel needs a TrainingClient, got {type(client).__name__}")
        self.client = client
        self.source = BatchSource(batches)
        self.loss_fn = loss_fn
        self.events = events
        # Start from the client's count of completed optim_steps (the step its listeners
        # get), then follow the listener.
        self.step = int(client.optim_steps)
        self.last_loss: Optional[float] = None
        self.pending = 0
        self.status = "idle"
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        self._outstanding = 0
        self._idle = threading.Condition(self._lock)
        self._running = threading.Event()
        self._running.set()  # set = not paused
        self._commands: "queue.Queue[Optional[tuple]]" = queue.Queue()

        def button(label: str, cls: str, action) -> Any:
            b = w.Button(description=label, layout=w.Layout(width="auto"))
            b.add_class(cls)
            b.on_click(lambda _: action())
            return b

        self.fb_button = button("forward_backward", "wb-fb", lambda: self.enqueue("forward_backward"))
        self.optim_button = button("optim_step", "wb-optim", lambda: self.enqueue("optim_step"))
        self.step_button = button("step", "wb-step", lambda: self.enqueue("step"))
        # Rewinds the run's last optim_step (TrainingClient.rewind); the step count follows.
        self.undo_button = button("undo", "wb-undo", lambda: self.enqueue("undo"))
        if not 1 <= int(run_n) <= 100000:
            raise ValueError(f"run_n must be in 1..100000, got {run_n}")
        self.detached = False
        self.run_count = w.BoundedIntText(value=int(run_n), min=1, max=100000, layout=w.Layout(width="80px"))
        self.run_button = button("run N", "wb-run", lambda: self.enqueue("run", self.run_count.value))
        self.pause_button = button("pause", "wb-pause", self.toggle_pause)
        self.lr = w.FloatText(value=float(learning_rate), description="lr", layout=w.Layout(width="180px"))
        self.info = w.HTML()
        self.info.add_class("wb-step-panel-info")
        self.widget = w.VBox([
            w.HBox([self.fb_button, self.optim_button, self.step_button, self.undo_button,
                    self.run_count, self.run_button, self.pause_button, self.lr]),
            self.info,
        ])
        self.widget.add_class("wb-step-panel")
        self.throttle = Throttle(self._render)
        client.add_listener(self._on_result)
        if events is not None:
            events.subscribe(self._on_event)
        self._worker = threading.Thread(target=self._work, name="workbench-step-panel", daemon=True)
        self._worker.start()
        self._render()

    # ---------------------------------------------------------------- commands

    def enqueue(self, command: str, *args: Any) -> None:
        """Queue a command for the worker: forward_backward, optim_step, step, undo (rewind
        the last optim_step), run N."""
        if command not in ("forward_backward", "optim_step", "step", "undo", "run"):
            raise ValueError(f"unknown step-panel command {command!r}")
        if self.detached:
            raise RuntimeError(f"this step panel is {self.status}: make a new one with %tinker step")
        with self._lock:
            self._outstanding += 1
        self._commands.put((command, *args))
        self.throttle.request()

    def toggle_pause(self) -> None:
        if self._running.is_set():
            self._running.clear()
            self.pause_button.description = "resume"
        else:
            self._running.set()
            self.pause_button.description = "pause"
        self.throttle.request()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every queued command has run (tests; never called from a handler)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def _work(self) -> None:
        while True:
            command = self._commands.get()
            if command is None:
                return
            try:
                self._execute(*command)
            except StopIteration:
                self.error = "the batch source is exhausted"
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()
                self.status = "idle" if self._outstanding == 0 else "queued"
                self.throttle.request()

    def _execute(self, command: str, *args: Any) -> None:
        self._running.wait()  # paused: commands wait here, in order
        self.error = None
        if command == "forward_backward":
            self._track(self.client.forward_backward(self.source.next(), self.loss_fn)).result()
        elif command == "optim_step":
            self._track(self._optim()).result()
        elif command == "step":
            self._one_step()
        elif command == "undo":
            self._track(self.client.rewind(1)).result()
        else:
            total = int(args[0])
            for i in range(total):
                self._running.wait()
                self.status = f"running {i + 1}/{total}"
                self._one_step()

    def _one_step(self) -> None:
        # Submitted back to back so the server runs both in one clock cycle.
        fb = self._track(self.client.forward_backward(self.source.next(), self.loss_fn))
        opt = self._track(self._optim())
        fb.result()
        opt.result()

    def _optim(self) -> Any:
        from workbench import types

        return self.client.optim_step(types.AdamParams(learning_rate=float(self.lr.value)))

    def _track(self, future: Any) -> "_Tracked":
        with self._lock:
            self.pending += 1
        tracked = _Tracked(future)

        def done(_: Any) -> None:
            with self._lock:
                self.pending -= 1
            tracked.counted.set()
            self.throttle.request()

        future.add_done_callback(done)
        self.throttle.request()
        return tracked

    # ----------------------------------------------------------------- feeding

    def _on_result(self, step: int, kind: str, metrics: dict) -> None:
        self.step = step
        if kind == "forward_backward":
            loss = metrics.get("loss:sum")
            if loss is not None:
                self.last_loss = float(loss)
        self.throttle.request()

    def _on_event(self, event: dict) -> None:
        self.throttle.request()

    @property
    def cycle(self) -> Optional[int]:
        latest = self.events.latest if self.events is not None else None
        return None if latest is None else int(latest.get("cycle", 0))

    # ----------------------------------------------------------------- drawing

    def info_html(self) -> str:
        loss = "-" if self.last_loss is None else f"{self.last_loss:.5g}"
        cycle = "-" if self.cycle is None else str(self.cycle)
        state = "paused" if self.paused else self.status
        error = f' · <span style="color:#c00">{html.escape(self.error)}</span>' if self.error else ""
        return (f'<div style="font-family:monospace">step <b class="wb-step-count">{self.step}</b>'
                f' · last loss <b class="wb-last-loss">{loss}</b>'
                f' · pending futures <b class="wb-pending">{self.pending}</b>'
                f' · cycle <b class="wb-cycle">{cycle}</b>'
                f' · <span class="wb-state">{html.escape(state)}</span>{error}</div>')

    def _render(self) -> None:
        self.info.value = self.info_html()

    def flush(self) -> None:
        self.throttle.flush_now()

    def __repr__(self) -> str:
        loss = "-" if self.last_loss is None else f"{self.last_loss:.5g}"
        return (f"StepPanel({getattr(self.client, 'model_id', '?')}: step {self.step}, last loss {loss}, "
                f"pending {self.pending}, {'paused' if self.paused else self.status})")

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return widget_bundle(self.widget, repr(self), self.info_html())

    def detach(self, reason: str = "disconnected") -> None:
        """Stop the worker and listeners; the panel stays on screen with its last figures and
        its buttons disabled (`%tinker stop` detaches). Commands still queued are dropped."""
        if self.detached:
            return
        self.detached = True
        while True:  # drop queued commands: nothing may reach a closed connection
            try:
                if self._commands.get_nowait() is not None:
                    with self._idle:
                        self._outstanding -= 1
                        self._idle.notify_all()
            except queue.Empty:
                break
        self._running.set()
        self._commands.put(None)
        try:
            self.client.remove_listener(self._on_result)
        except (AttributeError, ValueError):
            pass
        if self.events is not None:
            self.events.unsubscribe(self._on_event)  # kept: its last cycle stays shown
        for widget in self.widget.children[0].children:
            widget.disabled = True
        self.status = reason
        self.throttle.flush_now()

    def close(self) -> None:
        self.detach()
        self.throttle.cancel()
        for widget in (*self.widget.children[0].children, self.widget.children[0], self.info, self.widget):
            widget.close()
