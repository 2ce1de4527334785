"""``model: "auto"``: the server picks each request's adapter from its text (``--router auto=ADAPTERS``).

The adapters are served as any others (loaded on first use, evicted when idle); the decision needs only
their routing signatures (``routing.json`` beside each adapter, written by ``adapterkit train``), read at
start. A request to the auto model is scored by :class:`adapterkit.core.routing.Router`: the frozen base
(adapters off) reads the request's routing text (a completion's prompt, a conversation's user turns) up to
the signatures' hidden layer and stops there (the middle block: half a forward over the user's words,
not over the whole templated prompt), in the engine thread between two steps and alone, so the decision
is the same whoever else is waiting. Then the request runs as if it had named the adapter chosen (or the
base model, for text of no adapter's task): it batches per row with everyone else and its tokens are the
ones that request would get. The reply's ``model`` names the choice; ``/metrics`` counts the choices.

Why not the prefill's own hidden states: the prefill runs the chosen adapter from the first layer on,
so it cannot be what chooses it; a prefill with the base up to the signature layer would leave the base's
keys and values where the adapter's belong, and the tokens would differ from the named adapter's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from adapterkit.core.routing import (
    SIGNATURE_JSON,
    Prompt,
    Router,
    RouterConfig,
    has_signature,
    load_signature,
    saved_adapter,
)
from adapterkit.errors import AdapterError

BASE = "(base)"  # the metrics label of requests sent to the base model


@dataclasses.dataclass(frozen=True)
class AutoRoute:
    """The auto model's name and the router over the served adapters it chooses among."""

    name: str
    router: Router

    async def choose(self, engine, prompt: Prompt) -> str | None:
        """The adapter for ``prompt`` (None: the base model), decided in the engine's thread between steps
        (the scoring forward shares the model with the running requests)."""
        return await asyncio.wrap_future(engine.call(lambda _model: self.router.route([prompt])[0]))


def router_folders(value: str) -> list[Path]:
    """The adapter folders of ``--router NAME=VALUE``'s value: a comma-separated list of adapter (or
    ``adapterkit train`` output) folders, or one folder whose subfolders they are."""
    paths = [Path(p) for p in value.split(",") if p]
    if len(paths) == 1 and paths[0].is_dir() and not _is_adapter(paths[0]):
        paths = sorted(p for p in paths[0].iterdir() if p.is_dir() and _is_adapter(p))
    if not paths:
        raise AdapterError(f"--router: no adapter folders in {value!r}; give DIR or PATH,PATH,...")
    return paths


def _is_adapter(path: Path) -> bool:
    try:
        saved_adapter(path)
    except AdapterError:
        return False
    return True


def auto_route(
    model, tokenizer, name: str, folders: Sequence[Path], threshold: float | None = None
) -> tuple[AutoRoute, dict[str, str]]:
    """The auto model over the adapters in ``folders`` (each with its routing signature), and the adapters
    to serve (``{name: folder}``) so that a choice can be loaded."""
    signatures, served = {}, {}
    for path in folders:
        folder, adapter = saved_adapter(path)
        if adapter in signatures:
            raise AdapterError(f"--router: two folders hold an adapter named {adapter!r}; rename one")
        if not has_signature(folder):
            raise AdapterError(
                f"--router: {folder} has no routing signature ({SIGNATURE_JSON}); `adapterkit train` writes one, "
                "or compute it from a few of the adapter's inputs: ak.save_signature(folder, ak.signature(...))"
            )
        signatures[adapter] = load_signature(folder)
        served[adapter] = str(folder)
    config = RouterConfig() if threshold is None else RouterConfig(threshold=threshold)
    return AutoRoute(name, Router(model, tokenizer, signatures, config, resident=False)), served
