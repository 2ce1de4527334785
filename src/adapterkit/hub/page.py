"""The hub's HTML: the frame and helpers every page shares, and the index of adapters; an adapter's own page is
:mod:`adapterkit.hub.card_page`. Rendered on the server, without script.

Pure functions from cards and revisions (as :mod:`adapterkit.hub.store` returns them) to HTML strings.
Every value is escaped; a model card (``README.md``) is rendered by ``markdown-it-py`` and sanitised by
``nh3`` (an allow-list of tags, attributes and URL schemes), so raw HTML in a card never reaches the page
as written, and its links and images point only at the adapter's own files or at http(s) pages. The
server's Content-Security-Policy forbids scripts besides; nothing on the page is fetched from elsewhere.
An index row may hold anything (a card written by an older hub, or by hand): every value is read defensively.
"""

from __future__ import annotations

import datetime
import html
import json
import urllib.parse
from typing import Any

EMPTY = "—"
SORTS = {"newest": "newest", "name": "name", "params": "trainable parameters"}
FILTERS = ("method", "task", "base_model")
STYLE = """
:root{color-scheme:light;--line:#d8dee4;--muted:#57606a;--accent:#0b57d0}
*{box-sizing:border-box}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;overflow-wrap:break-word}
dd,code,.card,td.long{overflow-wrap:anywhere}
td.long{min-width:12rem}
th,td.num,ul.chips li{white-space:nowrap}
header.top{border-bottom:1px solid var(--line);padding:.6rem 1rem}
header.top a{font-weight:600;color:inherit;text-decoration:none}
main{max-width:72rem;margin:0 auto;padding:1rem}
a:any-link{color:var(--accent)}
h1{font-size:1.6rem;margin:.2rem 0 .6rem}
h2{font-size:1.25rem;margin:1.6rem 0 .6rem;border-bottom:1px solid var(--line);padding-bottom:.2rem}
table{border-collapse:collapse;width:100%}
th,td{padding:.35rem .6rem;text-align:left;vertical-align:top;border-bottom:1px solid var(--line)}
th{font-weight:600}
table.compact{width:auto;min-width:min(24rem,100%)}
td.nowrap{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
form.search{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end;margin:.5rem 0 1rem}
form.search label{display:flex;flex-direction:column;flex:1 1 9rem;font-size:.85rem;color:var(--muted)}
input,select,button{font:inherit;padding:.3rem .5rem;max-width:100%}
ul.chips{list-style:none;display:flex;flex-wrap:wrap;gap:.3rem;padding:0;margin:.3rem 0}
ul.chips li{background:#eef2f7;border:1px solid var(--line);border-radius:1rem;padding:0 .6rem;font-size:.85rem}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0}
pre{background:#f6f8fa;border:1px solid var(--line);border-radius:6px;padding:.6rem .8rem;white-space:pre-wrap;
overflow-wrap:anywhere;user-select:all}
.card pre{user-select:auto}
.card table{display:block;overflow-x:auto}
img{max-width:100%;height:auto}
.muted{color:var(--muted)}
nav.pages{display:flex;gap:1rem;margin:1rem 0}
@media (max-width:700px){
 table.rows thead{display:none}
 table.rows,table.rows tbody,table.rows tr,table.rows td{display:block;width:100%}
 table.rows tr{border:1px solid var(--line);border-radius:6px;margin:0 0 .6rem;padding:.3rem .5rem}
 table.rows td{border:0;padding:.1rem 0;text-align:left}
 table.rows td[data-label]::before{content:attr(data-label) ": ";color:var(--muted)}
 dl.facts{grid-template-columns:1fr}
 dl.facts dd{margin-bottom:.3rem}
}
"""


# -- the frame ---------------------------------------------------------------------------------------
def layout(title: str, body: str) -> str:
    """A whole HTML document: ``title`` (escaped here) and ``body`` (HTML, escaped by its maker)."""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{STYLE}</style></head><body>"
        '<header class="top"><a href="/">adapterkit hub</a></header>'
        f"<main>{body}</main></body></html>"
    )


def esc(value: Any) -> str:
    return html.escape(str(value))


def text(value: Any) -> str:
    """Any card value as escaped HTML: "—" when missing, counts with thousands separators."""
    if value is None or value == "" or value == [] or value == {}:
        return EMPTY
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return esc(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def when(seconds: Any) -> str:
    """A ``<time>`` of a creation timestamp, "—" when it is not one."""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return EMPTY
    return f'<time datetime="{moment.isoformat()}">{moment.strftime("%Y-%m-%d %H:%M")} UTC</time>'


def size(count: Any) -> str:
    """Bytes for people: ``812 B``, ``3.4 KiB``, ``1.2 MiB``."""
    if not isinstance(count, int) or isinstance(count, bool):
        return EMPTY
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def best(metrics: Any) -> str:
    """The card's first metric as ``name value`` (a train run's card holds its selection metric)."""
    numbers = [(k, v) for k, v in mapping(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return f"{esc(numbers[0][0])} {numbers[0][1]:.4g}" if numbers else EMPTY


def chips(tags: Any, label: str) -> str:
    items = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    if not items:
        return EMPTY
    return f'<ul class="chips" aria-label="{esc(label)}">' + "".join(f"<li>{esc(t)}</li>" for t in items) + "</ul>"


# -- the index ---------------------------------------------------------------------------------------
def index_page(cards: list[dict[str, Any]], query: dict[str, str], page: int, more: bool) -> str:
    """The search form, one row per adapter in ``cards``, and links to the pages before and after.

    ``query`` holds the request's ``q``, filters, ``sort`` and ``per_page``; ``more``: a next page exists."""
    found = rows(cards) if cards else '<p id="empty">No adapter matches.</p>'
    return layout("adapterkit hub", "<h1>Adapters</h1>" + search_form(query) + found + pages(query, page, more))


def search_form(query: dict[str, str]) -> str:
    fields = [("q", "text"), ("method", "method"), ("task", "task"), ("base_model", "base model")]
    inputs = "".join(
        f'<label for="{key}">{label}<input type="search" id="{key}" name="{key}" value="{esc(query.get(key, ""))}">'
        "</label>"
        for key, label in fields
    )
    chosen = query.get("sort", "newest")
    options = "".join(
        f'<option value="{key}"{" selected" if key == chosen else ""}>{label}</option>' for key, label in SORTS.items()
    )
    per_page = f'<input type="hidden" name="per_page" value="{esc(query["per_page"])}">' if "per_page" in query else ""
    sort = f'<label for="sort">sort by<select id="sort" name="sort">{options}</select></label>'
    return f'<form class="search" id="search" method="get" action="/" role="search">{inputs}{sort}{per_page}' + (
        '<button type="submit">Search</button></form>'
    )


COLUMNS = ("adapter", "method", "task", "base model", "params", "best metric", "license", "updated")


def rows(cards: list[dict[str, Any]]) -> str:
    head = "".join(f'<th scope="col">{c}</th>' for c in COLUMNS)
    body = "".join(row(card) for card in cards)
    return f'<table id="adapters" class="rows"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def row(card: dict[str, Any]) -> str:
    name = esc(card["name"])
    cells = [
        ("method", filter_link("method", card.get("method"))),
        ("task", filter_link("task", card.get("task"))),
        ("base model", filter_link("base_model", card.get("base_model"))),
        ("params", text(card.get("params"))),
        ("best metric", best(card.get("metrics"))),
        ("license", text(card.get("license"))),
        ("updated", when(card.get("created"))),
    ]
    kinds = {"params": ' class="num"', "base model": ' class="long"', "updated": ' class="nowrap"'}
    tds = "".join(f'<td data-label="{label}"{kinds.get(label, "")}>{value}</td>' for label, value in cells)
    return f'<tr class="adapter"><td class="long"><a href="/{name}">{name}</a></td>{tds}</tr>'


def filter_link(key: str, value: Any) -> str:
    """A value that, clicked, lists the adapters sharing it."""
    if not isinstance(value, str) or not value:
        return text(value)
    return f'<a href="/?{esc(urllib.parse.urlencode({key: value}))}">{esc(value)}</a>'


def pages(query: dict[str, str], page: int, more: bool) -> str:
    def link(to: int, rel: str, label: str) -> str:
        href = esc("/?" + urllib.parse.urlencode({**query, "page": to}))
        return f'<a rel="{rel}" href="{href}">{label}</a>'

    parts = [link(page - 1, "prev", "← previous")] if page > 1 else []
    parts.append(f'<span aria-current="page">page {page}</span>')
    parts += [link(page + 1, "next", "next →")] if more else []
    return f'<nav class="pages" aria-label="pages">{"".join(parts)}</nav>' if page > 1 or more else ""
