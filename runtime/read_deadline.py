"""A deadline for reading each request, so slow clients cannot hold connections open (uvicorn has none).

uvicorn times out idle keep-alive connections only after a response; a client that connects and sends nothing, or
sends its headers or body a byte at a time, keeps its connection (and a slot of --max-connections) forever. This
protocol starts a clock when a connection opens and when the next request's first byte arrives, stops it when the
request's body is complete, and answers 408 and closes the connection when it runs out.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 2.0  # after the 408, bytes still arriving are read and dropped this long: closing at once would answer them
#                with a reset, which can discard the 408 before the client has read it
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                   b"content-length: %d\r\n\r\n%s")


def read_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline of `seconds` from a request's first byte to its last (for uvicorn.run(http=...))."""

    class ReadDeadlineProtocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None
        lingering = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.start_clock()

        def connection_lost(self, exc) -> None:
            self.stop_clock()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.lingering:
                return
            if self.cycle is None or self.cycle.response_complete:  # between requests: this byte starts the next one
                self.start_clock()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.more_body:
                self.stop_clock()

        def start_clock(self) -> None:
            if self.deadline is None:
                self.deadline = self.loop.call_later(seconds, self.deadline_passed)

        def stop_clock(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def deadline_passed(self) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                message = f"the request was not received within {seconds:g} s (scl-serve --read-timeout)\n".encode()
                self.transport.write(REQUEST_TIMEOUT % (len(message), message))
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app waiting for the body sees the client gone, and its answer goes nowhere
                cycle.message_event.set()
            self.lingering = True
            self.transport.resume_reading()  # flow control may have paused it; lingering reads and drops
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return ReadDeadlineProtocol
