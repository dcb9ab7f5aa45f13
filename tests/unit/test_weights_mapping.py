"""The HF <-> Megatron mapping without processes: layouts against explicit references, and errors."""

import json

import pytest
import torch

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.models.architecture import ModelConfig, model_config_from_hf
from megatron_sdpg.models.init import shard_of
from megatron_sdpg.weights import WeightMappingError, mapping_for
from megatron_sdpg.weights.mapping_base import unshard
from megatron_sdpg.weights.hf_source import param_rows


def _cfg(**kw) -> ModelConfig:
    base = dict(arch="qwen2", vocab_size=11, hidden_size=8, intermediate_size=6, num_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=3)
    base.update(kw)
    return ModelConfig(**base)


def test_fused_qkv_is_grouped_per_query_group_like_megatron():
    cfg = _cfg()
    m = mapping_for(cfg)
    hd, ng, heads_per_group = 3, 2, 2
    q, k, v = torch.randn(12, 8), torch.randn(6, 8), torch.randn(6, 8)
    # Explicit reference: for each group g, its query heads' rows, then k_g, then v_g.
    rows = []
    for g in range(ng):
        for h in range(g * heads_per_group, (g + 1) * heads_per_group):
            rows += list(q[h * hd:(h + 1) * hd])
        rows += list(k[g * hd:(g + 1) * hd]) + list(v[g * hd:(g + 1) * hd])
    fused = m.fuse_qkv(q, k, v)
    assert torch.equal(fused, torch.stack(rows))
    back = m.split_qkv(fused)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    bias = [torch.randn(12), torch.randn(6), torch.randn(6)]
    assert all(torch.equal(a, b) for a, b in zip(m.split_qkv(m.fuse_qkv(*bias)), bias))


@pytest.mark.parametrize("tp,stride", [(1, 1), (2, 1), (4, 1), (2, 2), (3, 2)])
def test_unshard_inverts_megatron_sharding(tp, stride):
    full = torch.randn(12 * stride, 5)
    pieces = [shard_of(full, 0, stride, tp, r) for r in range(tp)]
    assert torch.equal(unshard(pieces, 0, stride), full)
    full_t = full.t().contiguous()
    assert torch.equal(unshard([shard_of(full_t, 1, stride, tp, r) for r in range(tp)], 1, stride), full_t)


def test_gate_up_stride_two_gives_each_rank_its_gate_then_its_up_rows():
    gate, up = torch.arange(4.0).view(4, 1), 100 + torch.arange(4.0).view(4, 1)
    m = mapping_for(_cfg(intermediate_size=4, hidden_size=1, num_attention_heads=1, num_key_value_heads=1))
    fused = m.to_megatron("decoder.layers.0.mlp.linear_fc1.weight", [gate, up], (8, 1))
    rank1 = shard_of(fused, 0, 2, 2, 1)
    assert torch.equal(rank1, torch.cat([gate[2:4], up[2:4]]))


def test_vocab_rows_are_padded_with_zeros_and_unpadded():
    cfg = _cfg(tie_word_embeddings=True)
    m = mapping_for(cfg)
    emb = torch.randn(11, 8)
    full = m.to_megatron("output_layer.weight", [emb], (12, 8))
    assert torch.equal(full[:11], emb) and torch.equal(full[11], torch.zeros(8))
    assert m.rule("output_layer.weight").hf_names == ("model.embed_tokens.weight",)
    assert not m.exports("output_layer.weight")
    (name, back), = m.to_hf("embedding.word_embeddings.weight", full)
    assert name == "model.embed_tokens.weight" and torch.equal(back, emb)


def test_both_layer_specs_map_their_norms():
    m = mapping_for(_cfg(arch="qwen3"))
    assert m.rule("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight").hf_names == \
        m.rule("decoder.layers.1.input_layernorm.weight").hf_names == ("model.layers.1.input_layernorm.weight",)
    assert m.rule("decoder.layers.0.mlp.linear_fc1.layer_norm_weight").hf_names == \
        ("model.layers.0.post_attention_layernorm.weight",)
    assert m.rule("decoder.layers.0.self_attention.k_layernorm.weight").hf_names == \
        ("model.layers.0.self_attn.k_norm.weight",)


def test_missing_and_unexpected_tensors_are_named():
    m = mapping_for(_cfg(arch="llama"))
    names = list(m.expected_hf_shapes())
    with pytest.raises(WeightMappingError, match=r"^missing HF tensors for llama: model.layers.1.mlp.up_proj.weight$"):
        m.check_hf_names([n for n in names if n != "model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(WeightMappingError,
                       match=r"^unexpected HF tensors for llama: model.layers.0.self_attn.q_proj.bias$"):
        m.check_hf_names(names + ["model.layers.0.self_attn.q_proj.bias"])
    m.check_hf_names(names + ["model.layers.0.self_attn.rotary_emb.inv_freq"])  # old checkpoints: ignored


def test_shape_mismatch_names_the_tensor():
    m = mapping_for(_cfg())
    with pytest.raises(WeightMappingError, match=r"^shape mismatch for HF tensor 'model.layers.0.self_attn.v_proj.weight': "
                                                 r"got \(5, 8\), expected \(6, 8\)$"):
        m.to_megatron("decoder.layers.0.self_attention.linear_qkv.weight",
                      [torch.zeros(12, 8), torch.zeros(6, 8), torch.zeros(5, 8)], (24, 8))


def test_unsupported_architecture_and_tp_not_dividing_heads():
    with pytest.raises(ConfigError, match="unsupported HF model_type 'gpt2'"):
        model_config_from_hf({"model_type": "gpt2", "vocab_size": 10})
    with pytest.raises(ConfigError, match=r"^model.num_attention_heads: tp=3 does not divide 4 heads$"):
        _cfg().validate("model", tp=3)


def test_pp_not_dividing_the_layers_is_a_config_error():
    layers = _cfg().num_layers
    _cfg().validate("model", pp=layers)
    with pytest.raises(ConfigError, match=rf"^model.num_layers: pp={layers + 1} does not divide {layers} layers$"):
        _cfg().validate("model", pp=layers + 1)
    with pytest.raises(ConfigError, match=rf"^model.num_layers: pp=1 x vpp={layers + 1} does not divide"):
        _cfg().validate("model", vpp=layers + 1)


def _write_hf_config(path, **kw):
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(kw)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("exists", "error: output directory '{out}' already exists (pass --overwrite to replace it)"),
    ("arch", "error: model.hf_dir: unsupported HF model_type 'gpt2' in {hf}; supported: ['llama', 'qwen2', 'qwen3']"),
    ("tp", "error: model.num_attention_heads: tp=3 does not divide 4 heads"),
])
def test_cli_prints_one_line_errors_before_starting_processes(tmp_path, capsys, case, message):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_megatron",
        os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_hf_to_megatron.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    hf = _write_hf_config(tmp_path / "hf", model_type="gpt2" if case == "arch" else "llama")
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
    argv = ["--hf-dir", hf, "--megatron-dir", str(out)] + (["--tp", "3"] if case == "tp" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == message.format(out=out, hf=hf)


def _fake_param(full: torch.Tensor, tp: int, rank: int, is_tp: bool, dim: int, stride: int) -> torch.Tensor:
    local = shard_of(full, dim, stride, tp, rank) if is_tp else full
    p = torch.full_like(local, float("nan"))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = is_tp, dim, stride
    return p


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_copy_local_equals_sharding_the_fused_full_tensor(tp, arch):
    """Direct per-rank copies == shard(to_megatron(...)) for every rule kind, TP split and dtype cast."""
    cfg = _cfg(arch=arch, num_attention_heads=8, num_key_value_heads=4, intermediate_size=8, vocab_size=13)
    m = mapping_for(cfg)
    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen) for n, s in m.hf_shapes.items()}
    padded = 16
    cases = [  # (megatron name, is_tp, partition dim, stride, full shape)
        ("embedding.word_embeddings.weight", True, 0, 1, (padded, 8)),
        ("output_layer.weight", True, 0, 1, (padded, 8)),
        ("decoder.final_layernorm.weight", False, 0, 1, (8,)),
        ("decoder.layers.1.self_attention.linear_qkv.weight", True, 0, 1, (48, 8)),
        ("decoder.layers.1.self_attention.linear_proj.weight", True, 1, 1, (8, 24)),
        ("decoder.layers.0.mlp.linear_fc1.weight", True, 0, 2, (16, 8)),
        ("decoder.layers.0.mlp.linear_fc2.weight", True, 1, 1, (8, 8)),
        ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", False, 0, 1, (8,)),
    ]
    if arch == "qwen2":
        cases.append(("decoder.layers.0.self_attention.linear_qkv.bias", True, 0, 1, (48,)))
    for name, is_tp, dim, stride, shape in cases:
        srcs = [hf[n] for n in m.rule(name).hf_names]
        full = m.to_megatron(name, srcs, shape)
        for rank in range(tp):
            for dtype in (torch.float32, torch.bfloat16):
                p = _fake_param(full, tp, rank, is_tp, dim, stride).to(dtype)
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = is_tp, dim, stride
                m.copy_local_(name, p, srcs, tp, rank)
                ref = (shard_of(full, dim, stride, tp, rank) if is_tp and tp > 1 else full).to(dtype)
                assert torch.equal(p, ref), f"{name} tp={tp} rank={rank} {dtype}"
                # What a streaming save asks for: any whole-row range (e.g. one half of fc1).
                blocks = m.local_blocks(name, p, srcs, tp, rank)
                rows = p.shape[0]
                for start, stop in ((0, rows), (0, rows // 2), (rows // 2, rows), (1, rows - 1)):
                    got = param_rows(blocks, start, stop, p)
                    assert got.dtype == dtype and torch.equal(got, ref[start:stop]), f"{name} rows {start}:{stop}"


def test_local_blocks_are_views_of_the_hf_tensors_where_the_layout_allows():
    """Plain copies, the fc1 halves and per-group q/k/v come without a copy; only padding or casts copy."""
    cfg = _cfg(num_attention_heads=8, num_key_value_heads=4, intermediate_size=8, vocab_size=16)
    m = mapping_for(cfg)
    hf = {n: torch.randn(s) for n, s in m.hf_shapes.items()}

    def storages(name, param):
        srcs = [hf[n] for n in m.rule(name).hf_names]
        ptrs = {t.untyped_storage().data_ptr() for t in srcs}
        return [b.untyped_storage().data_ptr() in ptrs for _, b in m.local_blocks(name, param, srcs, 1, 0)]

    assert storages("decoder.layers.0.mlp.linear_fc1.weight", torch.empty(16, 8)) == [True, True]
    assert all(storages("decoder.layers.1.self_attention.linear_qkv.weight", torch.empty(48, 8)))
    assert storages("decoder.layers.0.mlp.linear_fc2.weight", torch.empty(8, 8)) == [True]
    fc1 = m.local_blocks("decoder.layers.0.mlp.linear_fc1.weight", torch.empty(16, 8),
                         [hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]], 1, 0)
    half = param_rows(fc1, 8, 16, torch.empty(16, 8))
    assert half.data_ptr() == hf["model.layers.0.mlp.up_proj.weight"].data_ptr()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_to_hf_blocks_equals_to_hf_for_any_row_blocks_and_copies_nothing(arch):
    """Whatever row blocks a parameter comes in, each HF tensor is views of them that stack to ``to_hf``."""
    cfg = _cfg(arch=arch, num_attention_heads=8, num_key_value_heads=4, intermediate_size=8, vocab_size=13)
    m = mapping_for(cfg)
    gen = torch.Generator().manual_seed(0)
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
             "decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.self_attention.linear_proj.weight",
             "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"]
    if arch == "qwen2":
        names.append("decoder.layers.0.self_attention.linear_qkv.bias")
    for name in names:
        srcs = [torch.randn(m.hf_shapes[n], generator=gen) for n in m.rule(name).hf_names]
        rows = sum(t.shape[0] for t in srcs) if m.rule(name).kind in ("qkv", "gate_up") else srcs[0].shape[0]
        full = m.to_megatron(name, srcs, (16, 8) if m.rule(name).kind == "vocab" else (rows, *srcs[0].shape[1:]))
        for cuts in ([], [1], [3, 4, 7], list(range(1, full.shape[0]))):
            edges = [0, *[c for c in cuts if c < full.shape[0]], full.shape[0]]
            blocks = [(a, full[a:b].clone()) for a, b in zip(edges, edges[1:])]
            ptrs = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for _, b in blocks]
            got = m.to_hf_blocks(name, blocks)
            want = m.to_hf(name, full)
            assert [n for n, _ in got] == [n for n, _ in want], name
            for (n, pieces), (_, ref) in zip(got, want):
                assert torch.equal(torch.cat(pieces), ref), f"{name} {n} cuts {cuts}"
                assert all(any(lo <= p.data_ptr() < hi for lo, hi in ptrs) for p in pieces), f"{n}: a piece was copied"


def test_copy_local_names_a_misshapen_tensor_or_parameter():
    m = mapping_for(_cfg())
    p = torch.empty(11, 8)
    with pytest.raises(WeightMappingError, match="'model.embed_tokens.weight': got \\(11, 7\\)"):
        m.copy_local_("embedding.word_embeddings.weight", p, [torch.zeros(11, 7)], 1, 0)
    with pytest.raises(WeightMappingError, match="Megatron parameter 'decoder.final_layernorm.weight'"):
        m.copy_local_("decoder.final_layernorm.weight", torch.empty(9), [torch.zeros(8)], 1, 0)
