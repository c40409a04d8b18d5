"""ServiceClient: the entry point. Connects to a server, or starts an embedded one."""

from __future__ import annotations

import copy
import os
import uuid
import weakref
from typing import Any, Optional, Sequence

from . import types
# connection_for lives with the connection; re-exported here for old imports.
from .connection import connection_for, resolve_server_key
from .events import DEFAULT_TOPICS, EventStream
from .rest_client import RestClient
from .sampling_client import SamplingClient
from .training_client import TrainingClient
from .wire import check_curve_key


class ServiceClient:
    """`ServiceClient(base_url=None, api_key=None, server_public_key=None)`.

    The URL comes from `base_url` or WORKBENCH_URL; the key from `api_key` or
    WORKBENCH_API_KEY. With no URL at all, an embedded local server is started (loopback,
    random port and key, CUDA when present, built-in tiny models) and stopped at exit.
    `connect_timeout`: seconds to wait for the server's first answer before saying it is
    unreachable (and how to start one).
    `server_public_key` (or WORKBENCH_SERVER_KEY): the z85 public key of a server started
    with --curve-secret-file (its ready line's curve_public_key, or the PATH.pub file). With
    it, requests, replies and the event stream are CURVE-encrypted and the server is
    authenticated; without it such a server does not answer at all.
    """

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 connect_timeout: float = 60.0, server_public_key: "str | bytes | None" = None,
                 **_: Any):
        url = base_url or os.environ.get("WORKBENCH_URL")
        self.local_server = None
        server_key = resolve_server_key(server_public_key)  # a bad key fails before any start
        if not url:
            from .local import shared_local_server

            self.local_server = shared_local_server()
            url, api_key = self.local_server.url, self.local_server.api_key
            embedded_key = self.local_server.server_public_key  # set if started with CURVE
            server_key = check_curve_key(embedded_key) if embedded_key else None
        key = api_key or os.environ.get("WORKBENCH_API_KEY")
        if not key:
            raise ValueError(
                f"no API key for {url}: pass api_key= or set WORKBENCH_API_KEY to the key the "
                "server was started with"
            )
        self.base_url = url
        self._connection = connection_for(url, key, connect_timeout, server_key)
        # One session per ServiceClient: the I/O thread heartbeats it while this object lives,
        # so the server can tell live sessions from abandoned ones.
        self.session_id = uuid.uuid4().hex
        self._connection.add_session(self.session_id)
        self._finalizer = weakref.finalize(self, self._connection.remove_session, self.session_id)
        # At interpreter exit the connection's goodbye ends the session (workbench.connection),
        # so the finalizer must not drop it from the heartbeat set first.
        self._finalizer.atexit = False

    @property
    def server_info(self) -> dict:
        """What the server said in its hello reply (a copy): protocol, server version,
        tenant (whom this client's key names), events_url, cycle (then), max_message_bytes,
        and what it serves (device, models, ...)."""
        return copy.deepcopy(self._connection.hello or {})

    @property
    def events_url(self) -> Optional[str]:
        """The server's public event stream (a ZeroMQ PUB socket, topic ``cycle``), from its
        hello: each cycle's anonymous aggregate only (cycle, start, seconds, tenants, runs,
        requests by op, tokens, queue_depth), no run ids, tenant names or metrics. Your own
        events come through `events()`."""
        return (self._connection.hello or {}).get("events_url")

    def events(self, topics: Sequence[str] = DEFAULT_TOPICS) -> EventStream:
        """This tenant's events on these topics ("cycle", "session"): the process's shared
        `EventStream` for this connection. They come on the request socket, subscribed with
        this client's API key (and CURVE-encrypted when it has a server key): every cycle's
        aggregate figures plus this tenant's own ``run_metrics`` and ``queue_depth_by_tenant``
        entry, and its own sessions' events; never another tenant's. Subscribe with
        ``stream.subscribe(fn)``; ``stream.latest`` is the last event."""
        return EventStream.for_connection(self._connection, topics)

    @property
    def server_public_key(self) -> Optional[str]:
        """The server's z85 CURVE public key this client encrypts to; None: no CURVE."""
        key = self._connection.server_public_key
        return key.decode() if key is not None else None

    def close(self) -> None:
        """End this client's session: heartbeats stop and the server is told (a goodbye,
        waited for at most a few seconds). The server parks the session's runs and samplers
        at once and cancels their requests still queued: each fails with "cancelled: the
        client session ended"; requests already running finish. Closing twice does nothing.
        Leaving a ``with ServiceClient(...) as service:`` block closes it; so does the
        interpreter's exit, for clients never closed.

        The connection stays shared with other clients of the same URL and key; an embedded
        server keeps running until the process exits (``local_server.stop()`` ends it now).
        """
        if self._finalizer.alive:
            self._finalizer()
            self._connection.end_session(self.session_id)

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------- creation

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: Optional[int] = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: Optional[dict[str, str]] = None,
    ) -> TrainingClient:
        args = {
            "base_model": base_model, "rank": int(rank), "seed": seed,
            "train_mlp": train_mlp, "train_attn": train_attn, "train_unembed": train_unembed,
            "user_metadata": user_metadata, "session_id": self.session_id,
        }
        reply = self._connection.call("create_model", args).result()
        return TrainingClient(self, reply["model_id"], base_model, int(rank), reply.get("arch", ""),
                              reply.get("trainable_parameters"))

    def create_training_client_from_state(self, path: str) -> TrainingClient:
        """A new run initialised with a checkpoint's weights (fresh optimizer)."""
        return self._from_state(path, optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient:
        """A new run initialised with a checkpoint's weights and Adam state."""
        return self._from_state(path, optimizer=True)

    def _from_state(self, path: str, optimizer: bool) -> TrainingClient:
        reply = self._connection.call("create_model", {"base_model": "", "from_state": path,
                                                        "optimizer": optimizer,
                                                        "session_id": self.session_id}).result()
        return TrainingClient(self, reply["model_id"], reply["base_model"], int(reply["rank"]),
                              reply.get("arch", ""), reply.get("trainable_parameters"))

    def create_sampling_client(
        self, model_path: Optional[str] = None, base_model: Optional[str] = None
    ) -> SamplingClient:
        if not model_path and not base_model:
            raise ValueError("create_sampling_client needs model_path or base_model")
        reply = self._connection.call(
            "create_sampling_session", {"model_path": model_path, "base_model": base_model,
                                        "session_id": self.session_id}  # parked with this client
        ).result()
        return SamplingClient(self._connection, reply["sampler_id"], reply["base_model"], model_path)

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        reply = self._connection.call("get_server_capabilities", {}).result()
        return types.GetServerCapabilitiesResponse.model_validate(reply)

    def create_rest_client(self) -> RestClient:
        """Runs and checkpoints: list, inspect, delete, download."""
        return RestClient(self._connection)

    # --------------------------------------------------------- async variants

    async def create_lora_training_client_async(self, *args: Any, **kwargs: Any) -> TrainingClient:
        import asyncio

        return await asyncio.to_thread(self.create_lora_training_client, *args, **kwargs)

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> SamplingClient:
        import asyncio

        return await asyncio.to_thread(self.create_sampling_client, *args, **kwargs)

    async def create_training_client_from_state_async(self, path: str) -> TrainingClient:
        import asyncio

        return await asyncio.to_thread(self.create_training_client_from_state, path)

    async def create_training_client_from_state_with_optimizer_async(self, path: str) -> TrainingClient:
        import asyncio

        return await asyncio.to_thread(self.create_training_client_from_state_with_optimizer, path)

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        import asyncio

        return await asyncio.to_thread(self.get_server_capabilities)

    def __repr__(self) -> str:
        where = "embedded" if self.local_server else "remote"
        return f"ServiceClient({self.base_url!r}, {where})"
