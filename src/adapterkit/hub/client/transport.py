"""The hub client's HTTP transport: one request with a bounded answer, checked against a schema.

The token goes to the hub's origin only, never to where a redirect points elsewhere; with
``same_origin=True`` such a redirect is refused. Every answer is read within a bound, refused by its
declared length before a byte is read.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from adapterkit.errors import AdapterError, shown
from adapterkit.hub.protocol import parse_json, reason

DEFAULT_HUB = "http://127.0.0.1:8765"
MAX_ANSWER = 16 * 2**20  # a JSON answer (parsed, it can take ~25x this in memory); a card is well under 1 MB
CHUNK = 2**20
DEFAULT_PORTS = {"http": 80, "https": 443}


def hub_url(url: str | None = None) -> str:
    """The hub's base URL: ``url``, else ``$ADAPTERKIT_HUB``, else the local default."""
    return (url or os.environ.get("ADAPTERKIT_HUB") or DEFAULT_HUB).rstrip("/")


def token_of(token: str | None) -> str | None:
    """The token to send: ``token``, else ``$ADAPTERKIT_HUB_TOKEN`` (None: none)."""
    return token or os.environ.get("ADAPTERKIT_HUB_TOKEN")


class HubRequestError(AdapterError):
    """The hub refused a request (an HTTP error status), with its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubUnreachable(AdapterError):
    """No answer from the hub (refused connection, timeout, broken transfer)."""


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def same_origin_as(a: str, b: str) -> bool:
    """Whether two URLs share scheme, host and port (``http://h`` and ``http://h:80`` do)."""
    (scheme_a, host_a, port_a), (scheme_b, host_b, port_b) = origin(a), origin(b)
    port_a, port_b = port_a or DEFAULT_PORTS.get(scheme_a), port_b or DEFAULT_PORTS.get(scheme_b)
    return (scheme_a, host_a, port_a) == (scheme_b, host_b, port_b)


class Redirects(urllib.request.HTTPRedirectHandler):
    """Follow at most 5 redirects (urllib: to http, https or ftp only); the token stays with the origin it
    was meant for (urllib would send it on to any host a redirect names). ``same_origin``: a redirect
    that leaves the origin is refused before its URL is called (each hop is checked, so the whole chain
    stays with the origin of the first request)."""

    max_redirections = 5

    def __init__(self, same_origin: bool = False) -> None:
        super().__init__()
        self.same_origin = same_origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if self.same_origin and not same_origin_as(newurl, req.full_url):
            fp.close()  # urllib closes it only when it follows the redirect
            raise AdapterError(
                f"the hub at {shown(req.full_url)[:300]} redirected to {shown(newurl)[:300]}, another origin: "
                "refused (same_origin=True follows redirects within the hub's scheme, host and port only)"
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not same_origin_as(newurl, req.full_url):
            new.remove_header("Authorization")
        return new


OPENER = urllib.request.build_opener(Redirects(same_origin=False))
SAME_ORIGIN_OPENER = urllib.request.build_opener(Redirects(same_origin=True))  # both immutable: no state to share


def open_url(
    method: str,
    url: str,
    data: bytes | None = None,
    token: str | None = None,
    timeout: float = 60,
    *,
    same_origin: bool = False,
):
    """Send one request; an error status becomes :class:`HubRequestError` with the hub's reason.
    ``same_origin``: refuse (AdapterError) a redirect that leaves ``url``'s origin instead of following it."""
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token_of(token):
        req.add_header("Authorization", f"Bearer {token_of(token)}")
    try:
        return (SAME_ORIGIN_OPENER if same_origin else OPENER).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise HubRequestError(e.code, f"hub {url}: {e.code} {_refusal(e)}") from None
    except AdapterError:  # a refused redirect: an AdapterError is a ValueError, not an unreachable hub
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise HubUnreachable(f"cannot reach the hub at {url}: {shown(str(getattr(e, 'reason', e)))[:300]}") from None


def _refusal(error: urllib.error.HTTPError) -> str:
    """The hub's ``{"error": reason}`` (bounded, printable), else the status line's reason."""
    try:
        said = json.loads(error.read(64 * 1024))["error"]
    except (ValueError, KeyError, TypeError, RecursionError, OSError, http.client.HTTPException):
        said = error.reason
    return shown(str(said))[:500]


def read_bounded(response, limit: int, url: str, sink: Callable[[bytes], None] | None = None) -> bytes:
    """Read a body of at most ``limit`` bytes, refusing more before it is read; with ``sink``, stream
    it there chunk by chunk instead of returning it."""
    declared = response.headers.get("Content-Length")
    if declared is not None and (not re.fullmatch(r"[0-9]{1,20}", declared) or int(declared) > limit):
        raise AdapterError(f"{url}: the hub announced {shown(declared)[:30]} bytes where at most {limit} fit")
    chunks, size = [], 0
    try:
        while chunk := response.read(min(CHUNK, limit - size + 1)):
            size += len(chunk)
            if size > limit:
                raise AdapterError(f"{url}: the hub sent more than the {limit} bytes expected; refused")
            sink(chunk) if sink else chunks.append(chunk)
    except (OSError, http.client.HTTPException) as e:
        raise HubUnreachable(f"the transfer from {url} broke off: {e}") from None
    return b"".join(chunks)


def request(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    timeout: float = 60,
    *,
    same_origin: bool = False,
) -> bytes:
    """One HTTP call with a bounded answer; a refusal becomes an AdapterError carrying the hub's reason."""
    data = json.dumps(body).encode() if body is not None else None
    with open_url(method, url, data, token, timeout, same_origin=same_origin) as response:
        return read_bounded(response, MAX_ANSWER, url)


def call(method: str, url: str, token: str | None, schema: Any, body: Any = None, *, same_origin: bool = False) -> Any:
    """A JSON answer, checked against ``schema`` (a pydantic model or TypeAdapter)."""
    raw = request(method, url, body, token, same_origin=same_origin)
    try:
        data = parse_json(raw, f"the answer of {url}")
        return schema.validate_python(data) if isinstance(schema, TypeAdapter) else schema.model_validate(data)
    except (ValueError, ValidationError) as e:
        detail = reason(e) if isinstance(e, ValidationError) else str(e)
        raise AdapterError(f"the hub at {url} answered with something that does not fit: {shown(detail)}") from None
