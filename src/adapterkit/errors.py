"""Exceptions a user can cause. Each message names the problem and the fix."""


class AdapterError(ValueError):
    """Base class of every error adapterkit raises on purpose."""


class ConfigError(AdapterError):
    """Unknown preset, unknown or invalid config field."""


class ArchitectureError(AdapterError):
    """The model's architecture is not in the table and no override was given."""


class AdapterFileError(AdapterError):
    """A saved adapter is missing, corrupt, truncated or written for another model."""
