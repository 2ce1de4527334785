"""Base models by local folder or Hugging Face Hub id, through transformers' own resolution and cache.

``--model HuggingFaceTB/SmolLM2-135M-Instruct`` is handed to ``from_pretrained`` as it is: transformers
downloads it once into huggingface_hub's cache (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``) and reads it
from there afterwards, also with ``HF_HUB_OFFLINE=1``. What cannot be had (a missing folder, an id that
is not cached while offline) raises :class:`~adapterkit.errors.ModelSourceError` saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adapterkit.errors import ModelSourceError


def from_pretrained(auto_class: Any, source: str | os.PathLike, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(source, **kwargs)`` (a model, config or tokenizer class) from a local
    folder or a Hub id; a source that cannot be had raises :class:`ModelSourceError`."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # transformers' errors for missing files and ids (HFValidationError)
        raise ModelSourceError(explain(getattr(auto_class, "__name__", str(auto_class)), str(source), e)) from e


def explain(what: str, source: str, error: Exception) -> str:
    """Why ``what`` (e.g. ``AutoTokenizer``) did not load from ``source``, and the fix."""
    if Path(source).expanduser().exists():
        return f"cannot load {what} from the folder {source}: {error}"
    if not is_hub_id(source):
        return f"{source} is not a folder, nor a Hugging Face Hub id (name or org/name): give a model folder or an id"
    if hub_offline() and not is_cached(source):
        return (
            f"{source} is not a local folder, and as a Hugging Face Hub id it is not in the local cache "
            f"({hub_cache()}), which HF_HUB_OFFLINE=1 forbids filling: run once with HF_HUB_OFFLINE unset to "
            "download it, point HF_HUB_CACHE (or HF_HOME) at a cache that holds it, or pass a local folder"
        )
    return f"cannot load {what} from the Hugging Face Hub id {source}: {error}"


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a Hub repository id (``name`` or ``org/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def is_cached(repo_id: str) -> bool:
    """Whether huggingface_hub's cache holds a snapshot of ``repo_id`` (its ``config.json``, at ``main``)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
