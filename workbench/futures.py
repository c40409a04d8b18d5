"""APIFuture: what every client call returns at once.

Backed by a `concurrent.futures.Future` that the client's I/O thread resolves, so it works
the same from plain scripts, other threads, asyncio code and a running Jupyter kernel
(`.result()` blocks only the calling thread; `await` never blocks the event loop). No
nest_asyncio, ever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Generator, Generic, Optional, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    def __init__(self, inner: Optional[concurrent.futures.Future] = None):
        self._inner: concurrent.futures.Future = inner or concurrent.futures.Future()

    # Resolution (called by the I/O thread or by a chained future) ----------------
    def _set_result(self, value: T) -> None:
        if not self._inner.done():
            self._inner.set_result(value)

    def _set_exception(self, exc: BaseException) -> None:
        if not self._inner.done():
            self._inner.set_exception(exc)

    # The public surface ----------------------------------------------------------
    def result(self, timeout: Optional[float] = None) -> T:
        """Wait for the result (at most `timeout` seconds; TimeoutError after that)."""
        try:
            return self._inner.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no result within {timeout} s; the request is still queued "
                               "or running on the server") from None

    def done(self) -> bool:
        return self._inner.done()

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return self._inner.exception(timeout)

    def add_done_callback(self, fn: Callable[["APIFuture[T]"], Any]) -> None:
        """Call fn(self) once done (on the I/O thread, or at once if already done)."""
        self._inner.add_done_callback(lambda _: fn(self))

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._inner).__await__()

    async def result_async(self, timeout: Optional[float] = None) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self._inner), timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {state}>"


def map_future(source: APIFuture, fn: Callable[[Any], T]) -> APIFuture[T]:
    """A future resolved with fn(source.result()) (errors pass through)."""
    out: APIFuture[T] = APIFuture()

    def forward(_: APIFuture) -> None:
        exc = source.exception()
        if exc is not None:
            out._set_exception(exc)
            return
        try:
            out._set_result(fn(source.result()))
        except BaseException as err:  # a conversion bug must surface, not hang the caller
            out._set_exception(err)

    source.add_done_callback(forward)
    return out


def completed(value: T) -> APIFuture[T]:
    future: APIFuture[T] = APIFuture()
    future._set_result(value)
    return future
