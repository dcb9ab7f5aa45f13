"""Name and layout mapping between Megatron ``GPTModel`` parameters and HF tensors.

One :class:`FamilyMapping` subclass per architecture family (``llama.py``,
``qwen2.py``, ``qwen3.py``) says which tensors exist; this module does the work
they share:

* names: a Megatron *global* parameter name (``decoder.layers.<global i>...``)
  maps to one or more HF names;
* fusion: Megatron's ``linear_qkv`` is laid out per query group,
  ``[q heads of group g; k_g; v_g]`` concatenated over groups, and its
  ``linear_fc1`` is ``[gate; up]``;
* vocabulary padding: Megatron's embedding and output layer have
  ``padded_vocab`` rows (a multiple of TP); HF has ``vocab_size``. Padded rows are
  zero on the way in and dropped on the way out;
* tensor-parallel sharding: :func:`shard` and :func:`unshard` follow megatron's
  ``partition_dim`` / ``partition_stride`` attributes (stride 2 for the fused
  gate/up projection).

Both layer specs are understood: the local spec (separate ``input_layernorm`` and
``pre_mlp_layernorm``) and the transformer-engine spec (norms fused into
``linear_qkv.layer_norm_weight`` and ``linear_fc1.layer_norm_weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.models.init import full_shape, shard_of

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class WeightMappingError(ValueError):
    """A tensor is missing, unexpected, or of the wrong shape; the message names it."""


@dataclass(frozen=True)
class ParamRule:
    """How one Megatron parameter is made from HF tensors.

    Attributes:
        hf_names: The HF tensors it is built from, in fusion order.
        kind: ``copy``, ``qkv`` (fused per query group), ``gate_up`` (``[gate; up]``)
            or ``vocab`` (rows padded to the Megatron vocabulary).
    """

    hf_names: tuple[str, ...]
    kind: str


class FamilyMapping:
    """Megatron <-> HF mapping for one decoder-only family (Llama naming).

    Subclasses switch on the family's extra tensors.

    Args:
        cfg: The architecture.
    """

    family = "llama"
    qkv_bias = False
    qk_norm = False

    # Megatron per-layer suffix -> (HF per-layer suffixes, kind).
    _LAYER_RULES: dict[str, tuple[tuple[str, ...], str]] = {
        "input_layernorm.weight": (("input_layernorm.weight",), "copy"),
        "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "copy"),
        "self_attention.linear_qkv.weight": (
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
        "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "copy"),
        "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "copy"),
        "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "copy"),
        "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
        "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "copy"),
    }
    _QKV_BIAS_RULES = {
        "self_attention.linear_qkv.bias": (
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    }
    _QK_NORM_RULES = {
        "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "copy"),
        "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "copy"),
    }

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.layer_rules = dict(self._LAYER_RULES)
        if self.qkv_bias:
            self.layer_rules.update(self._QKV_BIAS_RULES)
        if self.qk_norm:
            self.layer_rules.update(self._QK_NORM_RULES)
        self.hf_shapes = self.expected_hf_shapes()

    # ------------------------------------------------------------------ names

    def rule(self, mcore_name: str) -> ParamRule:
        """The rule for a Megatron global parameter name.

        Raises:
            WeightMappingError: the name has no HF counterpart in this family.
        """
        if mcore_name == "embedding.word_embeddings.weight":
            return ParamRule(("model.embed_tokens.weight",), "vocab")
        if mcore_name == "output_layer.weight":
            src = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
            return ParamRule((src,), "vocab")
        if mcore_name == "decoder.final_layernorm.weight":
            return ParamRule(("model.norm.weight",), "copy")
        m = _LAYER.match(mcore_name)
        if m and m.group(2) in self.layer_rules:
            suffixes, kind = self.layer_rules[m.group(2)]
            return ParamRule(tuple(f"model.layers.{m.group(1)}.{s}" for s in suffixes), kind)
        raise WeightMappingError(f"Megatron parameter {mcore_name!r} has no HF counterpart for family {self.family!r}")

    def exports(self, mcore_name: str) -> bool:
        """False for parameters HF does not store (the tied output layer)."""
        return not (mcore_name == "output_layer.weight" and self.cfg.tie_word_embeddings)

    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor of the whole model with its shape, in HF order."""
        c = self.cfg
        h, hd, nq, nkv, ffn = c.hidden_size, c.kv_channels, c.num_attention_heads, c.kv_heads, c.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (nq * hd, h)
            shapes[p + "self_attn.k_proj.weight"] = (nkv * hd, h)
            shapes[p + "self_attn.v_proj.weight"] = (nkv * hd, h)
            if self.qkv_bias:
                shapes[p + "self_attn.q_proj.bias"] = (nq * hd,)
                shapes[p + "self_attn.k_proj.bias"] = (nkv * hd,)
                shapes[p + "self_attn.v_proj.bias"] = (nkv * hd,)
            shapes[p + "self_attn.o_proj.weight"] = (h, nq * hd)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (hd,)
                shapes[p + "self_attn.k_norm.weight"] = (hd,)
            shapes[p + "mlp.gate_proj.weight"] = (ffn, h)
            shapes[p + "mlp.up_proj.weight"] = (ffn, h)
            shapes[p + "mlp.down_proj.weight"] = (h, ffn)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, h)
        return shapes

    def check_hf_names(self, names) -> None:
        """Raises a one-line error for missing or unexpected HF tensors.

        ``lm_head.weight`` is accepted (and ignored) for tied embeddings, and
        rotary ``inv_freq`` buffers that old checkpoints carry are ignored.
        """
        expected = self.hf_shapes
        given = {n for n in names if not n.endswith("rotary_emb.inv_freq")}
        if self.cfg.tie_word_embeddings:
            given.discard("lm_head.weight")
        missing = [n for n in expected if n not in given]
        unexpected = sorted(given - set(expected))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise WeightMappingError(f"missing HF tensors for {self.family}: {', '.join(missing[:3])}{more}")
        if unexpected:
            more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
            raise WeightMappingError(f"unexpected HF tensors for {self.family}: {', '.join(unexpected[:3])}{more}")

    # ------------------------------------------------------------- layouts

    def to_megatron(self, mcore_name: str, hf_tensors: list[torch.Tensor], full_shape: tuple[int, ...]) -> torch.Tensor:
        """Builds the full (unsharded) Megatron tensor from its HF tensors.

        Args:
            mcore_name: Megatron global parameter name.
            hf_tensors: The tensors named by ``rule(mcore_name).hf_names``.
            full_shape: The unsharded Megatron shape (padded vocabulary included).

        Raises:
            WeightMappingError: an HF tensor has the wrong shape (naming it).
        """
        rule = self.rule(mcore_name)
        self._check_hf_shapes(rule, hf_tensors)
        if rule.kind == "copy":
            full = hf_tensors[0]
        elif rule.kind == "gate_up":
            full = torch.cat(hf_tensors, dim=0)
        elif rule.kind == "qkv":
            full = self.fuse_qkv(*hf_tensors)
        else:  # vocab
            t = hf_tensors[0]
            full = t.new_zeros(full_shape)
            full[: t.shape[0]] = t
        if tuple(full.shape) != tuple(full_shape):
            raise WeightMappingError(
                f"shape mismatch for Megatron parameter {mcore_name!r}: built {tuple(full.shape)} from "
                f"{', '.join(rule.hf_names)}, model has {tuple(full_shape)}")
        return full

    def copy_local_(self, mcore_name: str, param: torch.Tensor, hf_tensors: list[torch.Tensor], tp: int,
                    tp_rank: int) -> None:
        """Copies this TP rank's part of a Megatron parameter straight from its HF tensors.

        Equal to ``param.copy_(shard(to_megatron(...), param, tp, tp_rank))`` but reads
        only this rank's rows of each HF tensor and writes them into ``param`` in
        place: no fused or full-size intermediate is built (one copy per byte,
        casting to ``param.dtype`` on the way).

        Args:
            mcore_name: Megatron global parameter name.
            param: This rank's (TP-sharded) parameter, carrying megatron's TP attributes.
            hf_tensors: The tensors named by ``rule(mcore_name).hf_names`` (views are fine).
            tp: Tensor-parallel size.
            tp_rank: This rank's TP index.

        Raises:
            WeightMappingError: an HF tensor or the parameter has the wrong shape (naming it).
        """
        covered = 0
        for start, block in self.local_blocks(mcore_name, param, hf_tensors, tp, tp_rank):
            param[start: start + block.shape[0]].copy_(block)
            covered += block.shape[0]
        if covered < param.shape[0]:  # padded vocabulary rows
            param[covered:].zero_()

    def local_blocks(self, mcore_name: str, param: torch.Tensor, hf_tensors: list[torch.Tensor], tp: int,
                     tp_rank: int) -> list[tuple[int, torch.Tensor]]:
        """This TP rank's part of a Megatron parameter as row blocks of views of its HF tensors.

        The blocks are ``(first row, tensor)`` in row order; stacked along dim 0 they
        are this rank's parameter, except padded vocabulary rows at the end, which no
        block covers (they are zero). A block is a view of an HF tensor wherever the
        layout allows (a plain copy, either half of ``[gate; up]``, one query group's
        ``q``, ``k`` or ``v``); only a layout no view can express is built anew.
        ``param`` gives the shape and TP attributes only; its memory is not read.

        Raises:
            WeightMappingError: an HF tensor or the parameter has the wrong shape (naming it).
        """
        rule = self.rule(mcore_name)
        self._check_hf_shapes(rule, hf_tensors)
        is_tp, dim, stride = tp_attrs(param)
        sharded = is_tp and tp > 1
        fshape = tuple(full_shape(param, tp))
        built = self._full_shape_of(rule, hf_tensors, fshape)
        if built != fshape:
            raise WeightMappingError(
                f"shape mismatch for Megatron parameter {mcore_name!r}: built {built} from "
                f"{', '.join(rule.hf_names)}, model has {fshape}")
        if sharded and not ((rule.kind == "copy" and stride == 1) or (rule.kind == "gate_up" and dim == 0 and stride == 2)
                            or (rule.kind in ("qkv", "vocab") and dim == 0 and stride == 1)):
            return [(0, shard(self.to_megatron(mcore_name, hf_tensors, fshape), param, tp, tp_rank))]

        def mine(t: torch.Tensor, d: int = 0) -> torch.Tensor:
            return torch.chunk(t, tp, dim=d)[tp_rank] if sharded else t

        if rule.kind == "copy":
            return [(0, mine(hf_tensors[0], dim))]
        if rule.kind == "gate_up":
            return [(0, mine(hf_tensors[0])), (param.shape[0] // 2, mine(hf_tensors[1]))]
        if rule.kind == "qkv":
            ng, hd = self.cfg.kv_heads, self.cfg.kv_channels
            ng_local = ng // tp if sharded else ng
            per_group = self.cfg.num_attention_heads // ng * hd
            q, k, v = (mine(t) for t in hf_tensors)
            blocks, row = [], 0
            for g in range(ng_local):
                for t, n in ((q, per_group), (k, hd), (v, hd)):
                    blocks.append((row, t[g * n: (g + 1) * n]))
                    row += n
            return blocks
        # vocab: this rank's rows of the padded table
        rows = param.shape[0]
        start = tp_rank * rows if sharded else 0
        src = hf_tensors[0][start: start + rows]
        return [(0, src)] if src.shape[0] else []

    def _check_hf_shapes(self, rule: ParamRule, hf_tensors: list[torch.Tensor]) -> None:
        for name, t in zip(rule.hf_names, hf_tensors):
            if tuple(t.shape) != self.hf_shapes[name]:
                raise WeightMappingError(
                    f"shape mismatch for HF tensor {name!r}: got {tuple(t.shape)}, expected {self.hf_shapes[name]}")

    @staticmethod
    def _full_shape_of(rule: ParamRule, hf_tensors: list[torch.Tensor], fshape: tuple[int, ...]) -> tuple[int, ...]:
        """The full Megatron shape ``to_megatron`` would build (vocab: padded to ``fshape`` rows if it fits)."""
        first = tuple(hf_tensors[0].shape)
        if rule.kind == "copy":
            return first
        if rule.kind in ("qkv", "gate_up"):
            return (sum(t.shape[0] for t in hf_tensors),) + first[1:]
        return (fshape[0] if fshape and fshape[0] >= first[0] else first[0],) + first[1:]

    def to_hf(self, mcore_name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Splits a full (unsharded) Megatron tensor into its HF tensors."""
        rule = self.rule(mcore_name)
        if rule.kind == "copy":
            parts = [full]
        elif rule.kind == "gate_up":
            parts = list(torch.chunk(full, 2, dim=0))
        elif rule.kind == "qkv":
            parts = list(self.split_qkv(full))
        else:
            parts = [full[: self.cfg.vocab_size]]
        return list(zip(rule.hf_names, parts))

    def to_hf_blocks(self, mcore_name: str, blocks: list[tuple[int, torch.Tensor]]) -> list[tuple[str, list[torch.Tensor]]]:
        """:meth:`to_hf` of a full parameter given as row blocks, without copying.

        Args:
            mcore_name: Megatron global parameter name.
            blocks: The full parameter as ``(first row, tensor)`` blocks in row order.

        Returns:
            ``(hf_name, pieces)`` per HF tensor: the tensor is its pieces stacked along
            dim 0 (row ranges of the blocks, views: the halves of ``[gate; up]``, each
            query group's ``q``/``k``/``v`` rows, the true-vocabulary rows).
        """
        rule = self.rule(mcore_name)
        total = blocks[-1][0] + blocks[-1][1].shape[0] if blocks else 0
        if rule.kind == "copy":
            return [(rule.hf_names[0], row_range(blocks, 0, total))]
        if rule.kind == "vocab":
            return [(rule.hf_names[0], row_range(blocks, 0, min(self.cfg.vocab_size, total)))]
        if rule.kind == "gate_up":
            half = total // 2
            return [(rule.hf_names[0], row_range(blocks, 0, half)), (rule.hf_names[1], row_range(blocks, half, total))]
        ng, hd = self.cfg.kv_heads, self.cfg.kv_channels
        per_group = self.cfg.num_attention_heads // ng * hd
        q, k, v = [], [], []
        for g in range(ng):
            base = g * (per_group + 2 * hd)
            q += row_range(blocks, base, base + per_group)
            k += row_range(blocks, base + per_group, base + per_group + hd)
            v += row_range(blocks, base + per_group + hd, base + per_group + 2 * hd)
        return list(zip(rule.hf_names, (q, k, v)))

    def fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[nq*hd, ...]``, ``[nkv*hd, ...]`` x2 -> Megatron's ``[(nq + 2 nkv) hd, ...]``, grouped."""
        ng, hd = self.cfg.kv_heads, self.cfg.kv_channels
        rest = q.shape[1:]
        per_group = self.cfg.num_attention_heads // ng * hd
        fused = torch.cat([q.reshape(ng, per_group, *rest), k.reshape(ng, hd, *rest), v.reshape(ng, hd, *rest)], dim=1)
        return fused.reshape(-1, *rest)

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`fuse_qkv`; returns contiguous ``q, k, v``."""
        ng, hd = self.cfg.kv_heads, self.cfg.kv_channels
        rest = fused.shape[1:]
        per_group = self.cfg.num_attention_heads // ng * hd
        grouped = fused.reshape(ng, per_group + 2 * hd, *rest)
        q, k, v = torch.split(grouped, [per_group, hd, hd], dim=1)
        return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
                v.reshape(-1, *rest).contiguous())


def row_range(blocks: list[tuple[int, torch.Tensor]], start: int, stop: int) -> list[torch.Tensor]:
    """Rows ``[start, stop)`` of the tensor the ``(first row, tensor)`` blocks stack into, as views of the blocks."""
    out = []
    for first, block in blocks:
        lo, hi = max(first, start), min(first + block.shape[0], stop)
        if lo < hi:
            out.append(block[lo - first: hi - first])
    return out


def tp_attrs(param: torch.Tensor) -> tuple[bool, int, int]:
    """``(is_tensor_parallel, partition_dim, partition_stride)`` of a Megatron parameter."""
    is_tp = bool(getattr(param, "tensor_model_parallel", False))
    return is_tp, int(getattr(param, "partition_dim", 0)), int(getattr(param, "partition_stride", 1) or 1)


def shard(full: torch.Tensor, param: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """This rank's shard of ``full`` for ``param`` (identity when not TP-split)."""
    is_tp, dim, stride = tp_attrs(param)
    if not is_tp or tp == 1:
        return full
    return shard_of(full, dim, stride, tp, tp_rank)


def unshard(pieces: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every TP rank's piece, in rank order."""
    if len(pieces) == 1:
        return pieces[0]
    if stride == 1:
        return torch.cat(pieces, dim=dim)
    split = [torch.chunk(p, stride, dim=dim) for p in pieces]
    return torch.cat([split[r][j] for j in range(stride) for r in range(len(pieces))], dim=dim)
