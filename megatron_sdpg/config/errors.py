"""The one error type for bad configuration, always naming the field path."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or impossible.

    The message is one line that starts with the dotted field path, e.g.
    ``parallel.tp: tp*pp*cp=6 does not divide world size 4``.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def require(condition: bool, field: str, message: str) -> None:
    """Raises ``ConfigError(field, message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, message)
