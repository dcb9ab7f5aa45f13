"""Step metrics to a JSONL file, the console (progress bar) and optionally wandb.

Only the logging rank (global rank 0) creates a :class:`MetricsLog`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from megatron_sdpg.config.sections import LoggingConfig

CONSOLE_KEYS = ("reward", "acc", "distill_kl", "ref_kl", "entropy", "grad_norm", "step_s")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not measured / not finite"
    return value


class MetricsLog:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl``.

    Args:
        run_dir: Run directory (created if needed).
        cfg: Logging settings.
        total_steps: For the progress bar's ETA.
        start_step: First step of this process (non-zero on resume).
        config_dict: The resolved configuration, given to wandb.
    """

    def __init__(self, run_dir: str, cfg: LoggingConfig, total_steps: int, start_step: int = 0,
                 config_dict: dict | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="sdpg", unit="step", dynamic_ncols=True)
        self._wandb = None
        if cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=run_dir,
                                     config=config_dict or {}, resume="allow")

    def log(self, step: int, metrics: dict[str, Any], advance: bool = True) -> None:
        """Writes one step's metrics everywhere; ``advance`` moves the progress bar."""
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._bar is not None:
            shown = {k: f"{metrics[k]:.3g}" for k in CONSOLE_KEYS if isinstance(metrics.get(k), (int, float))}
            self._bar.set_postfix(shown, refresh=not advance)
            if advance:
                self._bar.update(1)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None}, step=step)

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (later records of a step win on resume)."""
    by_step: dict[int, dict] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
