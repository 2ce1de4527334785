"""An adapter's page on the hub: its facts, how to load it, its model card (sanitised Markdown), metrics,
training curve, files and revisions. Pure functions of a card and its revisions (:mod:`.page` has the frame
and the helpers every value goes through).
"""

from __future__ import annotations

import shlex
import urllib.parse
from typing import Any

import nh3
from markdown_it import MarkdownIt

from adapterkit.hub.page import chips, esc, layout, mapping, size, text, when
from adapterkit.hub.protocol import fingerprint_digest

# The transformers class that loads a base model for each `adapterkit train` task (tests keep it equal to
# adapterkit.training.tasks, which the torch-free server may not import); any other task: AutoModel.
AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "ctc": "AutoModelForCTC",
    "causal-lm": "AutoModelForCausalLM",
    "chat": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "image-chat": "AutoModelForCausalLM",
}
MARKDOWN = MarkdownIt("commonmark", {"html": True}).enable("table")  # raw HTML goes on to nh3, never to the page
CARD_TAGS = nh3.ALLOWED_TAGS - {"area", "map"}


# -- an adapter --------------------------------------------------------------------------------------
def adapter_page(
    repo: str, card: dict[str, Any], revisions: list[dict[str, Any]], readme: str | None, hub: str, ref: str
) -> str:
    """Everything about one revision of ``repo``: facts, usage, model card, metrics, files, fingerprint,
    and every revision. ``hub``: the URL users reach this hub at; ``ref``: the revision or tag asked for."""
    files = {p: s for p, s in mapping(card.get("files")).items() if isinstance(p, str)}
    revision = str(card.get("revision", ""))
    rendered = model_card(repo, revision, files, readme)
    shown = resolve(repo, revision, "training.png") in rendered  # the card shows the curve already
    sections = [
        f'<h1 id="name">{esc(repo)}</h1>' + chips(card.get("tags"), "tags"),
        facts(card),
        usage(repo, card, hub, pinned(card, ref)),
        rendered,
        metrics_table(card.get("metrics")),
        "" if shown else curve(repo, revision, files),
        files_table(repo, revision, files),
        fingerprint(card.get("fingerprint")),
        history(repo, revisions),
    ]
    return layout(repo, "".join(sections))


def facts(card: dict[str, Any]) -> str:
    shown = [("method", "method"), ("format", "format"), ("task", "task"), ("base model", "base_model")]
    shown += [("model type", "model_type"), ("trainable params", "params"), ("license", "license")]
    items = [(label, key, text(card.get(key))) for label, key in shown]
    items += [("revision", "revision", f"<code>{text(card.get('revision'))}</code>")]
    items += [("created", "created", when(card.get("created")))]
    body = "".join(f'<dt>{label}</dt><dd class="{key}">{value}</dd>' for label, key, value in items)
    return f'<dl class="facts" id="facts">{body}</dl>'


def pinned(card: dict[str, Any], ref: str) -> str:
    """The ref a snippet names: the one asked for, else a tag of the revision besides ``latest``, else none."""
    if ref != "latest":
        return ref
    tags = [t for t in card.get("tags") or [] if isinstance(t, str) and t != "latest"]
    return max(tags) if tags else "latest"


def usage(repo: str, card: dict[str, Any], hub: str, ref: str) -> str:
    """Copyable snippets: the environment, Python (adapterkit), the CLI and, for peft files, peft."""
    at = f"@{ref}" if ref != "latest" else ""
    base, auto = loader(card)
    python = (
        f"import adapterkit as ak\nfrom transformers import {auto}\n\n"
        f"# the base model it was trained on\nmodel = {auto}.from_pretrained({base!r})\n"
        f'ak.load_adapter(model, "hub:{repo}{at}", activate=True)'
    )
    parts = [
        '<h2 id="use">Use it</h2><p>Point adapterkit at this hub (or pass <code>--hub</code>):</p>',
        snippet("use-env", "shell", f"export ADAPTERKIT_HUB={shlex.quote(hub)}"),
        "<p>In Python, load it into the base model it was trained on (adapterkit checks the base first):</p>",
        snippet("use-python", "python", python),
        "<p>From the command line, download it into the local cache:</p>",
        snippet("use-cli", "shell", f"adapterkit pull {repo}{at} --hub {shlex.quote(hub)}"),
    ]
    if card.get("format") == "peft":
        revision = f', revision="{ref}"' if ref != "latest" else ""
        peft = (
            f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
            "# HF_ENDPOINT sends every Hub download to this hub: load the base model from a local folder\n"
            f"base = {auto}.from_pretrained({base!r})\n"
            f'model = PeftModel.from_pretrained(base, "{repo}"{revision})'
        )
        parts += [
            "<p>These are peft files: peft and <code>huggingface_hub</code> download them from this hub too:</p>",
            snippet("use-peft-env", "shell", f"export HF_ENDPOINT={shlex.quote(hub)}"),
            snippet("use-peft", "python", peft),
        ]
    return f'<section aria-labelledby="use">{"".join(parts)}</section>'


def loader(card: dict[str, Any]) -> tuple[str, str]:
    """The base model's name and the transformers class a snippet loads it with."""
    base, task = card.get("base_model"), card.get("task")
    auto = AUTO_CLASSES.get(task, "AutoModel") if isinstance(task, str) else "AutoModel"
    return (base if isinstance(base, str) and base else "BASE_MODEL"), auto


def snippet(ident: str, language: str, code: str) -> str:
    return f'<pre id="{ident}" aria-label="{language}"><code>{esc(code)}</code></pre>'


def model_card(repo: str, revision: str, files: dict[str, Any], readme: str | None) -> str:
    if readme is None:
        body = '<p class="muted">This upload has no model card (<code>README.md</code>).</p>'
    else:
        body = f'<div class="card" id="card">{render_markdown(readme, repo, revision, files)}</div>'
    return f'<section aria-labelledby="card-title"><h2 id="card-title">Model card</h2>{body}</section>'


def render_markdown(source: str, repo: str, revision: str, files: dict[str, Any]) -> str:
    """A card's Markdown as sanitised HTML; its headings start at ``h3`` (the page has ``h1`` and ``h2``),
    links and images to the adapter's own files point at their download URLs."""
    tokens = MARKDOWN.parse(source)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + 2, 6)}"
    rendered = MARKDOWN.renderer.render(tokens, MARKDOWN.options, {})

    def target(element: str, attribute: str, value: str) -> str | None:
        if attribute not in ("href", "src"):
            return value
        path = urllib.parse.unquote(value).removeprefix("./")
        if path in files:
            return resolve(repo, revision, path)
        if element == "a" and (value.startswith(("https://", "http://", "mailto:", "#"))):
            return value
        return None  # another page of this site, or an image from elsewhere (the CSP would block it anyway)

    return nh3.clean(
        rendered,
        tags=CARD_TAGS,
        attribute_filter=target,
        url_schemes={"http", "https", "mailto"},
        link_rel="nofollow noopener noreferrer",
    )


def resolve(repo: str, revision: str, path: str) -> str:
    """The download URL of a file: the Hugging Face protocol's ``resolve`` route."""
    return f"/{repo}/resolve/{revision}/{urllib.parse.quote(path)}"


def metrics_table(metrics: Any) -> str:
    numbers = {k: v for k, v in mapping(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if not numbers:
        return ""
    body = "".join(f'<tr><th scope="row">{esc(k)}</th><td class="num">{v:.4g}</td></tr>' for k, v in numbers.items())
    return f'<h2 id="metrics">Metrics</h2><table id="metrics-table" class="compact">{body}</table>'


def curve(repo: str, revision: str, files: dict[str, Any]) -> str:
    if "training.png" not in files:
        return ""
    src = esc(resolve(repo, revision, "training.png"))
    return (
        '<figure id="curve"><img src="' + src + '" alt="training loss per step and validation metric per evaluation" '
        'width="700" height="400"><figcaption class="muted">Training curve (training.png)</figcaption></figure>'
    )


def files_table(repo: str, revision: str, files: dict[str, Any]) -> str:
    body = "".join(
        f'<tr><td><a href="{esc(resolve(repo, revision, path))}" download="{esc(path.rsplit("/", 1)[-1])}">'
        f'{esc(path)}</a></td><td class="num" title="{text(count)} bytes">{size(count)}</td></tr>'
        for path, count in sorted(files.items())
    )
    head = '<thead><tr><th scope="col">file</th><th scope="col">size</th></tr></thead>'
    return f'<h2 id="files">Files</h2><table id="files-table" class="compact">{head}<tbody>{body}</tbody></table>'


def fingerprint(value: Any) -> str:
    digest = fingerprint_digest(value)
    if digest is None:
        return (
            '<h2 id="base">Base model</h2><p id="fingerprint" class="muted">No fingerprint: this upload does not '
            "record the base model's weights (peft and AdapterHub files do not); shapes are checked on load.</p>"
        )
    return (
        f'<h2 id="base">Base model</h2><p id="fingerprint">Fingerprint <code>{esc(digest)}</code> '
        f"({len(value):,} base-model tensors: the shape and 4 sampled values of each).</p>"
        "<p>adapterkit compares it with your model before downloading anything and refuses a base model whose "
        "weights differ (a dtype cast of the same checkpoint still matches). The model card "
        "<code>adapterkit train</code> writes names the same digest.</p>"
    )


def history(repo: str, revisions: list[dict[str, Any]]) -> str:
    head = "".join(f'<th scope="col">{c}</th>' for c in ("revision", "date", "tags", "files changed"))
    body = "".join(revision_row(repo, r) for r in revisions)
    table = f'<table id="revisions" class="rows"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<h2 id="versions">Revisions</h2>{table}'


def revision_row(repo: str, revision: dict[str, Any]) -> str:
    rev = esc(revision["revision"])
    cells = [
        ("revision", f'<a href="/{esc(repo)}?rev={rev}"><code>{rev[:12]}</code></a>'),
        ("date", when(revision.get("created"))),
        ("tags", chips(revision.get("tags"), "tags")),
        ("files changed", changes(revision)),
    ]
    kinds = {"revision": ' class="nowrap"', "date": ' class="nowrap"'}
    return (
        "<tr>"
        + "".join(f'<td data-label="{label}"{kinds.get(label, "")}>{value}</td>' for label, value in cells)
        + "</tr>"
    )


def changes(revision: dict[str, Any]) -> str:
    """What a revision changed since the one before it: ``added a, b; changed c; removed d``."""
    parts = [
        f"{what} {', '.join(esc(p) for p in revision[what])}"
        for what in ("added", "changed", "removed")
        if revision.get(what)
    ]
    return "; ".join(parts) or '<span class="muted">no file changed (the card did)</span>'
