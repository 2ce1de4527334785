"""What a hub and its clients say to each other, checked the same way on both sides.

A card is a schema (:class:`Card`): the server refuses one that does not fit, and a client refuses a
hub answer that does not fit. A revision is content-addressed: its id is the sha256 of its card and
its manifest (path -> sha256 and size of each file), so a client recomputes it from what the hub
sent and refuses a mismatch, and a pinned revision means the same bytes on every hub.
Torch-free: the server imports this without the model stack.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError

REVISION = re.compile(r"[0-9a-f]{64}")
REVISION_PREFIX = re.compile(r"[0-9a-f]{7,64}")
MAX_FINGERPRINT = 20_000  # parameter tensors of a base model; a 70B Llama has under 1,000


def printable(value: str) -> str:
    """Refuse control characters (terminal escapes, NUL, newlines): card text is shown in pages and terminals."""
    for c in value:
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") and c != "\u200d":
            raise ValueError(f"control character {c!r} in {value[:40]!r}")
    return value


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return value


Text = Annotated[str, Field(max_length=300), AfterValidator(printable)]
Key = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(printable)]
Number = Annotated[float, AfterValidator(finite)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Sample(Frozen):
    """One base parameter in a fingerprint (:func:`adapterkit.core.backbone.fingerprint`)."""

    shape: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=8)]
    sample: Annotated[list[Number], Field(max_length=4)]


class Card(Frozen):
    """What an uploader says of an adapter; the hub adds ``revision``, ``created``, ``files``, ``tags``."""

    method: Key | None = None
    format: Literal["adapterkit", "peft", "adapterhub"] | None = None
    base_model: Text | None = None
    model_type: Key | None = None
    fingerprint: Annotated[dict[Text, Sample], Field(max_length=MAX_FINGERPRINT)] | None = None
    params: Annotated[StrictInt, Field(ge=0)] | None = None
    license: Key = "unknown"
    task: Key | None = None
    metrics: Annotated[dict[Key, Number], Field(max_length=32)] = {}


class Entry(Frozen):
    sha256: Digest
    size: Annotated[StrictInt, Field(ge=0)]


class Stored(Card):
    """A card as the hub serves it: the uploader's fields and the hub's."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)  # a newer hub may say more
    revision: Digest
    created: Number
    files: dict[Text, Annotated[StrictInt, Field(ge=0)]] = {}
    tags: list[Key] = []

    def card(self) -> Card:
        """The uploader's part, which the revision id covers."""
        return Card(**{k: getattr(self, k) for k in Card.model_fields})


def revision_id(card: Card, manifest: dict[str, Entry]) -> str:
    """The id of a revision: sha256 of the canonical JSON of its card and manifest."""
    body = {"card": card.model_dump(mode="json"), "manifest": {p: e.model_dump() for p, e in manifest.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_digest(fingerprint: Any) -> str | None:
    """A short name for a base model's fingerprint (:class:`Sample` per parameter), the same wherever it
    is computed (a model card, the hub's page): sha256 of its canonical JSON, samples as floats; None when
    ``fingerprint`` is not one."""
    if not isinstance(fingerprint, dict) or not fingerprint:
        return None
    try:
        canonical = {
            str(name): {"shape": [int(n) for n in s["shape"]], "sample": [float(v) for v in s["sample"]]}
            for name, s in fingerprint.items()
        }
        body = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError):
        return None
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()[:16]


def parse_json(data: bytes | str, what: str) -> Any:
    """Strict JSON from an untrusted peer: UTF-8 without a byte-order mark (``json.loads`` would also take
    UTF-16/32 bytes), no ``NaN``/``Infinity``; malformed or absurdly nested input raises ValueError."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{what} is not valid UTF-8 JSON ({str(e)[:200]})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_tree(paths: list[str]) -> None:
    """Paths that can all be files at once: none may be a folder of another (``a.json`` and ``a.json/b.json``)."""
    folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    clash = sorted(folders & set(paths))
    if clash:
        raise ValueError(f"{clash[0]!r} is both a file and a folder of other files")


def reason(error: ValidationError) -> str:
    """A short, printable account of what did not fit a schema."""
    parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5]]
    return "; ".join(parts)[:1000]
