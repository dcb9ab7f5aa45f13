"""YAML + dotted command-line overrides, validated against :class:`SDPGConfig`.

OmegaConf does the parsing, merging and type checking (structured configs);
this module turns its errors into one-line :class:`ConfigError` messages that
name the field path, and applies the algorithm preset underneath the user's
values.
"""

from __future__ import annotations

import os
from typing import Sequence

from omegaconf import OmegaConf
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
        return OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types
        raise ConfigError("--config", f"cannot parse {path}: {str(err).splitlines()[0]}") from None


def _preset_layer(file_cfg, cli_cfg):
    """The algorithm preset's values, placed under the file and CLI layers."""
    try:
        from megatron_sdpg.algo.config import PRESETS
    except ImportError:
        return OmegaConf.create({})
    name = None
    for layer in (cli_cfg, file_cfg):
        value = OmegaConf.select(layer, "algorithm.preset", default=None)
        if value is not None:
            name = value
            break
    if name is None:
        return OmegaConf.create({})
    if name not in PRESETS:
        raise ConfigError("algorithm.preset", f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return OmegaConf.create({"algorithm": dict(PRESETS[name])})


def load_config(path: str | None = None, overrides: Sequence[str] = (), world_size: int | None = None) -> SDPGConfig:
    """Loads, merges and validates a configuration.

    Precedence (lowest first): dataclass defaults, algorithm preset, YAML file,
    command-line ``a.b.c=value`` overrides.

    Args:
        path: YAML file, or None for defaults.
        overrides: Dotted overrides such as ``parallel.tp=2``.
        world_size: When given, the parallel layout is checked against it.

    Raises:
        ConfigError: unknown key, wrong type or impossible value, naming the field.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like a.b.c=value")
    file_cfg = _load_yaml(path) if path else OmegaConf.create({})
    try:
        cli_cfg = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise _as_config_error(err, "command line") from None
    schema = OmegaConf.structured(SDPGConfig)
    layers = [(_preset_layer(file_cfg, cli_cfg), "preset"), (file_cfg, path or "defaults"), (cli_cfg, "command line")]
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
