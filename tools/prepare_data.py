#!/usr/bin/env python
"""Public math datasets (local copies, published layouts) -> the trainer's problem files.

    python tools/prepare_data.py --format dapo-math-17k --input dapo-math-17k.parquet --out data/math/dapo17k.jsonl
    python tools/prepare_data.py --format aime --input aime_2024.parquet --out data/eval/aime24.jsonl
    python tools/prepare_data.py --format amc --input amc.parquet --year 2023 --out data/eval/amc23.jsonl

Writes rows ``{question, answer, solution, source, id}`` (jsonl or parquet, by the
extension of ``--out``), atomically. Layouts: ``megatron_sdpg/data/layouts.py``.
Prints one JSON line (rows read, kept, duplicates, non-English, skipped per reason).
A bad row stops with one line naming file and row (rc 2) unless ``--skip-bad-rows``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdpg.data.files import BadRowError  # noqa: E402
from megatron_sdpg.data.layouts import FORMATS, convert_rows  # noqa: E402
from megatron_sdpg.data.write import write_rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", required=True, choices=FORMATS, help="layout of the input files")
    p.add_argument("--input", required=True, nargs="+", help="local jsonl/json/parquet file(s), read in order")
    p.add_argument("--out", required=True, help="output .jsonl or .parquet")
    p.add_argument("--source", default="", help="value of the 'source' field (default: the format)")
    p.add_argument("--year", default="", help="keep rows whose url/id/year mention this year (AI-MO AIME/AMC sets)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of failing")
    args = p.parse_args(argv)
    if not args.out.endswith((".jsonl", ".json", ".parquet")):
        print(f"--out: {args.out} must end in .jsonl, .json or .parquet", file=sys.stderr)
        return 2
    try:
        rows, report = convert_rows(args.format, args.input, args.source, skip_bad_rows=args.skip_bad_rows,
                                    year=args.year)
    except BadRowError as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"prepare_data: no rows left from {args.input} (read {report.rows})", file=sys.stderr)
        return 2
    write_rows(args.out, rows)
    print(json.dumps({"format": args.format, "out": args.out, "rows": report.rows, "kept": report.kept,
                      "duplicates": report.duplicates, "non_english": report.non_english,
                      "other_year": report.other_year, "skipped": dict(report.skipped),
                      "with_solution": sum(bool(r["solution"]) for r in rows)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
