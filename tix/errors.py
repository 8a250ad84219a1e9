"""The errors tix raises for bad input: each names what is wrong and how to fix it."""


class TixError(Exception):
    """Base of tix's user-facing errors."""


class ConfigError(TixError, ValueError):
    """A configuration value tix does not support or that cannot work."""


class CheckpointError(TixError, ValueError):
    """A model checkpoint that is missing, incomplete or inconsistent."""
