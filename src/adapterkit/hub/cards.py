"""The card an upload gets from its own files: what an ``adapter_config.json`` (adapterkit's or peft's) says.

A field that does not fit the card's schema is left out: the files were checked, the card is a summary.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from adapterkit.hub.protocol import Card, parse_json


def card_from_files(files: dict[str, bytes]) -> Card:
    """A card read from an uploaded ``adapter_config.json``, when there is one (else the empty card)."""
    try:
        config = parse_json(files["adapter_config.json"], "adapter_config.json")
    except (KeyError, ValueError):
        return Card()
    if not isinstance(config, dict):
        return Card()
    if config.get("format") == "adapterkit":
        return _fitting(_adapterkit_fields(config))
    kind = config.get("peft_type")
    method = kind.lower() if isinstance(kind, str) and kind else None
    return _fitting({"method": method, "format": "peft", "base_model": config.get("base_model_name_or_path")})


def _adapterkit_fields(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    base = config.get("base_model") if isinstance(config.get("base_model"), dict) else {}
    return {
        "method": inner.get("method"),
        "format": "adapterkit",
        "base_model": base.get("name_or_path"),
        "model_type": base.get("model_type"),
        "fingerprint": base.get("fingerprint"),
    }


def _fitting(fields: dict[str, Any]) -> Card:
    """A card of the fields that fit the schema one by one (every field has a default)."""
    kept = {}
    for key, value in fields.items():
        try:
            Card.model_validate({key: value})
        except ValidationError:
            continue
        kept[key] = value
    return Card.model_validate(kept)
