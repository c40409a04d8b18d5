"""The ZeroMQ frontend: sockets, auth, idempotency, argument checks, replies, events.

One I/O thread (the caller of `serve`) owns every socket. Requests arrive on a ROUTER;
replies produced on the engine thread are handed back through a queue plus an inproc
wake-up socket, because ZeroMQ sockets must never be shared between threads. Cycle figures
go out on a PUB socket (topic b"cycle").

The frontend never runs tensor code: it checks envelopes and keys, answers metadata ops at
once, and turns engine ops into `Work` for the scheduler.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

import zmq

from workbench import wire
from workbench.errors import (
    AuthenticationError, InvalidRequestError, ProtocolError, WorkbenchError,
)

from .scheduler import PHASES, Scheduler, Work, as_error

SERVER_VERSION = "0.1.0"
_WAKE_ADDR = "inproc://workbench-replies"


class Frontend:
    def __init__(
        self,
        scheduler: Scheduler,
        keys: dict[str, str],
        info: Callable[[], dict],
        max_message_bytes: int = 256 * 1024 * 1024,
        reply_cache: int = 4096,
    ):
        self.scheduler = scheduler
        self.keys = keys  # api key -> tenant
        self.info = info  # metadata for hello / capabilities (models available, ...)
        self.max_message_bytes = max_message_bytes
        self.ctx = zmq.Context.instance()
        self._outbox: "queue.Queue[tuple[bytes, str, str, dict]]" = queue.Queue()
        self._wake_lock = threading.Lock()
        self._wake_push: Optional[zmq.Socket] = None
        # (tenant, request id) -> encoded reply, or None while in flight. Bounded LRU.
        self._replies: "OrderedDict[tuple[str, str], Optional[list]]" = OrderedDict()
        self._reply_cache = reply_cache
        self._stop = threading.Event()
        self.url = ""
        self.events_url = ""

    # --------------------------------------------------------------- sockets

    def bind(self, host: str, port: int) -> str:
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if port == 0:
            port = self.router.bind_to_random_port(f"tcp://{host}")
        else:
            self.router.bind(f"tcp://{host}:{port}")
        events_port = self.pub.bind_to_random_port(f"tcp://{host}")
        self.wake_pull = self.ctx.socket(zmq.PULL)
        self.wake_pull.bind(_WAKE_ADDR)
        self.url = f"tcp://{host}:{port}"
        self.events_url = f"tcp://{host}:{events_port}"
        return self.url

    def _wake(self) -> None:
        # Called from the engine thread; a PUSH socket used only under this lock.
        with self._wake_lock:
            if self._wake_push is None:
                self._wake_push = self.ctx.socket(zmq.PUSH)
                self._wake_push.setsockopt(zmq.LINGER, 0)
                self._wake_push.connect(_WAKE_ADDR)
            self._wake_push.send(b"", zmq.NOBLOCK)

    def publish(self, topic: str, event: dict) -> None:
        """Queue an event for the PUB socket (thread-safe)."""
        self._outbox.put((b"", "", "event", {"topic": topic, **event}))
        self._wake()

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            if self.wake_pull in ready:
                while True:
                    try:
                        self.wake_pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            self._flush_outbox()
            if self.router in ready:
                for _ in range(1000):  # bounded, so replies are never starved
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(frames)
        self._flush_outbox()
        for sock in (self.router, self.pub, self.wake_pull):
            sock.close(0)
        if self._wake_push is not None:
            with self._wake_lock:
                self._wake_push.close(0)

    def _flush_outbox(self) -> None:
        while True:
            try:
                identity, tenant, request_id, message = self._outbox.get_nowait()
            except queue.Empty:
                return
            if request_id == "event" and not identity:
                self.pub.send_multipart([message["topic"].encode(), *wire.encode(message)])
                continue
            frames = wire.encode(message)
            self._remember(tenant, request_id, frames)
            self._send(identity, frames)

    def _send(self, identity: bytes, frames: list) -> None:
        try:
            self.router.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError:
            pass  # the peer went away; its reply stays cached for a resend

    def _remember(self, tenant: str, request_id: str, frames: list) -> None:
        if not request_id:
            return
        self._replies[(tenant, request_id)] = frames
        self._replies.move_to_end((tenant, request_id))
        while len(self._replies) > self._reply_cache:
            self._replies.popitem(last=False)

    # -------------------------------------------------------------- requests

    def _on_message(self, frames: list) -> None:
        identity = frames[0].bytes
        request_id: Optional[str] = None
        try:
            message = wire.decode(frames[1:])
            if isinstance(message, dict) and isinstance(message.get("id"), str):
                request_id = message["id"]
            message = wire.check_request(message)
            tenant = self.keys.get(message["key"])
            if tenant is None:
                raise AuthenticationError("unknown API key; pass the key the server was started with "
                                          "(api_key= or WORKBENCH_API_KEY)")
            cached = self._replies.get((tenant, request_id))
            if (tenant, request_id) in self._replies:
                if cached is not None:  # a resent id gets the original reply
                    self._send(identity, cached)
                return  # still in flight: its reply will come once
            self._dispatch(identity, tenant, message)
        except Exception as exc:
            error = as_error(exc)
            self._send(identity, wire.encode(wire.error_reply(request_id, error.to_wire())))

    def _dispatch(self, identity: bytes, tenant: str, message: dict) -> None:
        op, args, request_id = message["op"], message["args"], message["id"]
        immediate = self._immediate(op, args, tenant)
        if immediate is not None:
            self._send(identity, wire.encode(wire.ok_reply(request_id, immediate)))
            return
        if op not in PHASES:
            raise InvalidRequestError(f"unknown op {op!r}", "op")
        _check_args(op, args)
        queue_name = args.get("model_id") or args.get("sampler_id") or f"admin:{tenant}"

        def done(result: Any, error: Optional[BaseException]) -> None:
            reply = (
                wire.ok_reply(request_id, result) if error is None
                else wire.error_reply(request_id, as_error(error).to_wire())
            )
            self._outbox.put((identity, tenant, request_id, reply))
            self._wake()

        tokens = sum(len(d["tokens"]) for d in args.get("data", ()))
        self._replies[(tenant, request_id)] = None  # in flight
        try:
            self.scheduler.submit(Work(op, tenant, queue_name, args, done, tokens=tokens))
        except WorkbenchError:
            del self._replies[(tenant, request_id)]
            raise

    def _immediate(self, op: str, args: dict, tenant: str) -> Optional[dict]:
        if op == "hello":
            return {
                "protocol": wire.PROTOCOL_VERSION, "server": SERVER_VERSION, "tenant": tenant,
                "events_url": self.events_url, "cycle": self.scheduler.cycle, **self.info(),
            }
        if op == "ping":
            return {"time": time.time(), "cycle": self.scheduler.cycle}
        if op == "get_server_capabilities":
            return {"supported_models": [{"model_name": m} for m in self.info()["models"]]}
        return None


_REQUIRED = {
    "create_model": {},
    "create_sampling_session": {},
    "get_tokenizer": {"base_model": str},
    "forward": {"model_id": str, "data": list, "loss_fn": str},
    "forward_backward": {"model_id": str, "data": list, "loss_fn": str},
    "optim_step": {"model_id": str, "adam_params": dict},
    "save_state": {"model_id": str},
    "save_weights_for_sampler": {"model_id": str},
    "load_state": {"model_id": str, "path": str},
    "sample": {"sampler_id": str, "prompt": object},
    "compute_logprobs": {"sampler_id": str, "prompt": object},
}


def _check_args(op: str, args: dict) -> None:
    """Shape checks that need no model: types of the fields every op relies on."""
    for name, kind in _REQUIRED[op].items():
        if name not in args:
            raise InvalidRequestError(f"{op} needs argument {name!r}", name)
        if kind is not object and not isinstance(args[name], kind):
            raise InvalidRequestError(f"{op}: {name} must be a {kind.__name__}", name)
    if op in ("forward", "forward_backward"):
        for i, datum in enumerate(args["data"]):
            if not isinstance(datum, dict) or "tokens" not in datum or not isinstance(datum.get("loss_fn_inputs"), dict):
                raise InvalidRequestError("each datum needs tokens and loss_fn_inputs", f"data[{i}]")
    if op == "optim_step":
        from workbench.types import AdamParams

        try:
            args["adam_params"] = AdamParams(**args["adam_params"]).model_dump()
        except Exception as exc:
            raise InvalidRequestError(f"bad adam_params: {exc}", "adam_params") from None
