"""Deadlines for slow clients: uvicorn has none for a request's head or body, so a few hundred sockets that
send a byte a second (a slowloris) hold the connection slots until every request is a 503.

Two guards, one per phase of a request:

* :class:`GuardedH11Protocol` (uvicorn's h11 protocol, subclassed) closes a connection whose request head
  has not fully arrived ``header_seconds`` after the connection opened, or after the previous response
  ended on a keep-alive connection. No request has started then, so nothing is answered: the socket closes.
* :class:`BodyDeadline` (pure ASGI middleware) answers 408, in OpenAI's error shape, when the body has not
  fully arrived ``body_seconds`` after the request started; the app sees a disconnect.

:func:`run` (or :func:`uvicorn_config`, for a server in a thread) starts uvicorn with both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from typing import Any, ClassVar

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from adapterkit.errors import AdapterError
from adapterkit.serve import defaults

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long a client may take to send a request (seconds)."""

    header_seconds: float = 10.0  # from connection open (or the end of the previous response) to the end of the head
    body_seconds: float = 30.0  # from the end of the head to the end of the body

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # bool is an int: True would silently mean one second
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise AdapterError(f"{field.name} must be a positive number of seconds (got {value!r})")
            object.__setattr__(self, field.name, float(value))


# -- the head: a protocol timer -------------------------------------------------------------------------
class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head.

    The timer is armed when the connection opens and again when a response ends (the keep-alive wait for the
    next request counts too); a new request head disarms it. It is not reset by data: a client that sends a
    byte a second is still cut at the deadline.
    """

    header_seconds: ClassVar[float] = Timeouts.header_seconds

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        # uvicorn makes a new RequestResponseCycle for each complete request head, here or from
        # on_response_complete (a pipelined request): a new cycle means the head is in
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:
            self._disarm_head_timer()

    def handle_websocket_upgrade(self, event: Any) -> None:
        # the head of an upgrade is complete too, and the websocket protocol takes the transport over
        self._disarm_head_timer()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        # armed before uvicorn's own handler, which may parse a pipelined head at once (and disarm it again)
        if not self.transport.is_closing():
            self._arm_head_timer()
        super().on_response_complete()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_seconds, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            # no request to answer yet: just close (connection_lost tells h11)
            logger.debug("closing %s: no request head within %s s", self.client, self.header_seconds)
            self.transport.close()


def guarded_protocol(header_seconds: float) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` with this deadline: uvicorn builds protocols from a class and its config,
    so the deadline travels as a class attribute."""
    seconds = Timeouts(header_seconds=header_seconds).header_seconds  # validated
    return type(GuardedH11Protocol.__name__, (GuardedH11Protocol,), {"header_seconds": seconds})


# -- the body: an ASGI deadline -------------------------------------------------------------------------
def _timeout_messages(seconds: float) -> list[Message]:
    """A 408 in OpenAI's error shape that closes the connection (the rest of the body is not waited for)."""
    message = f"the request body did not arrive within {seconds:g} s"
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "request_timeout"}
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"x-content-type-options", b"nosniff"),
    ]
    return [
        {"type": "http.response.start", "status": 408, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


class _Request:
    """One request's ``receive`` and ``send`` under a deadline for its body."""

    def __init__(self, receive: Receive, send: Send, seconds: float) -> None:
        self._receive, self._send, self.seconds = receive, send, seconds
        self.deadline = asyncio.get_running_loop().time() + seconds
        self.body_done = False  # the last body message (or a disconnect) has been received
        self.started = False  # a response has started (the app's, or the 408)
        self.timed_out = False
        self.answered = False  # the 408 was sent: the app's own response is dropped

    async def receive(self) -> Message:
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.body_done:  # after the body, receive only waits for a disconnect: no deadline
            return await self._receive()
        try:
            # timeout_at, not wait_for: no new task, and a message already buffered is returned even past
            # the deadline (receive does not suspend then, so it is never cancelled)
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            await self._expire()
            return {"type": "http.disconnect"}
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.answered:
            return  # the app answering the disconnect it was shown (a 400, a 500): the client has its 408
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def _expire(self) -> None:
        self.timed_out = True
        logger.debug("the request body did not arrive within %s s", self.seconds)
        if self.started:
            return  # the app answered before reading its body: it sees a disconnect and ends its response
        self.started = self.answered = True
        for message in _timeout_messages(self.seconds):
            await self._send(message)


class BodyDeadline:
    """Pure ASGI middleware: a 408 when a request's body has not fully arrived ``seconds`` after the request
    started (its head was parsed); the app then sees ``http.disconnect``. Only for ``http`` scopes."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = Timeouts(body_seconds=seconds).body_seconds  # validated

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _Request(receive, send, self.seconds)
        try:
            await self.app(scope, request.receive, request.send)
        except Exception:
            if not request.timed_out:
                raise
            # the app failing on the disconnect it was shown (ClientDisconnect): the 408 has been answered
            logger.debug("the app failed after a body timeout", exc_info=True)


# -- starting uvicorn -----------------------------------------------------------------------------------
def _guarded(app: ASGIApp, timeouts: Timeouts) -> dict[str, Any]:
    """The arguments uvicorn.run and uvicorn.Config share: the app behind the body deadline, and the protocol.

    The protocol is pinned (not ``http="auto"``, which picks httptools when it is installed) because the
    head deadline lives in the h11 protocol."""
    return {"app": BodyDeadline(app, timeouts.body_seconds), "http": guarded_protocol(timeouts.header_seconds)}


def uvicorn_config(
    app: ASGIApp,
    host: str = defaults.HOST,
    port: int = defaults.PORT,
    timeouts: Timeouts | None = None,
    **uvicorn_kwargs: Any,
) -> uvicorn.Config:
    """A uvicorn Config of ``app`` with both deadlines (``uvicorn.Server(config).run()`` serves it); any other
    uvicorn option (not ``http``) passes through."""
    return uvicorn.Config(**_guarded(app, timeouts or Timeouts()), host=host, port=port, **uvicorn_kwargs)


def run(
    app: ASGIApp,
    host: str = defaults.HOST,
    port: int = defaults.PORT,
    timeouts: Timeouts | None = None,
    **uvicorn_kwargs: Any,
) -> None:
    """``uvicorn.run`` of ``app`` with both deadlines; any other uvicorn option (not ``http``) passes through."""
    uvicorn.run(**_guarded(app, timeouts or Timeouts()), host=host, port=port, **uvicorn_kwargs)
