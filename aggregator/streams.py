"""Upload-stream resources: concurrent-stream caps (per client and per server) and idle / overall time limits.

gRPC's synchronous server gives each call a pool thread for its whole life, and a call blocked reading its request
stream cannot be woken by the handler. So each upload gets a small reader thread that moves messages into a
1-slot queue; the handler waits on that queue with a timeout, and on an idle or overall timeout it raises the
refusal, which aborts the call with DEADLINE_EXCEEDED (the reader then ends with the call). Capping the number of
uploads below the pool size keeps threads free for the control RPCs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from prufed.common.refusals import RefusalCode, Refused

T = TypeVar("T")
_END = object()


class StreamSlots:
    """Counts open upload streams; `hold(client)` refuses beyond `per_client` or `total`."""

    def __init__(self, per_client: int, total: int):
        self.per_client = per_client
        self.total = total
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def open_streams(self) -> int:
        with self._lock:
            return sum(self._open.values())

    @contextlib.contextmanager
    def hold(self, client_id: str) -> Iterator[None]:
        with self._lock:
            mine = self._open.get(client_id, 0)
            if mine >= self.per_client:
                raise Refused(RefusalCode.TOO_MANY_STREAMS, f"client {client_id} already has {mine} upload streams "
                                                            f"open (max_uploads_per_client {self.per_client})")
            if sum(self._open.values()) >= self.total:
                raise Refused(RefusalCode.SERVER_BUSY, f"the server has {self.total} upload streams open "
                                                       f"(max_concurrent_uploads); retry later")
            self._open[client_id] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                self._open[client_id] -= 1
                if not self._open[client_id]:
                    del self._open[client_id]


def timed(messages: Iterator[T], idle_s: float, deadline_s: float,
          clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """`messages`, but raising `stream_idle` after `idle_s` without a message and `stream_deadline` once
    `deadline_s` have passed since the call (both DEADLINE_EXCEEDED)."""
    slot: queue.Queue = queue.Queue(maxsize=1)  # one message in hand: memory stays at one chunk per stream
    stop = threading.Event()

    def read() -> None:
        try:
            for message in messages:
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        slot.put(message, timeout=0.5)
                        break
                if stop.is_set():
                    return
            item: object = _END
        except Exception as exc:  # the call ended (cancelled, aborted): hand the error to the consumer
            item = exc
        with contextlib.suppress(queue.Full):
            slot.put(item, timeout=1.0)

    threading.Thread(target=read, name="upload-reader", daemon=True).start()
    end = clock() + deadline_s
    try:
        while True:
            left = end - clock()
            if left <= 0:
                raise Refused(RefusalCode.STREAM_DEADLINE, f"the upload took longer than upload_deadline_s "
                                                           f"({deadline_s:g} s)")
            try:
                item = slot.get(timeout=min(idle_s, left))
            except queue.Empty:
                if clock() >= end:
                    continue  # report the overall deadline
                raise Refused(RefusalCode.STREAM_IDLE, f"the upload stream sent nothing for stream_idle_s "
                                                       f"({idle_s:g} s)") from None
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
