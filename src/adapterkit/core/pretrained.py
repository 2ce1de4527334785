"""Base models by local folder or Hugging Face Hub id, through transformers' own resolution and cache.

``--model HuggingFaceTB/SmolLM2-135M-Instruct`` is handed to ``from_pretrained`` as it is: transformers
downloads it once into huggingface_hub's cache (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``) and reads it
from there afterwards, also with ``HF_HUB_OFFLINE=1``. What cannot be had (a missing folder, an id that
is not cached while offline) raises :class:`~adapterkit.errors.ModelSourceError` saying what to do.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import ModelSourceError

if TYPE_CHECKING:
    import torch


def from_pretrained(auto_class: Any, source: str | os.PathLike, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(source, **kwargs)`` (a model, config or tokenizer class) from a local
    folder or a Hub id; a source that cannot be had raises :class:`ModelSourceError`."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # transformers' errors for missing files and ids (HFValidationError)
        raise ModelSourceError(explain(getattr(auto_class, "__name__", str(auto_class)), str(source), e)) from e


def tokenizer(source: str | os.PathLike, **kwargs: Any) -> Any:
    """The tokenizer of ``source`` (as :func:`from_pretrained`), padding with its end-of-sequence token where it
    names no padding token of its own (causal LMs): the one place adapterkit decides that."""
    from transformers import AutoTokenizer

    loaded = from_pretrained(AutoTokenizer, source, **kwargs)
    if loaded.pad_token is None and loaded.eos_token is not None:
        loaded.pad_token = loaded.eos_token
    return loaded


def causal_lm(source: str | os.PathLike, **kwargs: Any) -> tuple[Any, Any]:
    """``(model in eval mode, tokenizer)`` of a causal LM folder or Hub id: the loader ``generate``, ``chat``,
    ``serve`` and ``export`` share (``kwargs``: ``from_pretrained``'s, e.g. ``dtype``)."""
    from transformers import AutoModelForCausalLM

    return from_pretrained(AutoModelForCausalLM, source, **kwargs).eval(), tokenizer(source)


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


# -- a checkpoint transformers left memory-mapped: its tensors read one at a time -----------------------
# transformers (5.x) loads a safetensors checkpoint as views of a private memory mapping of the file: nothing
# is read until touched, but once touched (quantize_base reading a Linear weight, a forward) the pages stay
# resident for as long as any view is alive, e.g. the fp32 embedding of a quantized model. Reading a tensor
# with pread into memory of its own instead never brings the mapping's pages in.


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One region of a file mapped into this process: addresses ``[start, end)`` hold the file from ``offset``."""

    start: int
    end: int
    offset: int
    path: str


def clean_mappings(suffix: str = ".safetensors") -> list[Mapping]:
    """The regions of ``*suffix`` files mapped into this process in which no page was written through the
    mapping (so the file holds what the tensors show); empty where ``/proc/self/smaps`` is not (not Linux)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return []
    found, current, dirty, inode = [], None, 0, "0"
    for line in [*text.splitlines(), "0-0 ---p 0 00:00 0"]:  # the sentinel closes the last region
        head = _REGION.match(line)
        if head is None:
            key, _, value = line.partition(":")
            # a page written through a private mapping becomes anonymous (copy on write); Private_Dirty would
            # also count the file's own pages not yet written back (a checkpoint just saved)
            dirty += int(value.split()[0]) if key == "Anonymous" else 0
            continue
        if current is not None and current.path.endswith(suffix) and not dirty and _same_file(current.path, inode):
            found.append(current)
        start, end, offset, inode, path = head.groups()
        current, dirty = Mapping(int(start, 16), int(end, 16), int(offset, 16), path.strip()), 0
    return found


_REGION = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ (\d+)\s*(.*)$")


def _same_file(path: str, inode: str) -> bool:
    """Whether ``path`` is still the file that was mapped (not replaced since: then pread would read another)."""
    try:
        return os.stat(path).st_ino == int(inode)
    except OSError:
        return False


def file_place(tensor: torch.Tensor, mappings: list[Mapping]) -> tuple[str, int] | None:
    """``(path, offset)`` of ``tensor``'s bytes when it is a contiguous CPU view of one of ``mappings``;
    ``None`` when it lives in ordinary memory."""
    ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    if not size or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return None
    where = next((m for m in mappings if m.start <= ptr and ptr + size <= m.end), None)
    return None if where is None else (where.path, where.offset + ptr - where.start)


def read_tensor(path: str, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``like``'s shape and dtype read with pread from ``path`` at ``offset``, in memory of its own."""
    import torch  # here: this module is imported by the CLI before it needs torch

    out = torch.empty(like.shape, dtype=like.dtype)
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(buffer):  # pread may return fewer bytes than asked
            n = os.preadv(f.fileno(), [buffer[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{path} ended before the tensor at byte {offset} did: was it changed while loaded?")
            done += n
    return out
