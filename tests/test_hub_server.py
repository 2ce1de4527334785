"""The hub server against hostile requests, each sent to a real ``adapterkit hub serve`` process:
malformed and oversized bodies, files the safetensors library refuses, names with a trailing newline,
cards that do not fit, an index holding anything, blob collection under concurrent pushes, browser
headers; then its OpenAPI schema fuzzed with schemathesis and its file checks with hypothesis."""

import base64
import hashlib
import json
import os
import random
import socket
import sqlite3
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import safetensors
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from safetensors.numpy import save
from schemathesis import GenerationMode

from adapterkit.apps import cli
from adapterkit.hub import protocol
from adapterkit.hub.safety import CARD_FILES, HubError, check_content, check_name, check_path, check_ref, check_tag
from adapterkit.hub.store import Store

from test_hub import started

NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = started(tmp_path_factory.mktemp("hub-server"))
    yield server
    server.kill()


def call(hub, method: str, path: str, body: bytes | dict | None = None, token: str | None = None, **headers):
    """``(status, headers, parsed JSON or text)`` of one request; HTTP errors are answers, not exceptions."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(hub.url + path, body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, answer, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, answer, raw = e.code, e.headers, e.read()
    is_json = answer.get("content-type", "").startswith("application/json")
    return status, answer, json.loads(raw) if is_json else raw.decode("utf-8", "replace")


def upload(hub, name: str, files: dict[str, bytes], card: dict | None = None, tags: list | None = None, token=None):
    body = {"files": {p: base64.b64encode(d).decode() for p, d in files.items()}, "card": card or {}}
    return call(hub, "POST", f"/api/adapters/{name}", {**body, "tags": tags or []}, token or hub.tokens["alice"])


def refused(answer, status: int | tuple[int, ...] = (400, 422), match: str = "", what: str = ""):
    """The answer is a 4xx JSON ``{"error": reason}`` with the given status and reason."""
    code, _, body = answer
    statuses = status if isinstance(status, tuple) else (status,)
    assert code in statuses and isinstance(body, dict) and match in body.get("error", ""), (what, answer)
    return body["error"]


def tensors(pad: int = 0) -> bytes:
    return save({"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float16)}, metadata={"pad": "x" * pad})


def crafted(header: dict | list | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def f32(shape, start, stop):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, stop]}


def blobs(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").iterdir() if not p.name.startswith(".")}


# -- item 5: every bad request is a 4xx JSON error -------------------------------------------------
def test_malformed_requests_are_json_4xx_never_500(hub):
    token = hub.tokens["alice"]
    bodies = {
        "nested body": NESTED,
        "nested card": b'{"files": {"a.json": "e30="}, "card": {"metrics": ' + NESTED + b"}}",
        "not JSON": b"\xff\xfe{",
        "a list": b"[]",
        "files not an object": b'{"files": ["a.json"]}',
        "non-string tags": json.dumps({"files": {"a.json": "e30="}, "tags": [1, {"x": 2}]}).encode(),
        "base64 not a string": json.dumps({"files": {"a.json": 7}}).encode(),
    }
    for what, body in bodies.items():
        refused(call(hub, "POST", "/api/adapters/alice/bad", body, token), (400, 422), what=what)
    files = {
        "nested.json": NESTED,
        "nested.safetensors": crafted(b'{"__metadata__": ' + NESTED + b"}", b""),
        "deep.safetensors": crafted(b'{"a": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, b""),
        "float-offsets.safetensors": crafted({"a": f32([1], 0.0, 4.5)}, bytes(4)),
        "string-offsets.safetensors": crafted({"a": f32([1], "0", "4")}, bytes(4)),
        "huge-offsets.safetensors": crafted({"a": f32([1], 0, 2**70)}, bytes(4)),
    }
    for path, data in files.items():
        refused(upload(hub, "alice/bad", {path: data}), 415, path)
    for route in ("/api/models/alice/bad/commit/main", "/api/models/alice/bad/preupload/main", "/api/repos/create"):
        for body in (b"\xff not json", b"[]", NESTED, b'{"key": "file", "value": {"path": 3}}', b'{"files": 3}'):
            refused(call(hub, "POST", route, body, token), (400, 413, 422))
    refused(call(hub, "POST", "/api/models/alice/bad/commit/main", b'{"key": "lfsFile", "value": {}}', token), 422)
    # a file's content that is a string but not base64: 400 naming the file, on both upload routes
    bad = json.dumps({"files": {"a.json": "@@ not base64 @@"}}).encode()
    refused(call(hub, "POST", "/api/adapters/alice/bad", bad, token), 400, "'a.json': not base64")
    line = json.dumps({"key": "file", "value": {"path": "a.json", "content": "@@ not base64 @@"}}).encode()
    refused(call(hub, "POST", "/api/models/alice/bad/commit/main", line, token), 400, "'a.json': not base64")
    refused(call(hub, "GET", "/no/such/route/here"), 404)
    refused(call(hub, "GET", "/favicon.ico"), 404)
    refused(call(hub, "PUT", "/api/adapters/alice/bad", b"{}", token), 405)
    refused(call(hub, "DELETE", "/api/adapters"), 405)
    assert call(hub, "GET", "/api/adapters?q=bad")[2] == []


# -- item 6: safetensors files are checked by the safetensors library --------------------------------
def test_safetensors_files_are_checked_by_the_library(hub):
    pad = next(p for p in range(512) if tensors(p)[0] == 0x80)
    valid = tensors(pad)
    assert valid[0] == 0x80  # 8-byte header length starting with the pickle protocol's opcode
    status, _, card = upload(hub, "alice/x80", {"adapter.safetensors": valid})
    assert status == 200 and card["files"] == {"adapter.safetensors": len(valid)}
    bad = {
        "overlapping": crafted({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12)),
        "gapped": crafted({"a": f32([1], 4, 8)}, bytes(8)),
        "unknown dtype": crafted({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        "shape not its bytes": crafted({"a": f32([3], 0, 4)}, bytes(4)),
        "truncated": valid[:-3],
        "trailing bytes": valid + b"junk",
        "header not an object": crafted([], b""),
        "huge declared header": struct.pack("<Q", 2**62) + b"{}",
    }
    for what, data in bad.items():
        with pytest.raises(safetensors.SafetensorError):
            safetensors.deserialize(data)
        refused(upload(hub, "alice/bad-st", {"x.safetensors": data}), 415, "x.safetensors", what)
    pickle = refused(upload(hub, "alice/bad-st", {"x.safetensors": b"\x80\x04\x95pickle"}), 415)
    assert "looks like a pickle" in pickle


# -- item 7: names, tags, paths and revisions match whole strings ---------------------------------------
def test_a_trailing_newline_is_refused_on_every_route(hub):
    token, files = hub.tokens["alice"], {"a.json": b"{}"}
    assert upload(hub, "alice/legit", files, tags=["v1"])[0] == 200
    refused(upload(hub, "alice/legit%0A", files), 400, "bad adapter name")
    refused(upload(hub, "alice/legit", files, tags=["v1\n"]), 400, "bad tag")
    refused(upload(hub, "alice/legit", {"a.json\n": b"{}"}), (400, 415), "refused")
    refused(call(hub, "POST", "/api/repos/create", {"name": "legit\n", "organization": "alice"}, token), 400)
    preupload = {"files": [{"path": "a.json\n", "size": 2, "sample": ""}]}
    refused(call(hub, "POST", "/api/models/alice/legit/preupload/main", preupload, token), (400, 415))
    line = json.dumps({"key": "file", "value": {"path": "a.json", "content": "e30="}}).encode()
    refused(call(hub, "POST", "/api/models/alice/legit%0A/commit/main", line, token), 400)
    bad_file = json.dumps({"key": "file", "value": {"path": "b.json\n", "content": "e30="}}).encode()
    refused(call(hub, "POST", "/api/models/alice/legit/commit/main", bad_file, token), (400, 415))
    for path in ("/api/adapters/alice/legit%0A", "/api/adapters/alice/legit?rev=v1%0A", "/alice/legit%0A",
                 "/api/models/alice/legit/revision/v1%0A", "/alice/legit/resolve/v1%0A/a.json"):  # fmt: skip
        refused(call(hub, "GET", path), 400)
    assert [c["name"] for c in call(hub, "GET", "/api/adapters?q=legit")[2]] == ["alice/legit"]


# -- item 8: cards have a schema; pages render whatever the index holds --------------------------------------
def test_cards_that_do_not_fit_are_refused(hub):
    cards = {
        "params": {"params": "lots"},
        "metrics": {"metrics": {"accuracy": "high"}},
        "metrics.accuracy": {"metrics": {"accuracy": float("nan")}},
        "control character": {"task": "\x1b[31mred"},
        "Extra inputs": {"surprise": 1},
        "format": {"format": "pickle"},
    }
    for match, card in cards.items():
        assert match in refused(upload(hub, "alice/cards", {"a.json": b"{}"}, card), 422)
    status, _, stored = upload(hub, "alice/cards", {"a.json": b"{}"}, {"task": "sentiment", "metrics": {"f1": 0.5}})
    assert status == 200 and protocol.Stored.model_validate(stored).task == "sentiment"


def test_pages_and_search_never_fail_whatever_the_index_holds(hub):
    db = sqlite3.connect(hub.root / "index.sqlite", timeout=60)
    weird = {
        "alice/w-text": ("not json", 1.0),
        "alice/w-list": ("[1, 2]", 2.0),
        "alice/w-types": (json.dumps({"params": "lots", "metrics": "x", "method": ["<b>"], "files": 3}), "yesterday"),
        "alice/w-html": (json.dumps({"task": "<script>alert(1)</script>", "params": 12345}), 1e300),
    }
    with db:
        for i, (repo, (card, created)) in enumerate(weird.items()):
            revision = f"{i:064x}"
            db.execute("INSERT INTO revisions VALUES (?, ?, ?, ?, ?)", (repo, revision, created, card, "{}"))
            db.execute("INSERT INTO tags VALUES (?, 'latest', ?)", (repo, revision))
    for path in ("/", "/?q=w-", "/api/adapters", "/api/adapters?q=w-"):
        assert call(hub, "GET", path)[0] == 200, path
    for repo in weird:
        for path in (f"/{repo}", f"/api/adapters/{repo}", f"/api/models/{repo}", f"/api/models/{repo}/tree/main"):
            assert call(hub, "GET", path)[0] == 200, path
    page = call(hub, "GET", "/alice/w-html")[2]
    assert "<script>" not in page and "&lt;script&gt;" in page and "12,345" in page
    assert '<td data-label="method">—</td>' in call(hub, "GET", "/?q=w-text")[2]


# -- item 9: authentication before any body is read; every body bounded -------------------------------------
def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_create_repo_refuses_without_a_token_before_reading_the_body(hub):
    before, size = rss_kib(hub.proc.pid), 200 * 2**20
    head = f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", hub.port), timeout=30) as s:
        s.sendall(head.encode())
        started = time.time()

        def flood() -> None:  # the rest of the 200 MB, for as long as the server takes it
            chunk = b"[" * 2**20
            try:
                for _ in range(200):
                    s.sendall(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        answer = ""
        while not answer.endswith("}"):  # the status line, headers and JSON body, in as many reads as it takes
            answer += s.recv(65536).decode("latin-1")
        elapsed = time.time() - started
        sender.join(timeout=20)
    assert answer.startswith("HTTP/1.1 401") and '"error"' in answer and elapsed < 5, answer[:300]
    assert rss_kib(hub.proc.pid) - before < 8 * 1024  # KiB: the body was never buffered
    token = hub.tokens["alice"]
    refused(call(hub, "POST", "/api/repos/create", b" " * (65 * 2**10), token), 413, "over the limit")
    refused(call(hub, "POST", "/api/repos/create", {"name": "mine", "organization": "bob"}, token), 403)
    assert call(hub, "POST", "/api/repos/create", {"name": "mine", "organization": "alice"}, token)[0] == 200
    refused(call(hub, "POST", "/api/models/alice/mine/preupload/main", b" " * (2**20 + 1), token), 413)
    refused(call(hub, "POST", "/api/models/alice/mine/preupload/main", b"{}"), 401)


# -- item 10: storage tells the truth, leaves no orphans, collects what nothing uses ---------------------------
def test_another_card_makes_another_revision(hub):
    files = {"a.json": b'{"w": 1}'}
    first = upload(hub, "alice/recard", files, {"task": "one"})[2]
    again = upload(hub, "alice/recard", files, {"task": "one"})[2]
    second = upload(hub, "alice/recard", files, {"task": "two"})[2]
    assert first["revision"] == again["revision"] != second["revision"]
    latest = call(hub, "GET", "/api/adapters/alice/recard")[2]
    assert latest["task"] == "two" and latest["revision"] == second["revision"]
    assert latest["history"] == [first["revision"], second["revision"]]
    old = call(hub, "GET", f"/api/adapters/alice/recard?rev={first['revision']}")[2]
    assert old["task"] == "one"
    stored = protocol.Stored.model_validate(latest)
    manifest = {p: protocol.Entry(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for p, d in files.items()}
    assert protocol.revision_id(stored.card(), manifest) == stored.revision


def test_a_refused_upload_leaves_no_blob(hub):
    before = blobs(hub.root)
    good = {f"ok{i}.json": f'{{"unique": "{time.time()}-{i}"}}'.encode() for i in range(3)}
    refused(upload(hub, "alice/orphan", {**good, "z.safetensors": b"\x00" * 16}), 415)
    refused(upload(hub, "alice/orphan", good, {"params": -1}), 422)
    refused(upload(hub, "alice/orphan", good, tags=["v1", "../x"]), 400)
    assert blobs(hub.root) == before


def test_delete_collects_the_blobs_only_it_used(hub):
    shared, own = b'{"shared": true}', f'{{"own": "{time.time()}"}}'.encode()
    upload(hub, "alice/keeper", {"s.json": shared})
    upload(hub, "alice/goner", {"s.json": shared, "own.json": own})
    digest = {d: hashlib.sha256(d).hexdigest() for d in (shared, own)}
    assert {digest[shared], digest[own]} <= blobs(hub.root)
    assert call(hub, "DELETE", "/api/adapters/alice/goner", token=hub.tokens["alice"])[0] == 200
    assert digest[shared] in blobs(hub.root) and digest[own] not in blobs(hub.root)
    assert call(hub, "GET", "/alice/keeper/resolve/main/s.json")[2] == shared.decode()


def test_collection_under_concurrent_pushes_keeps_every_revision_whole(hub):
    token, errors, deleted, stop = hub.tokens["alice"], [], [], threading.Event()
    common = b'{"common": 1}'

    enough = threading.Event()  # the second half of the pushes runs while deletes are known to happen

    def pusher(i: int) -> None:
        for j in range(12):
            if j == 6:
                enough.wait(60)
            files = {"common.json": common, "own.json": json.dumps([i, j, time.time()]).encode()}
            status, _, body = upload(hub, f"alice/churn-{i}-{j % 2}", files, token=token)
            if status != 200:
                errors.append((status, body))

    def deleter() -> None:
        store, rng = Store(hub.root), random.Random(0)
        while not stop.is_set():
            victim = f"alice/churn-{rng.randrange(8)}-0"  # the -1 repos always survive
            status = call(hub, "DELETE", f"/api/adapters/{victim}", token=token)[0]
            if status not in (200, 404):
                errors.append(("delete", status))
            deleted.append(status == 200)
            if sum(deleted) >= 5:
                enough.set()
            store.collect()

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(8)]
    cleaner = threading.Thread(target=deleter)
    [t.start() for t in [*threads, cleaner]]
    [t.join() for t in threads]
    stop.set()
    cleaner.join()
    assert errors == [] and sum(deleted) >= 5
    db = sqlite3.connect(hub.root / "index.sqlite")
    rows = db.execute("SELECT repo, id, manifest FROM revisions WHERE repo LIKE 'alice/churn-%'").fetchall()
    assert {repo for repo, _, _ in rows} >= {f"alice/churn-{i}-1" for i in range(8)}
    for repo, revision, manifest in rows:
        for path, entry in json.loads(manifest).items():
            data = (hub.root / "blobs" / entry["sha256"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], (repo, path)
            assert call(hub, "GET", f"/{repo}/resolve/{revision}/{path}")[0] == 200
    referenced = {d for (d,) in db.execute("SELECT digest FROM files")}
    Store(hub.root).collect()
    assert blobs(hub.root) == referenced  # nothing unreferenced is left once collected


def test_collection_of_abandoned_pushes_and_an_older_index(tmp_path, capsys):
    store = Store(tmp_path)
    store.commit("alice/a", {"a.json": b"[1]"}, protocol.Card(), [])
    stray, old = tmp_path / "blobs" / ".tmp-stray", time.time() - 7200
    stray.write_bytes(b"half")
    orphan = tmp_path / "blobs" / ("0" * 64)
    orphan.write_bytes(b"orphan")
    with sqlite3.connect(tmp_path / "index.sqlite") as db:  # a push that died two hours ago
        db.execute("INSERT INTO pending VALUES ('dead', ?, ?)", ("1" * 64, old))
    (tmp_path / "blobs" / ("1" * 64)).write_bytes(b"dead")
    os.utime(stray, (old, old))
    assert cli.main(["hub", "gc", "--root", str(tmp_path)]) == 0  # what store.collect() does
    assert "removed 2 files" in capsys.readouterr().out and not stray.exists()
    assert blobs(tmp_path) == {hashlib.sha256(b"[1]").hexdigest()}
    # An index written before blob references existed gets them from its manifests.
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        db.execute("DROP TABLE files")
        db.execute("PRAGMA user_version = 0")
    assert Store(tmp_path).delete("alice/a") == 1 and blobs(tmp_path) == set()


# -- item 11: browser headers ------------------------------------------------------------------------------
def test_responses_carry_browser_security_headers(hub):
    upload(hub, "alice/headers", {"a.json": b"{}"})
    for path in ("/", "/alice/headers"):
        status, headers, _ = call(hub, "GET", path)
        assert status == 200 and headers["content-type"].startswith("text/html")
        csp = headers["Content-Security-Policy"]
        for directive in ("default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'"):
            assert directive in csp
        assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer"
    for path in ("/", "/api/adapters", "/nothing/here/at/all", "/alice/headers/resolve/main/a.json"):
        assert call(hub, "GET", path)[1]["X-Content-Type-Options"] == "nosniff", path


# -- fuzzing: the OpenAPI schema with schemathesis, the file checks with hypothesis ------------------------------
@schemathesis.serializer("application/x-ndjson")  # an HF commit: one JSON value a line
def _ndjson(context, value) -> bytes:
    lines = value if isinstance(value, list) else [value]
    return b"\n".join(json.dumps(line).encode() for line in lines)


def fuzz(operation, mode: GenerationMode, headers: dict[str, str]) -> bool:
    """``operation`` called with generated requests, valid ones or not: never a 5xx, every error JSON.

    False when no invalid request can be made (an operation whose parameters are all free text)."""

    @settings(max_examples=15, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(headers=headers, timeout=30)
        assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
        if response.status_code >= 400 and case.method != "HEAD":  # a HEAD answer has no body
            assert response.headers["content-type"] == ["application/json"], (case.method, case.formatted_path)
            assert "error" in response.json(), (case.method, case.formatted_path, response.text[:300])

    try:
        check()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE, operation.label
        return False
    return True


def test_openapi_schema_fuzzed_no_5xx_and_errors_are_json(hub):
    """Every operation of the served schema, with a valid token so the authenticated routes are reached.

    (schemathesis' pytest plugin is not used: its lazy loader breaks on pytest 9.2's nodes)"""
    schema = schemathesis.openapi.from_url(f"{hub.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15
    auth = {"Authorization": f"Bearer {hub.tokens['alice']}"}
    for operation in operations:
        assert fuzz(operation, GenerationMode.POSITIVE, auth)
        negated = fuzz(operation, GenerationMode.NEGATIVE, auth)
        assert negated or not operation.body, operation.label  # every body can be made invalid


def mutated(data: bytes, draw_edits) -> bytes:
    out = bytearray(data)
    for position, value in draw_edits:
        if out:
            out[position % len(out)] = value
    return bytes(out)


SEEDS = [tensors(), tensors(200), crafted({"a": f32([1], 0, 4)}, bytes(4)), b'{"a": [1, 2, {"b": null}]}']
edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)
files = st.one_of(st.binary(max_size=512), st.builds(mutated, st.sampled_from(SEEDS), edits))


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(data=files, suffix=st.sampled_from([".safetensors", ".json"]))
def test_file_checks_refuse_with_hub_errors_only(data, suffix):
    try:
        check_content("f" + suffix, data)
    except HubError as e:
        assert e.status == 415
        return
    if suffix == ".safetensors":
        safetensors.deserialize(data)  # whatever the hub accepts, the library reads
    else:
        protocol.parse_json(data, "f.json")


text = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["alice/legit\n", "a/../b", "a//b.json", "..", "./a.json", "a\x00b", "v1\n", "/abs.json", "a/b\\c.json"]
)


def accepted(check, value: str) -> bool:
    try:
        check(value)
    except HubError:
        return False
    return True


def plain(value: str) -> bool:
    """No line break, NUL, backslash, empty or dot-dot segment, leading slash."""
    segments = value.split("/")
    return not any(c in value for c in "\n\r\x00\\") and all(s not in ("", ".", "..") for s in segments)


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(value=text)
def test_name_tag_path_checks_accept_only_plain_whole_strings(value):
    if accepted(check_name, value):
        assert plain(value) and value.count("/") == 1 and ".." not in value
    if accepted(check_tag, value) or accepted(check_ref, value):
        assert plain(value) and "/" not in value
    if accepted(check_path, value):
        assert plain(value) and (value.endswith((".json", ".safetensors")) or value in CARD_FILES)


def test_uploads_that_no_disk_can_hold_or_no_strict_reader_can_read_are_refused(hub):
    """Found by a hostile tester: a file that is also a folder of other files, and JSON that only
    Python's lenient reader takes (UTF-16/32, a byte-order mark, NaN)."""
    refused(upload(hub, "alice/tree", {"a.json": b"{}", "a.json/b.json": b"{}"}), 400, "both a file and a folder")
    lenient = {
        "utf16": '{"a": 1}'.encode("utf-16-le"),
        "utf32": '{"a": 1}'.encode("utf-32"),
        "bom": b'\xef\xbb\xbf{"a": 1}',
        "surrogate": b'{"a": "\xed\xa0\x80"}',
        "nan": b'{"a": NaN, "b": -Infinity}',
    }
    for what, data in lenient.items():
        refused(upload(hub, "alice/lenient", {"x.json": data}), 415, "not valid UTF-8 JSON", what)
    assert upload(hub, "alice/lenient", {"x.json": '{"a": "é"}'.encode()})[0] == 200


def test_search_finds_text_outside_ascii(hub):
    assert upload(hub, "alice/accents", {"a.json": b"{}"}, {"task": "résumé-tags"})[0] == 200
    code, _, found = call(hub, "GET", "/api/adapters?q=r%C3%A9sum%C3%A9")
    assert code == 200 and [c["name"] for c in found] == ["alice/accents"]


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(17)  # a signature and the start of a header chunk


def test_model_cards_and_training_curves_are_checked(hub):
    """README.md must be UTF-8 and training.png a PNG, each under its cap, and only at the top level."""
    card = "# Ünïcode card\n".encode()
    cases = [
        ({"README.md": "café".encode("latin-1")}, 415, "not UTF-8"),
        ({"README.md": b"\xed\xa0\x80 a surrogate"}, 415, "not UTF-8"),
        ({"README.md": b"#" * (CARD_FILES["README.md"] + 1)}, 415, "over the 256 KiB limit of README.md"),
        ({"training.png": b"PK\x03\x04" + bytes(40)}, 415, "it looks like a zip archive"),
        ({"training.png": b"\x89PNG\r\n\x1a\n" + b"<html><script>"}, 415, "not a PNG image"),
        ({"training.png": PNG + bytes(CARD_FILES["training.png"])}, 415, "over the 2048 KiB limit of training.png"),
        ({"docs/README.md": card}, 415, "only .safetensors and .json"),
        ({"curve.png": PNG}, 415, "only .safetensors and .json"),
        ({"readme.md": card}, 415, "only .safetensors and .json"),
    ]
    for files, status, match in cases:
        refused(upload(hub, "alice/cards", {**files, "a.json": b"{}"}), status, match, str(list(files))[:40])
    code, _, stored = upload(hub, "alice/cards", {"README.md": card, "training.png": PNG, "a.json": b"{}"})
    assert code == 200 and stored["files"] == {"README.md": len(card), "training.png": len(PNG), "a.json": 2}
    for path, media in (("README.md", "text/markdown; charset=utf-8"), ("training.png", "image/png")):
        code, headers, _ = call(hub, "GET", f"/alice/cards/resolve/main/{path}")
        assert code == 200 and headers["content-type"] == media and headers["X-Content-Type-Options"] == "nosniff"
    code, _, page = call(hub, "GET", "/alice/cards")
    assert code == 200 and "<h3>Ünïcode card</h3>" in page and '<img src="/alice/cards/resolve/' in page


def test_the_pages_refuse_bad_queries_with_json(hub):
    """Hostile query strings on the HTML routes: a 4xx with a JSON reason, never a 500 or a page."""
    for path in ("/?sort=random", "/?page=0", "/?page=-3", "/?per_page=1000", "/?page=x", "/?per_page=1e9"):
        refused(call(hub, "GET", path), (400, 422), what=path)
    upload(hub, "alice/paged", {"a.json": b"{}"})
    for rev in ("../../etc", "zz", "%00"):
        refused(call(hub, "GET", f"/alice/paged?rev={rev}"), (400, 404, 422), what=rev)
    code, _, page = call(hub, "GET", "/alice/paged?rev=latest")
    assert code == 200 and "alice/paged" in page
