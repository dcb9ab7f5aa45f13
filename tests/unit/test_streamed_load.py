"""``StreamedLoad``: a safetensors body fed in arbitrary chunks lands bit-identically in the
parameters (cast where dtypes differ); cut-off, overlong, overlapping and non-finite bodies are
refused, the parameters they touched left marked dirty."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_sdpg.rollout.server.weights import StreamedLoad
from megatron_sdpg.formats.safetensors_stream import SafetensorsStream
from megatron_sdpg.formats.safetensors_format import parse_safetensors_header


def _params() -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(5, 7), "b": torch.zeros(11, dtype=torch.bfloat16), "c": torch.zeros(3),
            "d": torch.zeros(0, 2), "untouched": torch.full((4,), 9.0)}


def _body(named) -> tuple[bytes, list, int]:
    blob = b"".join(SafetensorsStream(named).pieces())
    entries, data_start = parse_safetensors_header(blob[:8], lambda n: blob[8 : 8 + n], len(blob), "body")
    return blob, entries, data_start


def _sent() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [("a", torch.randn(5, 7, generator=gen)), ("b", torch.randn(11, generator=gen).bfloat16()),
            ("c", torch.tensor([1.5, -0.0, 3.0e38], dtype=torch.bfloat16)),  # cast into fp32
            ("d", torch.zeros(0, 2))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunks_of_any_size_load_bit_identically(seed):
    params = _params()
    sent = _sent()
    blob, entries, data_start = _body(sent)
    load = StreamedLoad(params, entries, data_start, len(blob))
    rng = random.Random(seed)
    pos = data_start
    while pos < len(blob):  # 1-byte to 64-byte chunks: tensors split anywhere
        step = rng.randint(1, 64)
        load.feed(blob[pos : pos + step])
        pos += step
    assert load.finish() == sum(t.numel() * t.element_size() for _, t in sent)
    for name, t in sent:
        want = t.to(params[name].dtype)
        ints = {2: torch.int16, 4: torch.int32}[want.element_size()]
        assert torch.equal(params[name].view(ints), want.view(ints)), name
    assert torch.equal(params["untouched"], torch.full((4,), 9.0))


def test_cut_off_and_overlong_bodies_are_refused():
    params = _params()
    blob, entries, data_start = _body(_sent())
    load = StreamedLoad(params, entries, data_start, len(blob))
    load.feed(blob[data_start:-3])
    with pytest.raises(ValueError, match=rf"body: ended after {len(blob) - 3} of {len(blob)} bytes"):
        load.finish()
    load = StreamedLoad(_params(), entries, data_start, len(blob))
    with pytest.raises(ValueError, match=rf"body: more than the {len(blob)} bytes announced"):
        load.feed(blob[data_start:] + b"xx")


def test_overlapping_tensors_are_refused():
    _, entries, data_start = _body(_sent())
    a = next(e for e in entries if e[0] == "a")
    c = next(e for e in entries if e[0] == "c")
    overlapping = [a, ("c", c[1], c[2], a[3], a[3] + (c[4] - c[3]))]
    with pytest.raises(ValueError, match="tensors 'a' and 'c' overlap in the data section"):
        StreamedLoad(_params(), overlapping, data_start, data_start + a[4])


def test_non_finite_or_cut_off_body_leaves_its_tensors_dirty():
    sent = _sent()
    sent[0] = ("a", torch.full((5, 7), float("nan")))
    blob, entries, data_start = _body(sent)
    dirty: set[str] = set()
    load = StreamedLoad(_params(), entries, data_start, len(blob), dirty)
    load.feed(blob[data_start:])
    with pytest.raises(ValueError, match="weight 'a' holds NaN or inf values"):
        load.finish()
    assert dirty == {"a", "b", "c", "d"}

    blob, entries, data_start = _body(_sent())
    load = StreamedLoad(_params(), entries, data_start, len(blob), dirty)
    load.feed(blob[data_start:-3])
    with pytest.raises(ValueError, match="ended after"):
        load.finish()
    assert dirty == {"a", "b", "c", "d"}
    load = StreamedLoad(_params(), entries, data_start, len(blob), dirty)
    load.feed(blob[data_start:])
    load.finish()  # a complete body of the same tensors heals them
    assert dirty == set()
