"""Builds megatron-core ``GPTModel`` chunks for this rank from a :class:`ModelConfig`."""

from __future__ import annotations

import contextlib
import importlib.util
import math

import torch

from megatron_sdpg.models.architecture import ModelConfig, RopeScalingConfig, to_transformer_config
from megatron_sdpg.platform.distributed import ParallelGroups


def transformer_engine_available() -> bool:
    """True when transformer-engine can be used (installed and CUDA present)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def layer_spec(cfg: ModelConfig, use_te: bool | None = None):
    """The transformer-layer spec: TE's on GPU when TE is installed, else the local one."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = transformer_engine_available() if use_te is None else use_te
    qk_norm = cfg.arch == "qwen3"
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")


def llama3_inv_freq(dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling (all four HF parameters honoured).

    Returns:
        ``[dim/2]`` float32 inverse frequencies.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling.factor <= 0:
        return inv_freq.float()
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def _leave_uninitialised(weight: torch.Tensor) -> torch.Tensor:
    """An init method that draws nothing (the weights are loaded right after)."""
    return weight


@contextlib.contextmanager
def _no_cpu_master_weights():
    """Makes megatron's CPU initialisation only tag the TP attributes of each weight.

    With ``use_cpu_initialization`` megatron builds every TP-split weight as a
    full-size fp32 "master" tensor, draws it, casts it and copies this rank's
    slice into the parameter: transiently ~3x the largest tensor (the embedding)
    on top of the model. When the weights are loaded right after, none of that is
    needed; the parameters stay ``torch.empty`` (no pages touched until loaded).
    """
    from megatron.core.tensor_parallel import layers

    def tag_only(weight, output_size, input_size, per_partition_size, partition_dim, init_method, stride=1,
                 return_master_weight=False, *, skip_set_tensor_parallel_attributes=False, **_):
        if not skip_set_tensor_parallel_attributes:
            layers.set_tensor_model_parallel_attributes(tensor=weight, is_parallel=True, dim=partition_dim,
                                                        stride=stride)
        return None

    original = layers._initialize_affine_weight_cpu
    layers._initialize_affine_weight_cpu = tag_only
    try:
        yield
    finally:
        layers._initialize_affine_weight_cpu = original


def build_model_chunks(cfg: ModelConfig, groups: ParallelGroups, use_te: bool | None = None,
                       init_weights: bool = True) -> list:
    """Builds this rank's model chunk(s): one per virtual pipeline stage.

    Args:
        cfg: The architecture (already resolved from ``hf_dir`` if any).
        groups: Process groups of this rank.
        use_te: Force the transformer-engine spec on or off (default: auto).
        init_weights: Run megatron's random initialisation. Off when the weights
            are loaded right after (converters): saves the time of drawing them.

    Returns:
        A list of ``GPTModel`` (length ``vpp`` or 1) on the current device, in
        ``cfg.params_dtype``. Output logits are ``[b, s, padded_vocab/tp]``.
    """
    layout = groups.layout
    tcfg = to_transformer_config(cfg, layout.tp, layout.pp, layout.cp, layout.vpp)
    if not init_weights:
        # Not perform_initialization=False: megatron then skips tagging the TP
        # attributes (partition_dim/stride) of CPU-initialised weights.
        tcfg.init_method = tcfg.output_layer_init_method = tcfg.embedding_init_method = _leave_uninitialised
    spec = layer_spec(cfg, use_te)
    n_chunks = layout.vpp or 1
    chunks = []
    with contextlib.nullcontext() if init_weights else _no_cpu_master_weights():
        for vp_stage in range(n_chunks):
            chunks.append(_build_chunk(cfg, groups, tcfg, spec, vp_stage, n_chunks))
    return chunks


def _build_chunk(cfg: ModelConfig, groups: ParallelGroups, tcfg, spec, vp_stage: int, n_chunks: int):
    """One ``GPTModel`` chunk (virtual stage ``vp_stage`` of ``n_chunks``) on the current device."""
    from megatron.core.models.gpt import GPTModel

    layout = groups.layout
    vp = vp_stage if layout.vpp else None
    first = groups.pp_rank == 0 and vp_stage == 0
    last = groups.pp_rank == layout.pp - 1 and vp_stage == n_chunks - 1
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size(layout.tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        pg_collection=groups.pg,
        vp_stage=vp,
    )
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None:
        rotary.inv_freq = llama3_inv_freq(cfg.kv_channels, cfg.rope_theta, cfg.rope_scaling).to(
            rotary.inv_freq.device
        )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mask_padded_vocab(logits: torch.Tensor, true_vocab: int, tp_rank: int) -> torch.Tensor:
    """Sets the logits of padded vocabulary rows to -inf (in place) on this shard.

    Args:
        logits: ``[..., padded_vocab/tp]`` logits of this tensor-parallel rank.
        true_vocab: The unpadded vocabulary size.
        tp_rank: This rank's index in the tensor-parallel group.

    Returns:
        ``logits`` (the same tensor).
    """
    shard = logits.shape[-1]
    start = tp_rank * shard
    n_valid = max(0, min(shard, true_vocab - start))
    if n_valid < shard:
        logits[..., n_valid:] = float("-inf")
    return logits
