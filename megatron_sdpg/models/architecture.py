"""HF-style architecture description and its one translation to Megatron's config.

``ModelConfig`` is the ``model`` config section. It is either written out by hand
(tiny test models) or read from an HF ``config.json`` (``hf_dir``), for the
Llama, Qwen2 and Qwen3 families. :func:`to_transformer_config` is the only place
in the project that builds a megatron ``TransformerConfig``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from megatron_sdpg.config.errors import ConfigError

SUPPORTED_ARCHITECTURES = {
    # HF ``model_type`` -> family; the family fixes qkv bias and qk-norm.
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


@dataclass
class RopeScalingConfig:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3``); ``factor`` 0 = off."""

    factor: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """The architecture (config section ``model``).

    Attributes:
        hf_dir: An HF model directory. When set, architecture fields are read from
            its ``config.json`` (explicit fields here must then be left at defaults
            or agree) and the initial weights come from it via the converter.
        arch: ``llama``, ``qwen2`` (qkv bias) or ``qwen3`` (qk RMSNorm).
        vocab_size: True vocabulary size; Megatron pads it to a multiple of tp.
        head_dim: Per-head size; 0 means ``hidden_size // num_attention_heads``.
        num_key_value_heads: GQA groups; 0 means equal to the attention heads.
        params_dtype: ``float32`` or ``bfloat16`` (bf16 mixed precision with fp32
            master weights in the optimizer).
        recompute: Full activation recomputation of each layer.
        megatron_dir: A converted Megatron checkpoint (``tools/convert_hf_to_megatron.py``)
            to start from; when empty the HF safetensors of ``hf_dir`` are loaded directly.
    """

    hf_dir: str | None = None
    megatron_dir: str | None = None
    arch: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 0
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    params_dtype: str = "float32"
    recompute: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.params_dtype]

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of ``tp`` (padded rows are masked)."""
        return int(math.ceil(self.vocab_size / tp) * tp)

    def validate(self, prefix: str = "model", tp: int = 1, pp: int = 1, vpp: int | None = None) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{prefix}.arch",
                f"unsupported architecture {self.arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}",
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"{prefix}.params_dtype", f"must be float32 or bfloat16, got {self.params_dtype!r}")
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{prefix}.num_attention_heads",
                f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size} (set head_dim)",
            )
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"{prefix}.num_key_value_heads",
                f"{self.kv_heads} KV heads do not divide {self.num_attention_heads} attention heads",
            )
        if self.num_attention_heads % tp:
            raise ConfigError(f"{prefix}.num_attention_heads", f"tp={tp} does not divide {self.num_attention_heads} heads")
        if self.kv_heads % tp:
            raise ConfigError(f"{prefix}.num_key_value_heads", f"tp={tp} does not divide {self.kv_heads} KV heads")
        stages = pp * (vpp or 1)
        if self.num_layers % stages:
            what = f"pp={pp}" + (f" x vpp={vpp}" if vpp else "")
            raise ConfigError(f"{prefix}.num_layers", f"{what} does not divide {self.num_layers} layers")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """Loads ``config.json`` from an HF directory with a readable error."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError("model.hf_dir", f"no config.json in {hf_dir!r}")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except ValueError as err:  # JSON or UTF-8
        raise ConfigError("model.hf_dir", f"{path} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(hf, dict):
        raise ConfigError("model.hf_dir", f"{path} must hold a JSON object, got {type(hf).__name__}")
    return hf


def model_config_from_hf(hf: dict[str, Any], hf_dir: str | None = None, **overrides: Any) -> ModelConfig:
    """Builds a :class:`ModelConfig` from an HF ``config.json`` dictionary.

    Args:
        hf: The parsed HF config (transformers 4.x or 5.x layout).
        hf_dir: Recorded as ``ModelConfig.hf_dir``.
        **overrides: Non-architecture fields (``params_dtype``, ``recompute``...).

    Raises:
        ConfigError: unsupported ``model_type``.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            "model.hf_dir",
            f"unsupported HF model_type {model_type!r} in {hf_dir or 'config'}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}",
        )
    try:
        cfg = _architecture_from_hf(hf, model_type, hf_dir)
    except ConfigError:
        raise
    except KeyError as err:
        raise ConfigError("model.hf_dir", f"{hf_dir or 'config'}: config.json has no {err}") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise ConfigError("model.hf_dir", f"{hf_dir or 'config'}: bad value in config.json ({err})") from None
    known = {f.name for f in fields(ModelConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"model.{key}", "unknown field")
        setattr(cfg, key, value)
    return cfg


def _architecture_from_hf(hf: dict[str, Any], model_type: str, hf_dir: str | None) -> ModelConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = RopeScalingConfig()
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScalingConfig(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
    elif rope_type not in ("default", None):
        raise ConfigError("model.hf_dir", f"unsupported rope type {rope_type!r} in {hf_dir or 'config'}")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("model.hf_dir", "Qwen2 sliding-window attention is not supported")
    return ModelConfig(
        hf_dir=hf_dir,
        arch=SUPPORTED_ARCHITECTURES[model_type],
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=int(hf.get("head_dim") or 0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fills the architecture from ``cfg.hf_dir`` when set; otherwise returns ``cfg``."""
    if not cfg.hf_dir:
        return cfg
    return model_config_from_hf(
        read_hf_config(cfg.hf_dir), hf_dir=cfg.hf_dir, params_dtype=cfg.params_dtype, recompute=cfg.recompute,
        megatron_dir=cfg.megatron_dir
    )


def to_transformer_config(cfg: ModelConfig, tp: int, pp: int, cp: int = 1, vpp: int | None = None,
                          sequence_parallel: bool = False):
    """The one translation to megatron-core's ``TransformerConfig``.

    Fusions that need CUDA kernels are off; dropout is 0 (RL fine-tuning);
    ``calculate_per_token_loss`` is on so the loss contract's ``num_tokens`` is
    the normaliser across micro-batches and data-parallel ranks.
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    bf16 = cfg.params_dtype == "bfloat16"
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.kv_heads,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.arch == "qwen2",
        qk_layernorm=cfg.arch == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        params_dtype=cfg.torch_dtype,
        bf16=bf16,
        pipeline_dtype=cfg.torch_dtype,
        autocast_dtype=cfg.torch_dtype if bf16 else None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        attention_softmax_in_fp32=True,
        calculate_per_token_loss=True,
        recompute_granularity="full" if cfg.recompute else None,
        recompute_method="uniform" if cfg.recompute else None,
        recompute_num_layers=1 if cfg.recompute else None,
    )
