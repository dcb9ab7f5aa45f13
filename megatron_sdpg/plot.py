"""PNG plots of a training run's metrics over steps.

Usage::

    python -m megatron_sdpg.plot RUN_DIR                # writes RUN_DIR/plots/*.png
    python -m megatron_sdpg.plot RUN_DIR --out figs/

Reads ``RUN_DIR/metrics.jsonl`` (see :mod:`megatron_sdpg.train.metrics_log`) and
writes one PNG per metric found plus ``overview.png``, a grid of all of them
(held-out accuracy with and without the privileged context share one panel).
Prints the paths written; names the metrics that were absent on stderr. A
``null`` value leaves a gap in its line; metrics logged only on some steps
(the evaluations) are drawn through the steps that have them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from megatron_sdpg.train.metrics_log import read_metrics

# Overview panels: (title, metric keys drawn on it). Each key also gets its own PNG.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Reward", ("reward",)),
    ("Held-out accuracy", ("eval/accuracy", "eval/accuracy_with_context")),
    ("Distillation KL (student || teacher)", ("distill_kl",)),
    ("KL to the reference policy", ("ref_kl",)),
    ("Entropy", ("entropy",)),
    ("Response length (tokens)", ("response_length",)),
    ("Beta", ("beta",)),
)
METRICS: tuple[str, ...] = tuple(key for _, keys in PANELS for key in keys)
TITLES = {key: title for title, keys in PANELS for key in keys}
LABELS = {"eval/accuracy": "without context", "eval/accuracy_with_context": "with context (teacher view)"}
SMOOTH_MIN_POINTS = 20  # shorter series are drawn with markers
UNSMOOTHED = frozenset({"beta"})  # a schedule, not a noisy measurement


class PlotError(Exception):
    """A run directory that cannot be plotted (the message is one line)."""


@dataclass
class Series:
    """One metric over the steps that logged it: ``values`` is NaN where it was null."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class RunPlots:
    """What :func:`plot_run` wrote."""

    paths: list[str] = field(default_factory=list)  # per-metric PNGs, then overview.png
    absent: list[str] = field(default_factory=list)  # metrics with no numeric value at any step


def _number(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan  # null, NaN/inf or not a number: a gap


def extract_series(records: list[dict], key: str) -> Series | None:
    """The steps where ``key`` was logged and its values; None when it never has a number."""
    pairs = [(rec["step"], _number(rec[key])) for rec in records if key in rec]
    if not any(math.isfinite(v) for _, v in pairs):
        return None
    steps, values = zip(*pairs)
    return Series(np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64))


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the finite values among the last ``window`` (NaN where there are none)."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _draw(ax, series: dict[str, Series], title: str) -> None:
    """Draws the given metrics on one axes: markers for short series, the per-step line
    and its trailing mean for long series of measured (not scheduled) quantities."""
    for key, s in series.items():
        name = LABELS.get(key, key)
        prefix = f"{name}, " if len(series) > 1 else ""
        if len(s.steps) < SMOOTH_MIN_POINTS:
            ax.plot(s.steps, s.values, marker="o", markersize=4, label=name)
        elif key in UNSMOOTHED:
            ax.plot(s.steps, s.values, linewidth=1.5, label=name)
        else:
            window = max(2, len(s.steps) // 20)
            (raw,) = ax.plot(s.steps, s.values, alpha=0.35, linewidth=1, label=f"{prefix}per step")
            ax.plot(s.steps, _trailing_mean(s.values, window), color=raw.get_color(), linewidth=2,
                    label=f"{prefix}mean over {window} steps")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _save(fig, path: str) -> None:
    """Writes ``fig`` as PNG atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def load_records(run_dir: str) -> list[dict]:
    """``run_dir``'s metric records, or a :class:`PlotError` naming what is missing or bad."""
    if not os.path.isdir(run_dir):
        raise PlotError(f"run directory not found: {run_dir}")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"no metrics.jsonl in {run_dir}")
    try:
        records = read_metrics(run_dir)
    except (ValueError, KeyError, TypeError) as exc:
        raise PlotError(f"{path}: {_first_bad_row(path)}") from exc
    if not records:
        raise PlotError(f"{path} has no records")
    return records


def _first_bad_row(path: str) -> str:
    with open(path) as f:
        for row, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                return f"row {row} is not JSON ({exc})"
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                return f"row {row} has no integer \"step\""
    return "unreadable"


def plot_run(run_dir: str, out_dir: str | None = None) -> RunPlots:
    """Writes the PNG plots of one run.

    Args:
        run_dir: Directory holding ``metrics.jsonl``.
        out_dir: Where the PNGs go (created if needed); default ``run_dir/plots``.

    Returns:
        The paths written and the metrics that were absent.

    Raises:
        PlotError: ``run_dir`` or its ``metrics.jsonl`` is missing, unreadable or empty.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    records = load_records(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    found = {key: s for key in METRICS if (s := extract_series(records, key)) is not None}
    result = RunPlots(absent=[key for key in METRICS if key not in found])

    for key, s in found.items():
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        _draw(ax, {key: s}, TITLES[key] + (f", {LABELS[key]}" if key in LABELS else ""))
        ax.set_ylabel(key)
        path = os.path.join(out_dir, key.replace("/", "_") + ".png")
        _save(fig, path)
        result.paths.append(path)

    cols = 2
    rows = -(-len(PANELS) // cols)
    fig = Figure(figsize=(6 * cols, 3.2 * rows), layout="constrained")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)), fontsize=13)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, keys) in zip(axes, PANELS):
        present = {key: found[key] for key in keys if key in found}
        if present:
            _draw(ax, present, title)
        else:
            ax.set_title(title, fontsize=11)
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in axes[len(PANELS):]:
        ax.remove()
    path = os.path.join(out_dir, "overview.png")
    _save(fig, path)
    result.paths.append(path)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_sdpg.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        result = plot_run(args.run_dir, args.out)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in result.paths:
        print(path)
    if result.absent:
        print(f"absent (not plotted): {', '.join(result.absent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
