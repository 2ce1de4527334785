"""The hub client against hostile hubs: an HTTP server started by the test answers what each test says
(revision ids that are paths, files that do not hash to their revision, endless bodies, redirects to
another origin). Whatever a hub answers, nothing outside the cache is written or removed, nothing
unverified is kept, memory stays bounded and the token stays with its origin."""

import contextlib
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterkit as ak
from adapterkit.hub import client
from adapterkit.hub.protocol import Card, Entry, revision_id

TOKEN = "akh_secret-token"


class Hostile:
    """A hub whose answers the test sets: ``routes[path] = (status, headers, body)``; ``body`` is bytes or
    a function writing to the socket. Every request's path and headers are recorded in ``seen``."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict, object]] = {}
        self.seen: list[tuple[str, dict]] = []
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                hostile.seen.append((path, dict(self.headers)))
                status, headers, body = hostile.routes.get(path, (404, {}, b'{"error": "no such route"}'))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if callable(body):
                    self.end_headers()
                    with contextlib.suppress(OSError):  # the client hung up: what the test wants
                        body(self.wfile)
                    self.close_connection = True
                    return
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, name: str, files: dict[str, bytes], card: dict | None = None, revision: str | None = None,
              tree: list | None = None, bodies: dict | None = None) -> str:  # fmt: skip
        """Answer for ``name`` as an honest hub would, except for what the arguments override."""
        card = Card.model_validate(card or {"method": "lora"})
        manifest = {p: Entry(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for p, d in files.items()}
        revision = revision or revision_id(card, manifest)
        stored = {**card.model_dump(mode="json"), "revision": revision, "created": 1.0, "tags": ["latest"]}
        self.routes[f"/api/adapters/{name}"] = (200, {}, json.dumps(stored).encode())
        if tree is None:
            tree = [{"path": p, "size": e.size, "lfs": {"oid": e.sha256, "size": e.size}} for p, e in manifest.items()]
        self.routes[f"/api/models/{name}/tree/{revision}"] = (200, {}, json.dumps(tree).encode())
        for path, data in files.items():
            self.routes[f"/{name}/resolve/{revision}/{path}"] = (200, {}, data)
        for path, answer in (bodies or {}).items():
            self.routes[f"/{name}/resolve/{revision}/{path}"] = answer
        return revision

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile():
    server = Hostile()
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


FILES = {"adapter_config.json": b'{"x": 1}', "adapter.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "}


def test_honest_answers_are_pulled(hostile, cache):
    revision = hostile.serve("eve/ok", FILES)
    folder = client.pull("eve/ok", hostile.url)
    assert folder == client._place(hostile.url, "eve/ok") / revision
    assert {p: (folder / p).read_bytes() for p in FILES} == FILES
    assert client.pull(f"eve/ok@{revision}", hostile.url) == folder


@pytest.mark.parametrize("revision", ["../../victim", "/tmp/victim", "..", "a" * 63 + "\n", "A" * 64])
def test_a_revision_id_never_becomes_a_path(hostile, cache, tmp_path, revision):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    hostile.serve("eve/evil", FILES, revision=revision)
    with pytest.raises(ak.AdapterError, match="does not fit"):
        client.pull("eve/evil", hostile.url)
    assert snapshot(victim) == {"thesis.tex": b"years of work"}
    assert not (cache / "hub" / "blobs").exists() or not any((cache / "hub" / "blobs").iterdir())


@pytest.mark.parametrize("path", ["../../victim/x.json", "/tmp/x.json", "a/../../x.json", "x.json\n", "x\x00.json"])
def test_a_file_path_never_escapes(hostile, cache, tmp_path, path):
    files = {path: b"{}"}
    hostile.serve("eve/paths", files)
    with pytest.raises(ak.AdapterError, match="refused path|does not fit|bad"):
        client.pull("eve/paths", hostile.url)
    assert not (tmp_path / "victim").exists() and not Path("/tmp/x.json").exists()


def test_a_pinned_revision_is_verified(hostile, cache):
    honest = hostile.serve("eve/pin", FILES)
    # The same id, other bytes: the manifest no longer hashes to the id.
    tampered = {**FILES, "adapter_config.json": b'{"x": 2}'}
    hostile.serve("eve/pin", tampered, revision=honest)
    for ref in (f"eve/pin@{honest}", f"eve/pin@{honest[:10]}", "eve/pin"):
        with pytest.raises(ak.AdapterError, match="does not match its card and files"):
            client.pull(ref, hostile.url)
    # The same files under another card (a swapped fingerprint, say) do not hash to the id either.
    hostile.serve("eve/pin", FILES, card={"method": "lora", "license": "mit"}, revision=honest)
    with pytest.raises(ak.AdapterError, match="does not match its card and files"):
        client.pull(f"eve/pin@{honest}", hostile.url)
    # Asked for one revision, answered with another (self-consistent) one.
    hostile.serve("eve/pin", tampered)
    with pytest.raises(ak.AdapterError, match=f"asked the hub for revision {honest[:10]}"):
        client.pull(f"eve/pin@{honest[:10]}", hostile.url)
    assert not (client.cache_root() / "blobs").exists() or not any((client.cache_root() / "blobs").iterdir())


def test_bytes_that_do_not_match_their_sha256_are_not_kept(hostile, cache):
    hostile.serve("eve/bytes", FILES, bodies={"adapter_config.json": (200, {}, b'{"x": 3}')})
    with pytest.raises(ak.AdapterError, match="do not match their size and sha256"):
        client.pull("eve/bytes", hostile.url)
    assert [p.name for p in (client.cache_root() / "blobs").iterdir()] in (
        [],
        [hashlib.sha256(FILES["adapter.safetensors"]).hexdigest()],
    )


def endless(out) -> None:
    chunk = b"x" * 65536
    deadline = time.time() + 20
    while time.time() < deadline:
        out.write(chunk)


def test_downloads_are_bounded(hostile, cache, monkeypatch):
    # A Content-Length far beyond the file's size is refused before anything is read.
    hostile.serve("eve/huge", FILES, bodies={"adapter_config.json": (200, {"Content-Length": str(10**15)}, endless)})
    start = time.time()
    with pytest.raises(ak.AdapterError, match="announced 1000000000000000 bytes"):
        client.pull("eve/huge", hostile.url)
    # A body without a length that goes on past the declared size is cut there.
    hostile.serve("eve/long", FILES, bodies={"adapter_config.json": (200, {"Connection": "close"}, endless)})
    with pytest.raises(ak.AdapterError, match="more than the 8 bytes expected"):
        client.pull("eve/long", hostile.url)
    # JSON answers are bounded too.
    monkeypatch.setattr(client, "MAX_ANSWER", 2**20)
    hostile.routes["/api/adapters/eve/json"] = (200, {"Connection": "close"}, endless)
    with pytest.raises(ak.AdapterError, match="more than the 1048576 bytes expected"):
        client.card("eve/json", hostile.url)
    assert time.time() - start < 15
    blobs = client.cache_root() / "blobs"
    assert not [p for p in blobs.iterdir() if p.name.startswith(".tmp-")]  # no temporary file left


def test_the_token_stays_with_its_origin(hostile, cache):
    elsewhere = Hostile()
    try:
        revision = elsewhere.serve("eve/away", FILES)
        hostile.serve("eve/away", FILES)
        moved = {"Location": f"{elsewhere.url}/api/adapters/eve/away"}
        hostile.routes["/api/adapters/eve/away"] = (302, moved, b"")
        assert client.card("eve/away", hostile.url, token=TOKEN)["revision"] == revision
        assert hostile.seen[-1][1].get("Authorization") == f"Bearer {TOKEN}"
        assert elsewhere.seen[-1][0] == "/api/adapters/eve/away"
        assert "Authorization" not in elsewhere.seen[-1][1]
        # A redirect within the origin keeps it (a private hub's files behind a redirect).
        hostile.serve("eve/here", FILES)
        hostile.routes["/api/adapters/eve/moved"] = (307, {"Location": "/api/adapters/eve/here"}, b"")
        client.card("eve/moved", hostile.url, token=TOKEN)
        assert hostile.seen[-1] == ("/api/adapters/eve/here", hostile.seen[-1][1])
        assert hostile.seen[-1][1].get("Authorization") == f"Bearer {TOKEN}"
        # Local files are no redirect target.
        hostile.routes["/api/adapters/eve/file"] = (302, {"Location": "file:///etc/passwd"}, b"")
        with pytest.raises(client.HubRequestError, match="is not allowed"):
            client.card("eve/file", hostile.url, token=TOKEN)
    finally:
        elsewhere.close()


def test_refusals_and_search_answers_are_printable(hostile, cache, capsys):
    from adapterkit.apps import cli

    hostile.routes["/api/adapters/eve/x"] = (400, {}, json.dumps({"error": "bad \x1b[2J\x1b]0;pwned\x07"}).encode())
    with pytest.raises(client.HubRequestError) as e:
        client.card("eve/x", hostile.url)
    assert "\x1b" not in str(e.value) and "\\x1b[2J" in str(e.value)
    row = {"name": "eve/x", "revision": "a" * 64, "method": "lora\x1b[31m", "metrics": {"acc": "high"}}
    hostile.routes["/api/adapters"] = (200, {}, json.dumps([row]).encode())
    assert cli.main(["search", "--hub", hostile.url]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "\x1b" not in err
    hostile.routes["/api/adapters"] = (
        200,
        {},
        json.dumps([{**row, "method": "lora", "metrics": {"acc": 0.5}}]).encode(),
    )
    assert cli.main(["search", "--hub", hostile.url]) == 0
    assert "eve/x  lora" in capsys.readouterr().out


@pytest.mark.parametrize("ref", ["eve/x\n", "eve/../x", "../eve/x", "eve/x@../../v", "eve/x@v1\n", "/eve/x", "eve/x@"])
def test_bad_references_are_refused_before_any_request(hostile, cache, ref):
    with pytest.raises(ak.AdapterError, match="bad"):
        client.pull(ref, hostile.url)
    assert hostile.seen == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def fuzz_hub():
    server = Hostile()
    yield server
    server.close()


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(card=JSON, tree=JSON, field=st.sampled_from(list(Card.model_fields)), value=JSON)
def test_any_hub_answer_is_refused_cleanly_or_verified(fuzz_hub, tmp_path, monkeypatch, card, tree, field, value):
    """Whatever the card and tree answers hold, a pull either yields exactly verified files inside the
    cache or raises AdapterError: never another exception, never a file outside the cache."""
    cache = tmp_path / f"c{time.monotonic_ns()}"
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(cache))
    revision = fuzz_hub.serve("eve/fuzz", FILES)
    good = json.loads(fuzz_hub.routes["/api/adapters/eve/fuzz"][2])
    honest_tree = json.loads(fuzz_hub.routes[f"/api/models/eve/fuzz/tree/{revision}"][2])
    for answer, listing in ((card, tree), ({**good, field: value}, honest_tree), (good, tree)):
        fuzz_hub.routes["/api/adapters/eve/fuzz"] = (200, {}, json.dumps(answer).encode())
        fuzz_hub.routes[f"/api/models/eve/fuzz/tree/{revision}"] = (200, {}, json.dumps(listing).encode())
        try:
            folder = client.pull("eve/fuzz", fuzz_hub.url)
        except ak.AdapterError:
            continue
        assert folder.resolve().is_relative_to(cache.resolve())
        assert {p: (folder / p).read_bytes() for p in FILES} == FILES
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("c")) == []


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"(hub:)?[a-z.]{1,6}/[a-z.\n]{1,6}(@[a-z0-9.\n]{0,8})?", fullmatch=True))
def test_a_parsed_reference_is_always_a_safe_cache_path(ref):
    """Anything ``parse_ref`` accepts names plain folders: one owner, one name, one revision segment."""
    try:
        name, rev = client.parse_ref(ref)
    except ak.AdapterError:
        return
    owner, adapter = name.split("/")
    for segment in (owner, adapter, rev):
        assert segment not in ("", ".", "..") and "/" not in segment and segment.isprintable()
        assert segment == segment.strip() and "\x00" not in segment
    assert ".." not in name


class Raw:
    """A 'hub' that answers every connection with the same raw bytes (status lines and headers included)."""

    def __init__(self, answer: bytes) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.answer)


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\nConnection: close\r\n\r\n[]", "announced"),
        (b"\x1b]0;PWNED\x07\x1b[2J\x1b[31mRED\x1b[0m\r\n\r\n", "cannot reach the hub"),
    ],
)
def test_raw_answers_are_adapter_errors_printed_inert(cache, capsys, answer, reason):
    """Found by a hostile tester: a superscript digit in Content-Length (isdigit() is True, int() fails)
    and a status line of terminal escape sequences."""
    from adapterkit.apps import cli

    raw = Raw(answer)
    with pytest.raises(ak.AdapterError, match=reason):
        client.search("", raw.url)
    assert cli.main(["search", "--hub", raw.url]) == 2
    err = capsys.readouterr().err
    assert reason in err and "\x1b" not in err and "\x07" not in err
    raw.sock.close()


def test_a_listing_whose_paths_cannot_all_exist_is_refused(hostile, cache):
    hostile.serve("eve/tree", {"a.json": b"{}", "a.json/b.json": b"{}"})
    with pytest.raises(ak.AdapterError, match="both a file and a folder"):
        client.pull("eve/tree", hostile.url)
