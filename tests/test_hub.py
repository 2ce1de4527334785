"""The adapter hub against a real server process: push/pull/load, revisions, the HF protocol with the real
``huggingface_hub`` and ``peft``, refusals, concurrency, a SIGKILLed server (the HTML pages: test_hub_page.py)."""

import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapterkit as ak
from adapterkit.apps import cli
from adapterkit.apps.cli import common
from adapterkit.hub import client, protocol
from adapterkit.hub.store import Store

from conftest import make_model, randomize_adapters

ENV = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``adapterkit hub serve`` in a subprocess."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.root, self.extra, self.port = root, extra, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "adapterkit", "hub", "serve", "--root", str(self.root), "--port", str(self.port)]
        self.proc = subprocess.Popen([*cmd, *self.extra], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/api/adapters", timeout=1).read()
                return
            except urllib.error.HTTPError:  # a private hub answers 401: it is up
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode()) from None
                time.sleep(0.1)
        raise RuntimeError("the hub did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def started(root: Path) -> Server:
    """A running hub over ``root`` with upload tokens for alice and bob (``server.tokens``)."""
    server = Server(root)
    server.tokens = {owner: Store(root).create_token(owner) for owner in ("alice", "bob")}
    return server


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = started(tmp_path_factory.mktemp("hub"))
    yield server
    server.kill()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))


def trained(seed: int = 3, preset: str = "lora"):
    model = make_model("bert")
    ak.add_adapter(model, "task", preset)
    randomize_adapters(model, seed=seed)
    ak.set_active(model, "task")
    return model


def saved(tmp_path: Path, model, name: str = "a", **kwargs) -> Path:
    return ak.save_adapter(model, "task", tmp_path / name, **kwargs)


def post(hub: Server, name: str, files: dict[str, bytes], token: str | None, card: dict | None = None):
    body = {"files": {p: base64.b64encode(d).decode() for p, d in files.items()}, "card": card or {}}
    return client.request("POST", f"{hub.url}/api/adapters/{name}", body, token)


def x():
    return torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(0))


def test_push_pull_load_is_bit_exact_and_works_offline(hub, tmp_path, monkeypatch):
    model = trained()
    card = client.push(saved(tmp_path, model), "alice/lora", hub.url, ["v1"], hub.tokens["alice"], license="mit")
    assert card["method"] == "lora" and card["license"] == "mit" and card["params"] > 0
    monkeypatch.setenv("ADAPTERKIT_HUB", hub.url)
    fresh = make_model("bert")
    ak.load_adapter(fresh, "hub:alice/lora@v1", activate=True)
    assert torch.equal(model(x()).logits, fresh(x()).logits)

    # Offline: the hub is unreachable, the cached tag and files still load.
    def unreachable(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(client.transport.OPENER, "open", unreachable)
    again = make_model("bert")
    ak.load_adapter(again, "hub:alice/lora@v1", activate=True)
    assert torch.equal(model(x()).logits, again(x()).logits)
    with pytest.raises(client.HubUnreachable, match="cannot reach the hub"):
        ak.load_adapter(make_model("bert"), "hub:alice/never-pulled")


def test_revisions_are_content_addressed_and_immutable(hub, tmp_path):
    token = hub.tokens["alice"]
    first = client.push(saved(tmp_path, trained(1), "one"), "alice/rev", hub.url, ["v1"], token)
    same = client.push(saved(tmp_path, trained(1), "one-again"), "alice/rev", hub.url, [], token)
    second = client.push(saved(tmp_path, trained(2), "two"), "alice/rev", hub.url, ["v2"], token)
    assert first["revision"] == same["revision"] != second["revision"]
    folder = tmp_path / "one"
    manifest = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in sorted(folder.iterdir())
    }
    card = protocol.Stored.model_validate(first).card()  # the id covers the card and the manifest
    assert first["revision"] == protocol.revision_id(card, {p: protocol.Entry(**e) for p, e in manifest.items()})
    info = client.card("alice/rev", hub.url)
    assert info["revision"] == second["revision"] and info["history"] == [first["revision"], second["revision"]]
    assert sorted(info["tags"]) == ["latest", "v2"]
    old = client.pull(f"alice/rev@{first['revision'][:12]}", hub.url)
    assert (old / "adapter.safetensors").read_bytes() == (folder / "adapter.safetensors").read_bytes()
    assert client.pull("alice/rev@v1", hub.url) == old


def test_a_card_for_another_base_is_refused_before_download(hub, tmp_path, monkeypatch):
    client.push(saved(tmp_path, trained()), "alice/base-check", hub.url, [], hub.tokens["alice"])
    monkeypatch.setenv("ADAPTERKIT_HUB", hub.url)
    other = make_model("bert", seed=9)
    with pytest.raises(ak.AdapterError, match="trained on another base model"):
        ak.load_adapter(other, "hub:alice/base-check")
    assert not (client.cache_root() / "blobs").exists()  # nothing was downloaded
    assert ak.list_adapters(other) == {}


HF_DOWNLOAD = """
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
url, cache = sys.argv[1], sys.argv[2]
out = {"snapshot": snapshot_download("alice/hf", endpoint=url, cache_dir=cache)}
out["one"] = hf_hub_download("alice/hf", "adapter_config.json", revision="v1", endpoint=url, cache_dir=cache + "2")
missing = [("alice/hf", "nope.json", EntryNotFoundError), ("alice/missing", "a.json", RepositoryNotFoundError)]
for name, file, error in missing:
    try:
        hf_hub_download(name, file, endpoint=url, cache_dir=cache)
    except error as e:
        out[file] = type(e).__name__
print(json.dumps(out))
"""


def test_huggingface_hub_downloads_identical_files(hub, tmp_path):
    """The real huggingface_hub client (in a process where HF_HUB_OFFLINE is unset) against the hub."""
    folder = saved(tmp_path, trained())
    pushed = client.push(folder, "alice/hf", hub.url, ["v1"], hub.tokens["alice"])
    cmd = [sys.executable, "-c", HF_DOWNLOAD, hub.url, str(tmp_path / "hf")]
    out = json.loads(subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    snap = Path(out["snapshot"])
    assert snap.name == pushed["revision"]
    for f in folder.iterdir():
        assert (snap / f.name).read_bytes() == f.read_bytes()
    assert Path(out["one"]).read_bytes() == (folder / "adapter_config.json").read_bytes()
    assert out["nope.json"] == "RemoteEntryNotFoundError" and out["a.json"] == "RepositoryNotFoundError"


HF_UPLOAD = """
import json, sys
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
url, token, folder, extra = sys.argv[1:5]
api = HfApi(endpoint=url, token=token)
api.create_repo("alice/hf-up", exist_ok=True)
first = api.upload_folder(folder_path=folder, repo_id="alice/hf-up").oid
second = api.upload_folder(folder_path=extra, repo_id="alice/hf-up").oid
try:
    api.upload_file(path_or_fileobj=b"not allowed", path_in_repo="model.bin", repo_id="alice/hf-up")
    refused = None
except HfHubHTTPError as e:
    refused = str(e)
print(json.dumps({"first": first, "second": second, "refused": refused}))
"""


def test_hfapi_upload_folder(hub, tmp_path):
    """``HfApi(endpoint=URL).upload_folder`` commits on top of the latest revision; bad files are refused."""
    folder = saved(tmp_path, trained(), "peft", format="peft")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "notes.json").write_text('{"note": 1}')
    cmd = [sys.executable, "-c", HF_UPLOAD, hub.url, hub.tokens["alice"], str(folder), str(tmp_path / "extra")]
    out = json.loads(subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    first, second = client.card(f"alice/hf-up@{out['first']}", hub.url), client.card("alice/hf-up", hub.url)
    assert first["method"] == "lora" and first["format"] == "peft" and second["revision"] == out["second"]
    assert set(second["files"]) == {*(p.name for p in folder.iterdir()), "notes.json"}  # a commit adds files
    pulled = client.pull("alice/hf-up", hub.url)
    for f in folder.iterdir():
        assert (pulled / f.name).read_bytes() == f.read_bytes()
    assert "only .safetensors and .json" in out["refused"]


PEFT_LOAD = """
import json, sys, torch, transformers as T
from peft import PeftModel
base = T.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
model = PeftModel.from_pretrained(base, "alice/peft-lora").eval()
ids = torch.tensor(json.loads(sys.argv[2]))
print(json.dumps(model(input_ids=ids).logits.tolist()))
"""


def test_peft_loads_from_the_hub_with_hf_endpoint(hub, tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "base")
    client.push(saved(tmp_path, model, "peft", format="peft"), "alice/peft-lora", hub.url, [], hub.tokens["alice"])
    env = dict(ENV, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    ids = x()
    out = subprocess.run(
        [sys.executable, "-c", PEFT_LOAD, str(tmp_path / "base"), json.dumps(ids.tolist())],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    logits = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=0)


def test_refusals_are_json_errors(hub, tmp_path):
    good = (saved(tmp_path, trained()) / "adapter.safetensors").read_bytes()
    cases = [
        ({"a.safetensors": good}, None, 401, "need a token"),
        ({"a.safetensors": good}, hub.tokens["bob"], 403, "belongs to 'bob'"),
        ({"x.safetensors": b"\x80\x04\x95pickle"}, hub.tokens["alice"], 415, "a pickle"),
        ({"x.json": b"PK\x03\x04zipped"}, hub.tokens["alice"], 415, "a zip archive"),
        ({"x.bin": good}, hub.tokens["alice"], 415, "only .safetensors and .json"),
        ({"../x.json": b"{}"}, hub.tokens["alice"], 400, "refused path"),
        ({"/etc/x.json": b"{}"}, hub.tokens["alice"], 400, "absolute"),
        ({"a\x00.json": b"{}"}, hub.tokens["alice"], 400, "NUL"),
        ({"x.json": b"{not json"}, hub.tokens["alice"], 415, "not valid UTF-8 JSON"),
        ({"x.safetensors": good[:-3]}, hub.tokens["alice"], 415, "not a valid safetensors file"),
        ({"x.safetensors": good + b"junk"}, hub.tokens["alice"], 415, "not a valid safetensors file"),
    ]
    for files, token, status, reason in cases:
        with pytest.raises(client.HubRequestError, match=reason) as e:
            post(hub, "alice/bad", files, token)
        assert e.value.status == status, reason
    with pytest.raises(client.HubRequestError, match="bad adapter name"):
        post(hub, "alice/..", {"a.json": b"{}"}, hub.tokens["alice"])
    link = tmp_path / "linked"
    link.mkdir()
    (link / "adapter_config.json").symlink_to(tmp_path / "a" / "adapter_config.json")
    with pytest.raises(ak.AdapterError, match="symbolic link"):
        client.push(link, "alice/link", hub.url, [], hub.tokens["alice"])
    assert client.search("bad", hub.url) == []  # nothing half-stored


def test_size_limits_and_private_reads(tmp_path):
    server = Server(tmp_path / "small", "--private", "--max-file-mb", "0.001", "--max-upload-mb", "0.002")
    try:
        token = Store(tmp_path / "small").create_token("alice")
        with pytest.raises(client.HubRequestError, match="per-file limit") as e:
            post(server, "alice/big", {"a.json": b'"' + b"x" * 2000 + b'"'}, token)
        assert e.value.status == 413
        with pytest.raises(client.HubRequestError, match="over the per-upload limit"):
            post(server, "alice/big", {f"{i}.json": b'"' + b"x" * 900 + b'"' for i in range(4)}, token)
        post(server, "alice/ok", {"a.json": b"{}"}, token)
        with pytest.raises(client.HubRequestError, match="private") as e:
            client.search("", server.url)
        assert e.value.status == 401
        assert [c["name"] for c in client.search("", server.url, token)] == ["alice/ok"]
    finally:
        server.kill()


def test_delete_is_owner_only(hub, tmp_path):
    client.push(saved(tmp_path, trained()), "alice/gone", hub.url, [], hub.tokens["alice"])
    with pytest.raises(client.HubRequestError, match="belongs to 'bob'"):
        client.delete("alice/gone", hub.url, hub.tokens["bob"])
    assert client.delete("alice/gone", hub.url, hub.tokens["alice"])["revisions"] == 1
    with pytest.raises(client.HubRequestError, match="no adapter 'alice/gone'") as e:
        client.card("alice/gone", hub.url)
    assert e.value.status == 404


def verify_all(url: str, name: str) -> list[str]:
    """Every revision of ``name`` downloads and matches its sha256; returns the revision ids."""
    history = client.card(name, url)["history"]
    for revision in history:
        for entry in json.loads(client.request("GET", f"{url}/api/models/{name}/tree/{revision}")):
            data = client.request("GET", f"{url}/{name}/resolve/{revision}/{entry['path']}")
            assert hashlib.sha256(data).hexdigest() == entry["lfs"]["oid"]
    return history


def test_concurrent_pushes_to_one_name(hub):
    token, errors, revisions = hub.tokens["alice"], [], set()

    def worker(i: int) -> None:
        try:
            for j in range(3):
                files = {"adapter_config.json": json.dumps({"i": i, "j": j}).encode(), "w.json": b"[1]"}
                revisions.add(json.loads(post(hub, "alice/busy", files, token))["revision"])
                client.card("alice/busy", hub.url)
        except Exception as e:  # noqa: BLE001 (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert set(verify_all(hub.url, "alice/busy")) == revisions and len(revisions) == 48
    db = sqlite3.connect(hub.root / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_killed_server_keeps_what_it_acknowledged(tmp_path):
    server = Server(tmp_path / "durable")
    token = Store(tmp_path / "durable").create_token("alice")
    acknowledged = [
        json.loads(post(server, "alice/d", {"a.json": str(i).encode()}, token))["revision"] for i in range(20)
    ]
    server.kill()
    leftovers = list((tmp_path / "durable" / "blobs").glob(".tmp-*"))
    server.start()
    try:
        assert verify_all(server.url, "alice/d") == acknowledged and leftovers == []
    finally:
        server.kill()


def test_cli_push_pull_search(hub, tmp_path, capsys, monkeypatch):
    folder = saved(tmp_path, trained())
    auth = ["--hub", hub.url, "--token", hub.tokens["alice"]]
    assert cli.main(["push", str(folder), "--name", "alice/cli-lora", "--tag", "v1", *auth]) == 0
    revision = capsys.readouterr().out.split("revision ")[1].split()[0]
    assert cli.main(["pull", "alice/cli-lora@v1", "--hub", hub.url]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert (
        path.name == revision
        and (path / "adapter.safetensors").read_bytes() == (folder / "adapter.safetensors").read_bytes()
    )
    monkeypatch.setenv("ADAPTERKIT_HUB", hub.url)
    assert common.resolved("hub:alice/cli-lora@v1") == str(path)  # `predict --adapter hub:...` reads this folder
    assert cli.main(["search", "cli-lora", "--hub", hub.url]) == 0
    assert "alice/cli-lora  lora" in capsys.readouterr().out
    assert cli.main(["push", str(folder), "--name", "alice/x", "--hub", hub.url]) == 2
    assert "need a token" in capsys.readouterr().err


def test_safetensors_checker_accepts_real_files(tmp_path):
    from adapterkit.hub.safety import check_content

    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, tmp_path / "t.safetensors", metadata={"k": "v"})
    check_content("t.safetensors", (tmp_path / "t.safetensors").read_bytes())


def test_search_by_text_method_task_and_base(hub, tmp_path):
    token = hub.tokens["bob"]
    client.push(saved(tmp_path, trained(), "l"), "bob/find-lora", hub.url, [], token, task="sentiment")
    client.push(saved(tmp_path, trained(preset="pfeiffer"), "p"), "bob/find-pf", hub.url, [], token, task="topic")
    names = lambda **kw: sorted(c["name"] for c in client.search(kw.pop("q", "find-"), hub.url, **kw))  # noqa: E731
    assert names() == ["bob/find-lora", "bob/find-pf"]
    assert names(method="lora") == ["bob/find-lora"] and names(task="topic") == ["bob/find-pf"]
    base = client.card("bob/find-lora", hub.url)["base_model"]
    assert names(base_model=base) == ["bob/find-lora", "bob/find-pf"] and names(base_model="other/model") == []
    assert names(q="no-such-adapter") == []


def test_references_that_would_escape_the_cache_are_refused():
    assert client.parse_ref("hub:alice/x@v1") == ("alice/x", "v1")
    assert client.parse_ref("alice/x") == ("alice/x", "latest")
    for bad in ("hub:alice/x@../../etc", "hub:../x", "hub:alice/x/y", "hub:alice/x@a/b"):
        with pytest.raises(ak.AdapterError, match="bad"):
            client.parse_ref(bad)
