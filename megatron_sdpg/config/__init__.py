"""Typed configuration: dataclass sections, YAML + dotted overrides, validation.

``load_config``, ``save_resolved`` and ``to_yaml`` are loaded lazily, because the
schema imports the section dataclasses that live beside the code they configure
(and those import :class:`ConfigError` from here).
"""

from megatron_sdpg.config.errors import ConfigError

__all__ = ["ConfigError", "load_config", "save_resolved", "to_yaml"]


def __getattr__(name):
    if name in ("load_config", "save_resolved", "to_yaml"):
        from megatron_sdpg.config import loader

        return getattr(loader, name)
    raise AttributeError(name)
