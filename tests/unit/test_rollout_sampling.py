"""The CPU server's batched sampler (``rollout.server.sampling``) and its engine (``BatchGenerator``).

References are independent: splitmix64 in Python integers, top-k/top-p masks and
sampling distributions in float64 from the definitions, per-row log-probs from a
float64 dense forward without cache or padding. Distribution checks use a fixed
seed set, so they are deterministic; the chi-square bounds are the 0.999 quantiles.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sdpg.rollout.server.generator import BatchGenerator
from megatron_sdpg.rollout.server.requests import SampleRequest
from megatron_sdpg.rollout.server.sampling import keep_mask, mix64, sample, seed_key, uniforms
from megatron_sdpg.testing.rollout import reference_logprobs
from megatron_sdpg.testing.tiny_hf import EOS_ID, build_tiny_llama, load_hf_model

M64 = (1 << 64) - 1


def _splitmix_ref(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_mix64_is_splitmix64_on_int64_bit_patterns():
    values = [0, 1, -1, 2**63 - 1, -(2**63), 12345, -987654321, 0x9E3779B97F4A7C15 - 2**64]
    values += torch.randint(-(2**63), 2**63 - 1, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    got = mix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g & M64 for g in got] == [_splitmix_ref(v) for v in values]
    assert seed_key(2**64 - 1) == -1 and seed_key(-(2**63)) == -(2**63) and seed_key(7) == 7


def test_uniforms_are_keyed_by_seed_position_and_token_only():
    keys = torch.tensor([seed_key(s) for s in (0, 1, 2**64 - 1, -5)])
    u = uniforms(keys, 3, 50)
    assert u.shape == (4, 50) and float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert torch.equal(uniforms(keys[2:3], 3, 50), u[2:3])  # a row alone = the row in a batch
    assert torch.equal(uniforms(keys, torch.tensor([3, 3, 3, 3]), 50), u)
    assert torch.equal(uniforms(keys, 3, 20), u[:, :20])  # token j's noise does not depend on the vocabulary size
    assert not torch.equal(uniforms(keys, 4, 50), u)
    assert len(set(u.flatten().tolist())) == u.numel()


def _filtered_reference(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """float64: top-k (ties kept), then the smallest most-likely-first prefix reaching top_p of the kept mass."""
    p = torch.softmax(logits.double(), -1)
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    keep = order[: top_k or len(order)]
    keep += [i for i in order[len(keep):] if top_k and float(p[i]) >= float(p[keep[-1]])]
    kept_mass, mass, kept = float(p[keep].sum()), 0.0, []
    for i in keep:
        kept.append(i)
        mass += float(p[i])
        if top_p < 1.0 and mass >= top_p * kept_mass:
            break
    ref = torch.zeros_like(p)
    ref[kept] = p[kept] / p[kept].sum()
    return ref


SETTINGS = [(0, 1.0), (3, 1.0), (0, 0.6), (5, 0.3), (1, 1.0), (50, 0.95), (7, 0.0001)]


def test_keep_mask_matches_a_float64_reference_row_by_row():
    logits = torch.randn(len(SETTINGS), 50, generator=torch.Generator().manual_seed(1)) * 2
    top_k = torch.tensor([k for k, _ in SETTINGS])
    top_p = torch.tensor([p for _, p in SETTINGS])
    got = keep_mask(logits, top_k, top_p)
    for b, (k, p) in enumerate(SETTINGS):
        ref = _filtered_reference(logits[b], k, p) > 0
        assert torch.equal(got[b], ref), (k, p)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 0.999 quantiles of chi-square with df degrees of freedom.
CHI2_999 = {2: 13.82, 3: 16.27, 5: 20.52, 15: 37.70}


@pytest.mark.parametrize("top_k, top_p, df", [(0, 1.0, 5), (4, 1.0, 3), (0, 0.8, 2)])
def test_sampled_frequencies_match_the_filtered_softmax(top_k, top_p, df):
    temperature = 0.7
    logits = torch.tensor([1.0, 0.2, -0.5, 0.9, -1.3, 0.0])
    ref = _filtered_reference(logits / temperature, top_k, top_p)
    support = ref > 0
    n_seeds, n_pos = 4000, 5  # 20000 draws: seeds x output positions
    rows = (logits / temperature).expand(n_seeds * n_pos, -1).contiguous()
    keys = torch.arange(n_seeds).repeat_interleave(n_pos) * 7919 - 10**6
    t = torch.arange(n_pos).repeat(n_seeds)
    tok = sample(rows, keys, t, torch.full((len(rows),), top_k), torch.full((len(rows),), top_p))
    counts = torch.bincount(tok, minlength=6).double()
    assert counts[~support].sum() == 0
    assert int(support.sum()) == df + 1
    assert _chi2(counts[support], ref[support]) < CHI2_999[df]
    # Consecutive positions of one seed are independent: pairs against the product distribution.
    first, second = tok.view(n_seeds, n_pos)[:, 0], tok.view(n_seeds, n_pos)[:, 1]
    if top_k == 4:  # 4 kept tokens, 16 cells of at least 40 expected
        idx = support.nonzero()[:, 0]
        remap = torch.full((6,), -1).scatter(0, idx, torch.arange(len(idx)))
        pairs = torch.bincount(remap[first] * len(idx) + remap[second], minlength=len(idx) ** 2).double()
        joint = torch.outer(ref[idx], ref[idx]).flatten()
        assert _chi2(pairs, joint) < CHI2_999[15]


def test_greedy_rows_take_the_first_maximum_whatever_the_seed():
    scaled = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 0.0, 1.0, 3.0]])
    for seed in range(5):
        got = sample(scaled, torch.tensor([seed, seed + 1]), torch.tensor([0, 9]), torch.tensor([1, 1]),
                     torch.tensor([1.0, 1.0]))
        assert got.tolist() == [1, 0]


# --- the engine on a real transformers model ---------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    model = load_hf_model(build_tiny_llama(str(tmp_path_factory.mktemp("sampling") / "tiny")))
    return model, BatchGenerator(model, {EOS_ID}, decode=lambda ids: " ".join(f"t{i}" for i in ids), seed=0)


def _mixed_requests() -> list[SampleRequest]:
    prompts = [[2, 5, 6, 7], [2, 9], [2, 11, 12, 13, 14, 15], [2, 40]]
    settings = [dict(temperature=1.0), dict(temperature=0.8, top_k=7), dict(temperature=1.3, top_p=0.9),
                dict(temperature=1.0, top_k=1), dict(temperature=0.6, top_k=20, top_p=0.8)]
    reqs = []
    for i in range(10):
        reqs.append(SampleRequest(rid=f"r{i}", input_ids=prompts[i % 4], max_new_tokens=[12, 5, 0, 9][i % 4],
                                  seed=1000 + 17 * i, return_logprob=True, ignore_eos=i % 3 == 0,
                                  stop_token_ids={20 + i % 5}, **settings[i % 5]))
    return reqs


def test_seeded_samples_repeat_and_do_not_depend_on_the_batch(engine):
    _, gen = engine
    reqs = _mixed_requests()
    batch = gen.generate(reqs)
    again = gen.generate(reqs)
    assert [r.output_ids for r in batch] == [r.output_ids for r in again]
    alone = [gen.generate([r])[0] for r in reqs]
    reverse = gen.generate(reqs[::-1])[::-1]
    for r, b, a, v in zip(reqs, batch, alone, reverse):
        assert b.output_ids == a.output_ids == v.output_ids, r.rid
        assert b.finish_reason == a.finish_reason == v.finish_reason, r.rid
    for r in reqs:  # another seed gives another sample
        r.seed += 1
    assert [r.output_ids for r in gen.generate(reqs)] != [r.output_ids for r in batch]


def test_log_probs_and_stop_conditions_per_row(engine):
    model, gen = engine
    reqs = _mixed_requests()
    for r, res in zip(reqs, gen.generate(reqs)):
        out = res.output_ids
        stops = r.stop_token_ids | (set() if r.ignore_eos else {EOS_ID})
        assert not stops & set(out[:-1]), r.rid  # nothing after a stop token
        if res.finish_reason["type"] == "stop":
            assert res.finish_reason["matched"] == out[-1] in stops
        else:
            assert res.finish_reason == {"type": "length", "length": r.max_new_tokens}
            assert len(out) == r.max_new_tokens
        if r.top_k > 1:  # sampled within top-k of the float64 reference distribution at that position
            assert len(out) == 0 or all(lp > -math.inf for lp in res.output_logprobs)
        greedy_t = 1.0 if r.top_k == 1 else r.temperature
        _, ref = reference_logprobs(model, r.input_ids, out, greedy_t)
        assert len(res.output_logprobs) == len(out)
        assert max((abs(a - b) for a, b in zip(res.output_logprobs, ref)), default=0.0) <= 1e-4, r.rid


def test_stop_strings_and_abort_in_a_batch(engine):
    _, gen = engine
    base = SampleRequest(rid="free", input_ids=[2, 5, 6], max_new_tokens=10, seed=3, ignore_eos=True)
    free = gen.generate([base])[0].output_ids
    stop_word = f"t{free[3]}"
    first = next(i for i, tok in enumerate(free) if f"t{tok}" == stop_word or stop_word in " ".join(f"t{x}" for x in free[: i + 1]))
    stopped = SampleRequest(rid="s", input_ids=[2, 5, 6], max_new_tokens=10, seed=3, ignore_eos=True, stop=[stop_word])
    other = SampleRequest(rid="o", input_ids=[2, 9], max_new_tokens=10, seed=4, ignore_eos=True)
    killed = SampleRequest(rid="k", input_ids=[2, 9], max_new_tokens=10, seed=5, ignore_eos=True)
    res = gen.generate([stopped, other, killed], aborted=lambda rid: rid == "k")
    assert res[0].output_ids == free[: first + 1] and res[0].finish_reason == {"type": "stop", "matched": stop_word}
    assert res[1].output_ids == gen.generate([other])[0].output_ids and res[1].finish_reason["type"] == "length"
    assert res[2].output_ids == [] and res[2].finish_reason["type"] == "abort"


@pytest.mark.parametrize("flag, value", [("--threads", "-1"), ("--batch-wait-ms", "-1.0")])
def test_negative_threads_or_batch_wait_is_refused_in_one_line(tmp_path, flag, value):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_sdpg.rollout.server", "--hf-dir", str(tmp_path), "--port",
                           "1", flag, value], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"{flag}: must be >= 0, got {value}"


def test_reserved_kv_cache_matches_dynamic_cache_through_growth_and_dropped_rows(engine):
    from transformers import DynamicCache

    from megatron_sdpg.rollout.server.kv_cache import new_cache

    model, _ = engine
    ids = torch.tensor([[0, 2, 5, 6], [2, 9, 10, 11], [0, 0, 2, 7]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicCache(config=model.config), new_cache(model.config, capacity=5)]  # grows twice
    outs = [[], []]
    with torch.no_grad():
        for c, cache in enumerate(caches):
            m, p, tok = mask, pos[:, -1:], ids
            pp = pos
            for step in range(8):
                logits = model(input_ids=tok, attention_mask=m, position_ids=pp, past_key_values=cache).logits[:, -1]
                outs[c].append(logits)
                tok = logits.argmax(-1, keepdim=True)
                if step == 3:  # drop the middle row
                    keep = torch.tensor([0, 2])
                    cache.batch_select_indices(keep)
                    m, p, tok = m[keep], p[keep], tok[keep]
                m = torch.cat([m, torch.ones(len(m), 1, dtype=torch.long)], 1)
                p = p + 1
                pp = p
    assert type(caches[1].layers[0]).__name__ == "_ReservedLayer" and caches[1].layers[0]._k.shape[-2] >= 12
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


class _CountingGenerator:
    """The real engine, recording the size of every batch the worker hands it."""

    def __init__(self, gen: BatchGenerator):
        self.gen, self.sizes = gen, []

    def generate(self, reqs, aborted=None, abort_pending=lambda: True):
        self.sizes.append(len(reqs))
        return self.gen.generate(reqs, aborted, abort_pending)


def _group(g: int, n: int = 4) -> list[SampleRequest]:
    return [SampleRequest(rid=f"g{g}-{k}", input_ids=[2, 5 + g], max_new_tokens=6, seed=10 * g + k, ignore_eos=True)
            for k in range(n)]


def test_worker_gathers_groups_arriving_one_by_one_into_one_batch(engine):
    """A trainer posts one request per group, a few ms apart: the worker waits for them (``--batch-wait-ms``)
    instead of decoding the first group alone; a control job ends the gathering; results stay per job."""
    import time

    from megatron_sdpg.rollout.server.worker import ModelWorker

    _, gen = engine
    counting = _CountingGenerator(gen)
    worker = ModelWorker(counting, max_batch=64, gather_s=0.25, gather_max_s=2.0)
    futures = []
    for g in range(5):
        futures.append(worker.submit_generate(_group(g)))
        time.sleep(0.02)
    control = worker.submit(lambda: "control")
    after = worker.submit_generate(_group(9))
    results = [f.result(timeout=60) for f in futures]
    assert control.result(timeout=60) == "control" and len(after.result(timeout=60)) == 4
    for g, res in enumerate(results):  # each job gets its own rows, equal to a run of the group alone
        assert [r.output_ids for r in res] == [r.output_ids for r in gen.generate(_group(g))]
    assert counting.sizes == [20, 4]
