"""Sequence balancing and micro-batching: the C++ extension against the pure-Python path.

Usage::

    python setup.py build_ext --inplace                 # once, in a source checkout
    python benchmarks/bench_packing.py                  # 65,536 sequences over 512 DP ranks
    python benchmarks/bench_packing.py --quick          # 8,192 sequences over 64 ranks, a second
    python benchmarks/bench_packing.py --sequences 262144 --ranks 1024 --max-length 32768

Prints JSON lines. Per function: the best of ``--repeats`` wall-clock timings of
each path on the same input (object conversion both ways and freeing the result
included, as a caller pays them), ``speedup`` = Python seconds / native seconds
(target >= 10 for ``balance_partitions``) and the same ratio of CPU seconds. Both paths are checked to give
identical results first. ``split_microbatches`` is timed on every rank's part of
the balanced split (the trainer's per-rank call) and on all sequences at once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdpg.data import packing  # noqa: E402


def best_seconds(fns, repeats: int) -> list[tuple[float, float]]:
    """The fastest wall-clock and CPU seconds of ``repeats`` calls of each of ``fns``,
    interleaved so that all see the same background load."""
    best = [(float("inf"), float("inf"))] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best


def compare(name: str, py_fn, native_fn, repeats: int, **fields) -> None:
    """Checks both paths agree, times them, prints one JSON line (``speedup`` from wall-clock
    time, ``cpu_speedup`` from process CPU time, the steadier one on a shared machine)."""
    if py_fn() != native_fn():
        raise SystemExit(f"{name}: the native and Python results differ")
    (py_s, py_cpu), (native_s, native_cpu) = best_seconds([py_fn, native_fn], repeats)
    print(json.dumps({"bench": name, **fields, "python_ms": round(py_s * 1e3, 3),
                      "native_ms": round(native_s * 1e3, 3), "speedup": round(py_s / native_s, 2),
                      "python_cpu_ms": round(py_cpu * 1e3, 3), "native_cpu_ms": round(native_cpu * 1e3, 3),
                      "cpu_speedup": round(py_cpu / max(native_cpu, 1e-9), 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=65536)
    parser.add_argument("--ranks", type=int, default=512, help="data-parallel ranks (parts)")
    parser.add_argument("--min-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=8, help="max sequences per micro-batch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8,192 sequences over 64 ranks, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.ranks, args.repeats = 8192, 64, 3
    if not packing.NATIVE_AVAILABLE:
        raise SystemExit("the native extension is not built: run `python setup.py build_ext --inplace`")

    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_length, args.max_length) for _ in range(args.sequences)]
    size = {"sequences": args.sequences, "lengths": [args.min_length, args.max_length]}
    native = packing._native

    compare("balance_partitions", lambda: packing.balance_partitions_py(lengths, args.ranks),
            lambda: native.balance_partitions(lengths, args.ranks), args.repeats, ranks=args.ranks, **size)

    parts = native.balance_partitions(lengths, args.ranks)
    budget = args.micro_batch * args.max_length // 2  # binds often: both budgets cut batches

    def per_rank(split):
        return [split(part, lengths, args.micro_batch, budget) for part in parts]

    compare("split_microbatches_per_rank", lambda: per_rank(packing.split_microbatches_py),
            lambda: per_rank(native.split_microbatches), args.repeats, ranks=args.ranks,
            max_sequences=args.micro_batch, max_tokens=budget, **size)
    everything = list(range(args.sequences))
    compare("split_microbatches_all", lambda: packing.split_microbatches_py(everything, lengths, args.micro_batch, budget),
            lambda: native.split_microbatches(everything, lengths, args.micro_batch, budget), args.repeats,
            max_sequences=args.micro_batch, max_tokens=budget, **size)


if __name__ == "__main__":
    main()
