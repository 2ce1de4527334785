"""The slow-client guard (adapterkit.serve.guard) on a real uvicorn server: slow heads are cut, slow bodies
get a 408, a slowloris of 100 sockets does not starve other clients, and normal traffic is untouched."""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapterkit.errors import AdapterError
from adapterkit.serve import guard
from adapterkit.serve.guard import Timeouts

TIMEOUTS = Timeouts(header_seconds=1.0, body_seconds=1.5)
SLACK = 3.0  # CI is slow: a deadline may fire up to this many times late (plus a second)


def late(seconds: float) -> float:
    """The latest a deadline of ``seconds`` may fire on a slow machine."""
    return SLACK * seconds + 1.0


def tiny_app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/echo")
    async def echo(request: Request, sleep: float = 0.0) -> Response:
        body = await request.body()
        await asyncio.sleep(sleep)  # a slow app after the body is in: not the client's fault
        return Response(body, media_type="application/octet-stream")

    @app.get("/stream")
    async def stream(chunks: int = 9, every: float = 0.2) -> StreamingResponse:
        async def pieces() -> AsyncIterator[bytes]:
            for i in range(chunks):
                await asyncio.sleep(every)
                yield f"{i}\n".encode()

        return StreamingResponse(pieces(), media_type="text/plain")

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:  # as adapterkit serve's last resort
        return JSONResponse({"error": {"message": "internal error"}}, status_code=500)

    return app


class Server:
    """A guarded uvicorn server on a free loopback port, in a thread (as ``adapterkit serve`` would run it)."""

    def __init__(self, app: FastAPI, timeouts: Timeouts) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = guard.uvicorn_config(
            app, "127.0.0.1", self.port, timeouts, log_level="warning", timeout_keep_alive=5, limit_concurrency=512
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(tiny_app(), TIMEOUTS)
    yield running
    running.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (without waiting); what it sent before is read and dropped."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return True
        except OSError:  # a reset: closed too
            return True
    return False


def trickle(socks: list[socket.socket], byte: bytes, every: float, limit: float) -> float:
    """Send ``byte`` to each open socket every ``every`` s until the server has closed them all (or ``limit``
    s pass); the seconds that took."""
    start, open_ = time.monotonic(), list(socks)
    while open_ and time.monotonic() - start < limit:
        for sock in list(open_):
            try:
                sock.sendall(byte)
            except OSError:  # the server closed it between two bytes
                open_.remove(sock)
                continue
            if closed(sock):
                open_.remove(sock)
        select.select(open_, [], [], every)
        open_ = [s for s in open_ if not closed(s)]
    return time.monotonic() - start


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- the settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_timeouts_are_positive_seconds(bad) -> None:
    with pytest.raises(AdapterError, match="header_seconds"):
        Timeouts(header_seconds=bad)
    with pytest.raises(AdapterError, match="body_seconds"):
        guard.BodyDeadline(tiny_app(), bad)
    assert Timeouts(header_seconds=2, body_seconds=0.5) == Timeouts(2.0, 0.5)


def test_the_protocol_is_pinned_to_the_guarded_h11() -> None:
    """Not uvicorn's "auto" (httptools when installed), which would have no head deadline."""
    config = guard.uvicorn_config(tiny_app(), timeouts=Timeouts(header_seconds=3))
    config.load()
    assert issubclass(config.http_protocol_class, guard.GuardedH11Protocol)
    assert config.http_protocol_class.header_seconds == 3.0
    assert isinstance(config.loaded_app.app, guard.BodyDeadline)  # under uvicorn's proxy-headers middleware


# -- slow clients ---------------------------------------------------------------------------------------
def test_a_slow_head_is_cut(server: Server) -> None:
    sock = connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    took = trickle([sock], b"a", every=0.1, limit=late(TIMEOUTS.header_seconds) + 2)
    assert 0.8 * TIMEOUTS.header_seconds <= took <= late(TIMEOUTS.header_seconds)  # not reset by each byte


def test_a_slow_body_gets_408(server: Server) -> None:
    sock = connect(server)
    start = time.monotonic()
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    for byte in b'{"a"':  # a few bytes slowly, then nothing: 4 of the 100 declared
        sock.sendall(bytes([byte]))
        time.sleep(0.2)
    response = read_all(sock)  # the server closes after its answer
    took = time.monotonic() - start
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), response
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {
        "error": {
            "message": "the request body did not arrive within 1.5 s",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    assert 0.8 * TIMEOUTS.body_seconds <= took <= late(TIMEOUTS.body_seconds)


def test_a_slowloris_is_cut_and_others_are_served(server: Server) -> None:
    socks = [connect(server) for _ in range(100)]
    for sock in socks:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    start = time.monotonic()
    answer = requests.get(server.url, timeout=10)  # meanwhile
    assert answer.status_code == 200 and time.monotonic() - start < late(0.5)
    took = trickle(socks, b"a", every=0.2, limit=late(TIMEOUTS.header_seconds) + 2)
    assert took <= late(TIMEOUTS.header_seconds)
    deadline = time.monotonic() + 5  # the server's side of the sockets goes too, not only the client's
    while server.connections() > 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connections() <= 5
    start = time.monotonic()
    assert requests.get(server.url, timeout=10).json() == {"hello": "world"}  # after
    assert time.monotonic() - start < late(0.5)
    for sock in socks:
        sock.close()


def test_an_idle_keep_alive_connection_gets_the_head_deadline_again(server: Server) -> None:
    """The deadline is re-armed when a response ends: a second head sent slowly is cut too."""
    sock = connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    took = trickle([sock], b"a", every=0.1, limit=late(TIMEOUTS.header_seconds) + 2)
    assert took <= late(TIMEOUTS.header_seconds)  # well under uvicorn's own keep-alive timeout (5 s)


# -- normal clients -------------------------------------------------------------------------------------
def test_keep_alive_requests_outlast_the_head_deadline(server: Server) -> None:
    """Each request gets its own head deadline: one connection lives longer than one deadline."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    first = None
    for _ in range(4):
        conn.request("POST", "/echo", body=b"hello")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello")
        first = first or conn.sock
        assert conn.sock is first  # the same connection, not a new one
        time.sleep(0.4)  # 4 x 0.4 s > header_seconds
    conn.close()


def test_pipelined_requests_are_all_answered(server: Server) -> None:
    sock = connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert read_all(sock).count(b"HTTP/1.1 200 ") == 3


def test_a_slow_app_and_a_long_stream_are_not_the_clients_fault(server: Server) -> None:
    """The deadlines are for receiving the request: answering may take longer than both."""
    answer = requests.post(f"{server.url}/echo", params={"sleep": TIMEOUTS.body_seconds + 0.5}, data=b"x" * 10000)
    assert answer.status_code == 200 and answer.content == b"x" * 10000
    with requests.get(f"{server.url}/stream", stream=True, timeout=10) as answer:
        lines = list(answer.iter_lines())
    assert answer.status_code == 200 and lines == [str(i).encode() for i in range(9)]


def test_a_body_sent_in_parts_within_the_deadline_is_read(server: Server) -> None:
    def parts() -> Iterator[bytes]:
        for _ in range(3):
            time.sleep(0.2)
            yield b"part;"

    answer = requests.post(f"{server.url}/echo", data=parts(), timeout=10)  # chunked
    assert answer.status_code == 200 and answer.content == b"part;" * 3
