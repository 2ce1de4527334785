"""The hub client against hostile hubs: an HTTP server started by the test answers what each test says
(revision ids that are paths, files that do not hash to their revision, endless bodies, redirects to
another origin). Whatever a hub answers, nothing outside the cache is written or removed, nothing
unverified is kept, memory stays bounded and the token stays with its origin; with ``max_bytes`` nothing
is downloaded past the limit, with ``same_origin`` no other origin is called. A pulled file is stored
once (hard links), and ``sweep`` removes only the stale temporary files a killed download left."""

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
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
    assert folder == client.cache.place(hostile.url, "eve/ok") / revision
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
    monkeypatch.setattr(client.transport, "MAX_ANSWER", 2**20)
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


def cache_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()]


def test_max_bytes_refuses_a_revision_before_any_file_is_downloaded(hostile, cache):
    revision = hostile.serve("eve/big", FILES)
    total = sum(len(data) for data in FILES.values())
    with pytest.raises(ak.AdapterError, match=f"take {total} bytes, over the limit of {total - 1} bytes"):
        client.pull("eve/big", hostile.url, max_bytes=total - 1)
    assert not [path for path, _ in hostile.seen if "/resolve/" in path]  # no file was asked for
    assert cache_files(cache) == []  # no blob, no revision folder, no tag
    assert client.pull("eve/big", hostile.url, max_bytes=total) == client.cache.place(hostile.url, "eve/big") / revision
    # A revision pulled before is held to the limit too (a server's limit holds whatever its cache has).
    with pytest.raises(ak.AdapterError, match="over the limit"):
        client.pull(f"eve/big@{revision}", hostile.url, max_bytes=total - 1)


def disk_usage(root: Path) -> int:
    """Bytes ``root``'s files take on disk, a file with several names counted once (as ``du`` counts)."""
    inodes = {(s.st_dev, s.st_ino): s.st_blocks * 512 for p in root.rglob("*") if (s := p.lstat()) and p.is_file()}
    return sum(inodes.values())


def test_a_pulled_file_is_stored_once(hostile, cache):
    big = {**FILES, "adapter.safetensors": bytes(range(256)) * 8192}  # 2 MiB
    revision = hostile.serve("eve/once", big)
    folder = client.pull("eve/once", hostile.url)
    blob = client.cache_root() / "blobs" / hashlib.sha256(big["adapter.safetensors"]).hexdigest()
    pulled = folder / "adapter.safetensors"
    assert pulled.stat().st_ino == blob.stat().st_ino and pulled.stat().st_nlink == 2
    assert pulled.read_bytes() == big["adapter.safetensors"]
    assert disk_usage(cache) < 1.2 * len(big["adapter.safetensors"])  # was 2x: blob and copy
    assert not pulled.stat().st_mode & 0o222  # read-only: a write through one name would change all
    # Another revision holding the same file links the same bytes.
    other = hostile.serve("eve/other", big, card={"method": "lora", "license": "mit"})
    assert (client.pull("eve/other", hostile.url) / "adapter.safetensors").stat().st_ino == blob.stat().st_ino
    assert other != revision and disk_usage(cache) < 1.2 * len(big["adapter.safetensors"])


def test_a_disk_that_cannot_link_gets_a_copy(hostile, cache, monkeypatch):
    def cannot(*args, **kwargs) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    hostile.serve("eve/copy", FILES)
    monkeypatch.setattr(os, "link", cannot)
    folder = client.pull("eve/copy", hostile.url)
    assert {p: (folder / p).read_bytes() for p in FILES} == FILES
    blob = client.cache_root() / "blobs" / hashlib.sha256(FILES["adapter.safetensors"]).hexdigest()
    assert (folder / "adapter.safetensors").stat().st_ino != blob.stat().st_ino


def test_same_origin_follows_no_redirect_away_from_the_hub(hostile, cache):
    elsewhere = Hostile()  # 127.0.0.1 as well, another port: another origin
    try:
        revision = elsewhere.serve("eve/away", FILES)
        hostile.serve("eve/away", FILES)
        away = f"{elsewhere.url}/api/adapters/eve/away"
        # Each answer the client asks for (card, file listing, file), redirected away, directly or after a
        # redirect within the hub.
        routes = {
            "/api/adapters/eve/away": (302, {"Location": away}, b""),
            f"/api/models/eve/away/tree/{revision}": (307, {"Location": "/hop"}, b""),
            f"/eve/away/resolve/{revision}/adapter_config.json": (302, {"Location": f"{elsewhere.url}/x.json"}, b""),
        }
        for route, answer in routes.items():
            hostile.serve("eve/away", FILES)
            hostile.routes[route] = answer
            hostile.routes["/hop"] = (302, {"Location": f"{elsewhere.url}{route}"}, b"")
            with pytest.raises(ak.AdapterError, match=f"redirected to {elsewhere.url}.*another origin") as e:
                client.pull("eve/away", hostile.url, token=TOKEN, same_origin=True)
            assert not isinstance(e.value, client.HubUnreachable)  # not an offline hub: no cache fallback
            assert elsewhere.seen == []  # the other origin was never called
            assert not (client.cache_root() / "blobs").exists() or not [
                p for p in (client.cache_root() / "blobs").iterdir() if p.name.startswith(".tmp-")
            ]
        assert not client.cache.place(hostile.url, "eve/away").exists()  # nothing of the revision was kept
        # Within the origin, redirects are followed and keep the token.
        hostile.serve("eve/here", FILES)
        hostile.routes["/api/adapters/eve/moved"] = (307, {"Location": "/api/adapters/eve/here"}, b"")
        assert client.card("eve/moved", hostile.url, token=TOKEN, same_origin=True)["name"] is None
        assert hostile.seen[-1][0] == "/api/adapters/eve/here"
        assert hostile.seen[-1][1].get("Authorization") == f"Bearer {TOKEN}"
        # By default one is followed, without the token (test_the_token_stays_with_its_origin).
        hostile.routes["/api/adapters/eve/away"] = (302, {"Location": away}, b"")
        assert client.card("eve/away", hostile.url, token=TOKEN)["revision"] == revision
        assert "Authorization" not in elsewhere.seen[-1][1]
    finally:
        elsewhere.close()


def test_the_same_origin_check_knows_default_ports():
    assert client.same_origin_as("http://hub.example/a", "http://HUB.example:80/b")
    assert client.same_origin_as("https://hub.example/a", "https://hub.example:443/b")
    assert not client.same_origin_as("http://hub.example/a", "https://hub.example/a")
    assert not client.same_origin_as("http://127.0.0.1:8765/a", "http://127.0.0.1:8766/a")
    assert not client.same_origin_as("http://127.0.0.1:8765/a", "http://localhost:8765/a")


def stale(path: Path, seconds: float = 7200) -> Path:
    """``path`` (a link itself, not its target) as last changed ``seconds`` ago."""
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)
    return path


def test_sweep_removes_only_stale_temporary_files_the_library_wrote(cache, tmp_path):
    blobs = client.cache_root() / "blobs"
    blobs.mkdir(parents=True)
    old = blobs / ".tmp-0123456789abcdef"  # a download killed two hours ago
    old.write_bytes(b"half a download")
    stale(old)
    fresh = blobs / ".tmp-fedcba9876543210"  # another process's download in progress
    fresh.write_bytes(b"being written")
    kept = {
        "user": blobs / "notes.txt",
        "near miss": blobs / ".tmp-notes",
        "blob": blobs / hashlib.sha256(b"x").hexdigest(),
        "folder": blobs / ".tmp-00000000000000aa",
    }
    kept["user"].write_text("mine")
    kept["near miss"].write_text("mine too")
    kept["blob"].write_bytes(b"x")
    kept["folder"].mkdir()
    outside = tmp_path / "thesis.tex"
    outside.write_text("years of work")
    kept["link"] = blobs / ".tmp-00000000000000bb"
    kept["link"].symlink_to(stale(outside))
    for path in kept.values():
        stale(path)
    assert client.sweep() == 1
    assert not old.exists() and fresh.exists() and outside.read_text() == "years of work"
    assert all(path.is_symlink() or path.exists() for path in kept.values())
    assert client.sweep() == 0
    assert client.sweep(older_than=0) == 1 and not fresh.exists()
    with pytest.raises(ak.AdapterError, match="0 or more"):
        client.sweep(older_than=-1)


def test_sweep_without_a_cache_removes_nothing(cache):
    assert client.sweep() == 0 and not cache.exists()


def test_sweep_clears_what_a_sigkilled_download_left(hostile, cache):
    def stalls(out) -> None:  # declares the whole file, sends none of it
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(0.05)

    length = str(len(FILES["adapter_config.json"]))
    hostile.serve("eve/killed", FILES, bodies={"adapter_config.json": (200, {"Content-Length": length}, stalls)})
    code = "import sys; from adapterkit.hub import client; client.pull('eve/killed', sys.argv[1])"
    env = {**os.environ, "ADAPTERKIT_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-c", code, hostile.url], env=env)
    blobs = client.cache_root() / "blobs"
    deadline = time.time() + 30
    while time.time() < deadline and not (blobs.is_dir() and list(blobs.glob(".tmp-*"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(blobs.glob(".tmp-*"))
    assert len(left) == 1  # what a killed writer leaves: atomic_file had no chance to remove it
    assert client.sweep() == 0  # as fresh as a download in progress in another process
    stale(left[0])
    assert client.sweep() == 1 and not list(blobs.glob(".tmp-*"))


def short(out) -> None:  # declares 8 bytes, sends 3 and hangs up
    out.write(b'{"x')


@pytest.mark.parametrize(
    "answer",
    [
        (200, {}, b'{"x": 3}'),  # the declared size, other bytes
        (200, {"Content-Length": "8"}, short),  # a transfer broken off
        (200, {"Connection": "close"}, b'{"x": 1}   '),  # too long
    ],
)
def test_a_failed_pull_keeps_nothing_unverified(hostile, cache, answer):
    """A pull that fails leaves no revision folder, no tag and no temporary file; only blobs whose name is
    the sha256 of their bytes (files verified before the failure, which a retry reuses)."""
    hostile.serve("eve/fail", FILES, bodies={"adapter_config.json": answer})
    with pytest.raises(ak.AdapterError):
        client.pull("eve/fail", hostile.url)
    for path in cache_files(cache):
        assert path.parent == client.cache_root() / "blobs", path
        assert path.name == hashlib.sha256(path.read_bytes()).hexdigest(), path
