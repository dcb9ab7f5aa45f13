"""Parameter counts of a Llama/Qwen-style GPT model, per pipeline stage and TP rank.

The counts follow megatron-core's ``GPTModel`` as built by
:func:`megatron_sdpg.models.builder.build_model_chunks`: fused QKV (with bias for
Qwen2), a gated MLP (``fc1`` of width ``2*ffn``), RMSNorm weights replicated on
every tensor-parallel rank, the vocabulary padded to a multiple of ``tp``, the
embedding on the first stage and the output layer on the last (tied weights keep
a copy on the last stage too when ``pp > 1``). The unit tests check these
numbers against the built model.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.models.architecture import ModelConfig


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer layer on one TP rank.

    Attributes:
        matmul: Elements of the TP-sharded weight matrices (QKV, proj, fc1, fc2).
        replicated: Elements replicated on every TP rank (norm weights; QKV bias is sharded
            and counted in ``sharded_bias``).
        sharded_bias: QKV bias elements on this rank (Qwen2).
    """

    matmul: int
    replicated: int
    sharded_bias: int

    @property
    def total(self) -> int:
        return self.matmul + self.replicated + self.sharded_bias


def layer_params(cfg: ModelConfig, tp: int = 1) -> LayerParams:
    """One layer's parameters on one of ``tp`` tensor-parallel ranks."""
    h, d = cfg.hidden_size, cfg.kv_channels
    heads, kv = cfg.num_attention_heads, cfg.kv_heads
    qkv_out = (heads + 2 * kv) * d
    matmul = (h * qkv_out + heads * d * h + h * 2 * cfg.intermediate_size + cfg.intermediate_size * h) // tp
    replicated = 2 * h + (2 * d if cfg.arch == "qwen3" else 0)  # two RMSNorms (+ q/k norms)
    bias = qkv_out // tp if cfg.arch == "qwen2" else 0
    return LayerParams(matmul=matmul, replicated=replicated, sharded_bias=bias)


def layers_per_stage(num_layers: int, pp: int) -> list[int]:
    """Layers held by each pipeline stage (megatron splits evenly; the remainder goes first)."""
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one GPU of pipeline stage ``stage`` (one TP rank).

    Attributes:
        stage: Pipeline stage index.
        layers: Transformer layers on this stage.
        layer_params: Their parameters.
        embedding: Input embedding rows x hidden on this rank (first stage).
        output_layer: Output projection on this rank (last stage, also when tied and pp > 1).
        final_norm: Final RMSNorm weight (last stage).
    """

    stage: int
    layers: int
    layer_params: int
    embedding: int
    output_layer: int
    final_norm: int

    @property
    def total(self) -> int:
        return self.layer_params + self.embedding + self.output_layer + self.final_norm


def stage_params(cfg: ModelConfig, tp: int, pp: int) -> list[StageParams]:
    """Per-stage parameter counts on one TP rank, for every pipeline stage."""
    per_layer = layer_params(cfg, tp).total
    vocab_rows = cfg.padded_vocab_size(tp) // tp
    out = []
    for i, n in enumerate(layers_per_stage(cfg.num_layers, pp)):
        first, last = i == 0, i == pp - 1
        embedding = vocab_rows * cfg.hidden_size if first else 0
        has_output = last and not (cfg.tie_word_embeddings and first)
        out.append(StageParams(
            stage=i,
            layers=n,
            layer_params=n * per_layer,
            embedding=embedding,
            output_layer=vocab_rows * cfg.hidden_size if has_output else 0,
            final_norm=cfg.hidden_size if last else 0,
        ))
    return out


def total_params(cfg: ModelConfig) -> int:
    """Parameters of the whole model (unpadded vocabulary, no TP)."""
    return stage_params(cfg, tp=1, pp=1)[0].total


def matmul_params_per_token(cfg: ModelConfig, vocab: int | None = None) -> int:
    """Weights touched by one token's forward matmuls: every layer's matrices plus the LM head."""
    per_layer = layer_params(cfg, tp=1).matmul
    return cfg.num_layers * per_layer + (vocab or cfg.vocab_size) * cfg.hidden_size
