"""Errors for bad input: each message names the offending key, value or file."""


class ConfigError(ValueError):
    """A configuration key or value is invalid."""
