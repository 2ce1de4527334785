"""An export's folder: written whole (:func:`adapterkit.files.write_folder`), with a manifest naming its files.

An export replaces only what an earlier export wrote there (the files its ``export.json`` lists); a folder
holding anything else, the user's files, is refused before anything is written, and nothing in it changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError
from adapterkit.files import write_folder

MANIFEST = "export.json"


def earlier_files(out: Path) -> list[str]:
    """The files an earlier export wrote in ``out`` (none for a new or empty folder); a folder holding
    files that no export of adapterkit wrote raises :class:`AdapterError`."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out} is a file: pass a folder path for the export (it holds several files)")
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.is_dir() else []
    listed = set(_manifest(out).get("files", [])) | {MANIFEST}
    foreign = [name for name in present if name not in listed]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise AdapterError(
            f"{out} holds files adapterkit did not write ({shown}); they are left as they are: "
            "export into a new or empty folder"
        )
    return [name for name in present if name != MANIFEST]


def _manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == "adapterkit-export" else {}


def write_export(out: str | Path, fill: Callable[[Path], dict[str, Any]]) -> Path:
    """Write an export into folder ``out``: ``fill(tmp)`` writes its files and returns what the manifest
    records (target, type, ...). The manifest lists every file and is written last."""
    out = Path(out)
    earlier = earlier_files(out)

    def build(tmp: Path) -> None:
        info = fill(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        record = {"format": "adapterkit-export", **info, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")

    return write_folder(out, build, last=MANIFEST, stale=earlier)
