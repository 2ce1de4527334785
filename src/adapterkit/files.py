"""Writes that a crash cannot leave half done, and that never touch what the library did not write.

Two primitives, used for every file and folder adapterkit writes (adapters, checkpoints, train
results, the hub's blobs and the client's cache, the speech data cache, run reports):

- :func:`atomic_file` / :func:`write_atomically`: one file, written beside its destination, fsynced,
  renamed over it, the folder fsynced. Readers see the old file or the new one.
- :func:`write_folder`: a set of files built in a hidden sibling folder, every file and the folder
  fsynced, then put in place. A new destination appears whole (one rename). An existing destination
  that holds only files the new set replaces is swapped whole (``renameat2(RENAME_EXCHANGE)``);
  one that also holds other files (the user's) keeps them: the new files are renamed into it one by
  one, each atomically, in sorted order with ``last`` at the end (the file readers look at first).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from adapterkit.errors import AdapterError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_TEMP_FILE = re.compile(r"\.tmp-[0-9a-f]{16}")  # atomic_file's temporary name: token_hex(8) is 16 hex digits


def is_atomic_temp(name: str) -> bool:
    """Whether ``name`` is one :func:`atomic_file` gives its temporary file (what a killed writer leaves)."""
    return _TEMP_FILE.fullmatch(name) is not None


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: it replaces ``path`` only when the block ends without
    an exception (fsynced, renamed, folder fsynced); otherwise it is removed and ``path`` is untouched."""
    tmp = path.parent / f".tmp-{secrets.token_hex(8)}"  # the name is_atomic_temp knows
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)


def cache_dir() -> Path:
    """adapterkit's cache (pulled adapters, generated data): ``$ADAPTERKIT_CACHE`` or ``~/.cache/adapterkit``."""
    return Path(os.environ.get("ADAPTERKIT_CACHE", Path.home() / ".cache" / "adapterkit"))


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def fsync_folder(folder: Path) -> None:
    """Make renames and new entries in ``folder`` survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(dest: Path, fill: Callable[[Path], None], last: str | None = None, stale: Iterable[str] = ()) -> Path:
    """Build a folder with ``fill(tmp)`` and put its files at ``dest`` (see the module's docstring).

    ``stale``: names of files in ``dest`` that an earlier write of the caller's made and this one
    supersedes; they go if the new set has none of that name. An existing *file* at ``dest`` is refused
    before anything is written. If ``fill`` raises, the temporary folder goes and ``dest`` is untouched.
    """
    dest = Path(dest).resolve() if Path(dest).is_symlink() else Path(dest)  # write into the linked folder
    if dest.exists() and not dest.is_dir():
        raise AdapterError(f"{dest} is a file, not a folder: pass a folder path (it will hold several files)")
    if dest.exists() and not os.access(dest, os.W_OK):
        raise PermissionError(f"{dest} is not writable: adapterkit does not replace a folder its owner protected")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(8)}"
    tmp.mkdir()  # not mkdtemp: its 0700 would become the destination's mode
    try:
        fill(tmp)
        _fsync_tree(tmp)
        _place(tmp, dest, last, {(name, False) for name in stale})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the replaced files
    return dest


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(Path(folder))


def _place(tmp: Path, dest: Path, last: str | None, stale: set[tuple[str, bool]]) -> None:
    new = _entries(tmp)
    if not dest.exists():
        tmp.rename(dest)
    elif _entries(dest) <= new | stale and _swap(tmp, dest):
        _return_newcomers(tmp, dest, new | stale)
    else:
        _merge(tmp, dest, last)
        for name, _ in stale - new:
            (dest / name).unlink(missing_ok=True)
    fsync_folder(dest.parent)


def _swap(tmp: Path, dest: Path) -> bool:
    """Exchange ``tmp`` and ``dest`` (the new folder takes the old one's permissions)."""
    os.chmod(tmp, dest.stat().st_mode & 0o7777)
    return _exchange(tmp, dest)


def _return_newcomers(old: Path, dest: Path, replaced: set[tuple[str, bool]]) -> None:
    """Move back what someone put in the destination between the check and the swap: only files the
    new set replaces may go."""
    for path, _ in sorted(_entries(old) - replaced):
        source, target = old / path, dest / path
        if source.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)


def _entries(root: Path) -> set[tuple[str, bool]]:
    """Every path under ``root`` (relative) with whether it is a folder; links count as files."""
    return {(p.relative_to(root).as_posix(), p.is_dir() and not p.is_symlink()) for p in root.rglob("*")}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    return call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _merge(tmp: Path, dest: Path, last: str | None) -> None:
    """Rename each new file over its namesake in ``dest``; other files in ``dest`` stay as they are."""
    files = sorted((p for p in tmp.rglob("*") if not p.is_dir()), key=lambda p: (p.name == last, str(p)))
    for file in files:
        target = dest / file.relative_to(tmp)
        if any(parent.is_symlink() for parent in target.parents if parent != dest and dest in parent.parents):
            raise AdapterError(
                f"{target.parent} is a link: adapterkit does not write through it; replace it by a folder"
            )
        if target.is_dir() and not target.is_symlink():
            raise AdapterError(f"{target} is a folder; the new {file.name} cannot replace it: move it away first")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
        fsync_folder(target.parent)
