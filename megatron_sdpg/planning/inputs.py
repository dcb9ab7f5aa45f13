"""From a run's configuration to the planner's inputs (model, layout, workload)."""

from __future__ import annotations

import os
from dataclasses import fields, replace

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.models.architecture import ModelConfig, model_config_from_hf, read_hf_config

ARCH_FIELDS = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "tie_word_embeddings")


def planning_model(cfg: ModelConfig) -> tuple[ModelConfig, str]:
    """The architecture to plan for, and where it came from.

    When ``cfg.hf_dir`` holds a ``config.json`` its architecture is used, and every
    architecture field the YAML sets to a non-default value must agree with it (the
    YAML copy exists so that plans can be made without the checkpoint). Otherwise
    the YAML's fields are used as written.

    Raises:
        ConfigError: ``model.<field>`` when the YAML and the HF config disagree.
    """
    if not cfg.hf_dir or not os.path.isfile(os.path.join(cfg.hf_dir, "config.json")):
        return cfg, "the config's model section"
    hf = model_config_from_hf(read_hf_config(cfg.hf_dir), hf_dir=cfg.hf_dir)
    defaults = ModelConfig()
    for name in ARCH_FIELDS:
        mine, theirs = getattr(cfg, name), getattr(hf, name)
        if mine != getattr(defaults, name) and mine != theirs:
            raise ConfigError(f"model.{name}", f"the config says {mine!r} but {cfg.hf_dir}/config.json says {theirs!r}")
    keep = {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if f.name not in ARCH_FIELDS}
    keep.pop("rope_scaling", None)
    for name in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "init_std"):
        keep.pop(name, None)
    return replace(hf, **keep), f"{cfg.hf_dir}/config.json"
