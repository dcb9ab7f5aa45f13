"""Training checkpoints for exact resume: ``run_dir/checkpoints/step_N/``.

A checkpoint after ``N`` completed steps holds

* ``dist/``: megatron ``dist_checkpointing`` files with the policy's model state
  and its optimizer state (``fully_reshardable``: the distributed optimizer's
  state in per-parameter canonical form, so it loads at another TP/PP/DP layout);
* ``trainer_state.json`` (rank 0): the step, the LR scheduler's state, the
  prompt source's position and the rollout weight version;
* ``rng_rank{r}.pt``: each rank's python/torch CPU RNG states;
* ``COMPLETE``: written last.

Writing is atomic: everything goes into ``step_N.tmp/``, which rank 0 renames to
``step_N/`` after every rank has finished (a barrier). A crash mid-write leaves
a ``.tmp`` directory that is never loaded and the previous checkpoints intact.

Resuming (:func:`resume_latest`) checks the newest complete checkpoint's files
first (``trainer_state.json``, the ``dist/`` items named by its metadata); a
corrupt one is named in one line, renamed ``step_N.corrupt`` (never deleted)
and the previous complete one is loaded instead, on every rank alike.
Starting over in a used run directory (``checkpoint.resume=false``) moves the
earlier run's files to ``previous_runs/<k>/`` (:func:`start_new_run`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch
import torch.distributed as dist

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Fully reshardable across TP/PP/DP; no prefix on a single-optimizer chain.
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR)


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint under ``run_dir``, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> tuple[int, str] | None:
    """The newest complete checkpoint, or ``None``."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _sharded_state(policy, is_loading: bool) -> dict:
    """Model and optimizer sharded state dicts, the way megatron's own training builds them."""
    chunks = policy.unwrapped()  # the keys of weights/checkpoint.py, so the model part loads there too
    if len(chunks) == 1:
        model = {"model": chunks[0].sharded_state_dict()}
    else:
        model = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state = dict(model)
    if is_loading:
        _materialize_optimizer_state(policy.optimizer)
    state["optimizer"] = policy.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=_OPT_METADATA)
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """Gives a fresh distributed optimizer its Adam state tensors, which the load fills in place.

    Megatron's distributed optimizer describes its state from the existing
    tensors, which exist only after a first step; like megatron does for its own
    FSDP format, one step on zero gradients creates them. Any change that step
    makes to the parameters (weight decay) is overwritten by the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and len(opt.optimizer.state) == 0:
            init()


def _load_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, working around torch Adam's per-parameter ``step``.

    Megatron 0.16's ``load_parameter_state_from_fully_reshardable`` copies every
    per-parameter state entry of the inner optimizer from the checkpoint but
    skips ``step``, which torch's Adam (no Apex/TE) keeps per parameter: it
    fails with ``KeyError: 'step'``. So the parameter state is loaded with the
    ``step`` entries set aside, after the rest (which restores ``step``), and each
    parameter gets its own ``step`` tensor back.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(chained) == 1 else [state[k] for k in sorted(state)]
    for opt, st in zip(chained, states):
        param_state = st.pop("param_state", None)
        sharding = st.pop("param_state_sharding_type", None)
        opt.load_state_dict(st)
        if param_state is None:
            continue
        if sharding != "fully_reshardable":
            raise ValueError(f"optimizer state saved as {sharding!r}; this loader reads 'fully_reshardable'")
        inner = opt.optimizer.state
        steps = {p: s.pop("step") for p, s in inner.items() if "step" in s}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            # Megatron hands every parameter one shared ``step`` tensor; torch's Adam
            # increments it in place once per parameter, which skews bias correction.
            inner[p]["step"] = step.detach().clone()


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(parts, steps_done: int) -> str:
    """Saves the run after ``steps_done`` steps (a collective over all ranks).

    Args:
        parts: The :class:`~megatron_sdpg.train.setup.TrainerParts` of the run.
        steps_done: Completed steps; the resumed run starts at this step.

    Returns:
        The final checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    from megatron_sdpg.weights.checkpoint import write_checkpoint_metadata

    cfg = parts.cfg
    rank = dist.get_rank()
    root = checkpoint_root(cfg.train.run_dir)
    final = os.path.join(root, f"step_{steps_done}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "dist"))
    dist.barrier()
    dist_checkpointing.save(_sharded_state(parts.policy, is_loading=False), os.path.join(tmp, "dist"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        # The model part of dist/ is a converter checkpoint: tools/convert_megatron_to_hf.py exports it.
        write_checkpoint_metadata(os.path.join(tmp, "dist"), parts.model_cfg, cfg.model.hf_dir)
        state = {
            "step": steps_done,
            "weight_version": steps_done,
            "scheduler": parts.policy.scheduler.state_dict(),
            # (off_policy_steps=1: the position before the prefetched batch's prompts, which a resume regenerates)
            "source": (parts.source_state_before_prefetch if parts.source_state_before_prefetch is not None
                       else parts.source.state_dict()),
            "world_size": dist.get_world_size(),
            "layout": parts.groups.layout.describe(),
        }
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{steps_done}\n")
        if os.path.isdir(final):  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        # Only this timeline's checkpoints (steps up to this one) are pruned: a higher step is not this run's.
        ours = [c for c in complete_checkpoints(cfg.train.run_dir) if c[0] <= steps_done]
        for _, old in ours[:-cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(parts, path: str) -> int:
    """Restores the policy (weights and optimizer), schedule, data position and RNG from ``path``.

    Works at any TP/PP/DP layout for the weights and optimizer state; the RNG
    states are restored only when the world size matches.

    Returns:
        The step to continue from.
    """
    from megatron.core import dist_checkpointing

    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    policy = parts.policy
    loaded = dist_checkpointing.load(_sharded_state(policy, is_loading=True), os.path.join(path, "dist"))
    chunks = policy.unwrapped()
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)
    _load_optimizer(policy.optimizer, loaded["optimizer"])
    # The schedule's shape follows this run's config (train.steps may have grown); its position is restored.
    sched = state["scheduler"]
    policy.scheduler.num_steps = int(sched["num_steps"])
    policy.scheduler.step(increment=0)
    parts.source.load_state_dict(state["source"])
    rng_path = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
    if state["world_size"] == dist.get_world_size() and os.path.isfile(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return int(state["step"])


STATE_KEYS = ("step", "scheduler", "source", "world_size")


def checkpoint_problem(path: str) -> str | None:
    """Why the complete checkpoint at ``path`` cannot be loaded, or None when its files are whole.

    Reads ``trainer_state.json`` and the ``dist/`` metadata only (no tensor data).
    """
    from megatron_sdpg.weights.checkpoint import check_checkpoint_files
    from megatron_sdpg.formats.hf_io import CorruptCheckpointError

    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        return f"{state_path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty'})"
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        return f"{state_path}: missing {missing}"
    try:
        check_checkpoint_files(os.path.join(path, "dist"))
    except CorruptCheckpointError as err:
        return str(err)
    return None


def _agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (any backend)."""
    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    return all(flags)


def resume_latest(parts) -> tuple[int, str | None]:
    """Loads the newest loadable complete checkpoint of the run directory (a collective).

    Rank 0 lists the complete checkpoints, newest first, and checks each one's
    files; a corrupt one is named in one line and skipped. If loading the chosen
    one still fails on any rank, every rank moves on to the next older one
    together (the load overwrites all restored state). Skipped checkpoints are
    renamed ``step_N.corrupt`` (kept for inspection, never loaded or pruned).

    Returns:
        ``(start step, checkpoint path or None)``.

    Raises:
        ConfigError: (``checkpoint.resume``) complete checkpoints exist but none loads.
    """
    from megatron_sdpg.config.errors import ConfigError

    run_dir = parts.cfg.train.run_dir
    rank = dist.get_rank()
    candidates = list(reversed(complete_checkpoints(run_dir))) if rank == 0 else None
    box = [candidates]
    dist.broadcast_object_list(box, src=0)
    candidates = box[0]
    skipped: list[str] = []
    for _, path in candidates:
        problem = checkpoint_problem(path) if rank == 0 else None
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
        if problem is None:
            try:
                start = load_checkpoint(parts, path)
                loaded = True
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # torch's CheckpointException is a BaseException
                problem, loaded = _describe(err), False
            if _agree(loaded):
                if rank == 0:
                    _set_aside(skipped)
                return start, path
            problem = problem or "the load failed on another rank"
        if rank == 0:
            print(f"warning: checkpoint {path} is corrupt and is skipped: {problem}", flush=True)
        skipped.append(path)
    if candidates:
        raise ConfigError("checkpoint.resume", f"no complete checkpoint in {checkpoint_root(run_dir)} loads "
                          f"(newest: {candidates[0][1]}); move them away or use another train.run_dir")
    return 0, None


def _describe(err: BaseException) -> str:
    """One line for a failed load (the first rank's own error inside torch's ``CheckpointException``)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = sorted(failures.items())[0][1]  # WRAPPED_EXCEPTION: (exception, traceback)
        inner = inner[0] if isinstance(inner, tuple) else inner
        err = inner if isinstance(inner, BaseException) else err
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _set_aside(paths: list[str]) -> None:
    for path in paths:
        target = path + ".corrupt"
        k = 1
        while os.path.exists(target):
            target, k = f"{path}.corrupt{k}", k + 1
        os.replace(path, target)
        print(f"warning: renamed the corrupt checkpoint {path} to {target}", flush=True)


# What a run writes into its run directory (``start_new_run`` moves these aside).
RUN_FILES = (CHECKPOINT_DIR, "metrics.jsonl", "summary.json", "config.yaml", "weight_sync", "engines", "plots",
             "wandb")
PREVIOUS_RUNS = "previous_runs"


def start_new_run(run_dir: str) -> str | None:
    """Makes ``run_dir`` ready for a new run from step 0 (rank 0, ``checkpoint.resume=false``).

    A run directory belongs to one run: an earlier run's files (:data:`RUN_FILES`)
    are moved, never deleted, to ``run_dir/previous_runs/<k>/``, so ``keep_last``
    cannot prune the new run's checkpoints for the old run's higher step numbers,
    a later resume continues the new run, and ``metrics.jsonl`` holds one run.

    Returns:
        The directory the earlier run was moved to, or None when there was none.
    """
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(run_dir, name))]
    if not present:
        return None
    root = os.path.join(run_dir, PREVIOUS_RUNS)
    os.makedirs(root, exist_ok=True)
    k = 1
    while os.path.exists(os.path.join(root, str(k))):
        k += 1
    target = os.path.join(root, str(k))
    os.makedirs(target)
    for name in present:
        os.replace(os.path.join(run_dir, name), os.path.join(target, name))
    print(f"checkpoint.resume=false: train.run_dir {run_dir} held an earlier run; moved its files "
          f"({', '.join(present)}) to {target} and starting a new run at step 0", flush=True)
    return target
