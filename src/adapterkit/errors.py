"""Exceptions a user can cause. Each message names the problem and the fix."""


class AdapterError(ValueError):
    """Base class of every error adapterkit raises on purpose."""


class ConfigError(AdapterError):
    """Unknown preset, unknown or invalid config field."""


class ArchitectureError(AdapterError):
    """The model's architecture is not in the table and no override was given."""


class AdapterFileError(AdapterError):
    """A saved adapter is missing, corrupt, truncated or written for another model."""


class ModelSourceError(AdapterError):
    """A base model that cannot be had: neither a local folder nor a Hub id that is cached or can be downloaded."""


def shown(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences) written as escapes."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)
