"""YAML + dotted command-line overrides, validated against :class:`SDPGConfig`.

OmegaConf does the parsing, merging and type checking (structured configs);
this module turns its errors into one-line :class:`ConfigError` messages that
name the field path, and applies the algorithm preset underneath the user's
values.
"""

from __future__ import annotations

import os
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.config.schema import SDPGConfig


def _as_config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if msg.startswith("Key ") and " not in " in msg:
        msg = f"unknown key ({source})"
    return ConfigError(str(key), f"{msg} ({source})" if "(" not in msg else msg)


def _load_yaml(path: str):
    if not os.path.isfile(path):
        raise ConfigError("--config", f"no such file: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types
        raise ConfigError("--config", f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("--config", f"{path}: the top level must be a mapping of sections (train:, model:, ...), "
                          f"got a {type(cfg).__name__.replace('Config', '').lower()}")
    return cfg


def _parse_overrides(overrides: Sequence[str]):
    """The command line's ``a.b.c=value`` items as one config; a value that does not parse names its key."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like a.b.c=value")
        try:
            OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise _as_config_error(err, "command line") from None
        except Exception as err:  # YAML errors in the value, e.g. an unquoted {placeholder}
            key, value = item.split("=", 1)
            raise ConfigError(key, f"cannot parse the value {value!r} on the command line "
                              f"({str(err).splitlines()[0]}); quote it as YAML, e.g. {key}='\"{value}\"'") from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise _as_config_error(err, "command line") from None


def _preset_name(file_cfg, cli_cfg) -> tuple[str | None, str | None]:
    """``(preset name, where it was named: "command line" or "file")``."""
    for layer, where in ((cli_cfg, "command line"), (file_cfg, "file")):
        section = layer.get("algorithm")
        if section is not None and not isinstance(section, DictConfig):
            raise ConfigError("algorithm", f"must be a mapping of fields, got {section!r} ({where})")
        value = OmegaConf.select(layer, "algorithm.preset", default=None)
        if value is not None:
            return value, where
    return None, None


def _preset_layer(name):
    """The algorithm preset's values as a config layer."""
    try:
        from megatron_sdpg.algo.config import PRESETS
    except ImportError:
        return OmegaConf.create({})
    if name is None:
        return OmegaConf.create({})
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError("algorithm.preset", f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return OmegaConf.create({"algorithm": dict(PRESETS[name])})


def load_config(path: str | None = None, overrides: Sequence[str] = (), world_size: int | None = None) -> SDPGConfig:
    """Loads, merges and validates a configuration.

    Precedence (lowest first): dataclass defaults, algorithm preset, YAML file,
    command-line ``a.b.c=value`` overrides. A preset named on the command line
    ranks above the YAML file instead (``algorithm.preset=grpo`` sets grpo's
    fields even where the file gives them; other command-line values still win).

    Args:
        path: YAML file, or None for defaults.
        overrides: Dotted overrides such as ``parallel.tp=2``.
        world_size: When given, the parallel layout is checked against it.

    Raises:
        ConfigError: unknown key, wrong type or impossible value, naming the field.
    """
    cli_cfg = _parse_overrides(overrides)
    file_cfg = _load_yaml(path) if path else OmegaConf.create({})
    schema = OmegaConf.structured(SDPGConfig)
    name, where = _preset_name(file_cfg, cli_cfg)
    preset = (_preset_layer(name), f"preset {name}")
    file_layer = (file_cfg, path or "defaults")
    layers = [file_layer, preset] if where == "command line" else [preset, file_layer]
    layers.append((cli_cfg, "command line"))
    merged = schema
    for layer, source in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _as_config_error(err, source) from None
    try:
        cfg: SDPGConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _as_config_error(err, "merged config") from None
    cfg.fill_derived()
    cfg.validate(world_size)
    return cfg


def to_yaml(cfg: SDPGConfig) -> str:
    """The resolved configuration as YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: SDPGConfig, run_dir: str) -> str:
    """Writes ``run_dir/config.yaml`` atomically; returns its path."""
    from megatron_sdpg.utils.files import write_text_atomic

    return write_text_atomic(os.path.join(run_dir, "config.yaml"), to_yaml(cfg))
