"""Which format a saved adapter folder is in: adapterkit's own, peft's or AdapterHub's."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from adapterkit.core.entries import CONFIG_FILE
from adapterkit.core.formats import FORMAT, adapterhub, peft, read_json
from adapterkit.errors import AdapterFileError

PEERS: dict[str, ModuleType] = {"peft": peft, "adapterhub": adapterhub}


def locate(path: Path, name: str | None = None) -> tuple[Path, dict[str, Any], ModuleType | None]:
    """``(folder, config, peer format module or None for adapterkit's own)`` of a saved adapter.

    A folder without a config of its own may hold the adapter in sub-folder ``name`` (peft's
    layout for adapters not called "default").
    """
    folder = path if (path / CONFIG_FILE).is_file() or not name else path / name
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterFileError(f"{path / CONFIG_FILE} not found: {path} is not a saved adapter folder")
    data = read_json(folder / CONFIG_FILE)
    if data.get("format") == FORMAT:
        return folder, data, None
    for peer in PEERS.values():
        if peer.matches(data):
            return folder, data, peer
    raise AdapterFileError(f"{folder / CONFIG_FILE} is neither an adapterkit, a peft nor an AdapterHub adapter config")
