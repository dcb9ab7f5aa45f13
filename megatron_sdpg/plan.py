"""Memory and step-time plan of a training configuration on a GPU cluster.

Usage::

    python -m megatron_sdpg.plan --config examples/configs/sdpg_70b.yaml     # the layout run_sdpg_70b.sh launches
    python -m megatron_sdpg.plan --config examples/configs/sdpg_70b.yaml --nodes 16 parallel.pp=2
    python -m megatron_sdpg.plan --config FILE.yaml --world-size 16 --mfu 0.4 model.recompute=false

Prints a table (memory per GPU by term and pipeline stage, the same peak with
and without the distributed optimizer and recomputation, FLOPs and time of a
step) and, as its last line, one JSON object with at least ``peak_gib_per_gpu``
and ``fits``. Exit status: 0, 1 with ``--require-fit`` when the layout does not
fit, 2 for a configuration error. The model is explained in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from megatron_sdpg.config.errors import ConfigError

GIB = 2**30


def _parse(argv):
    p = argparse.ArgumentParser(prog="megatron_sdpg.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file (see examples/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=8 train.micro_batch_size=1")
    p.add_argument("--world-size", type=int, default=0, help="training GPUs (default: nodes x gpus per node)")
    p.add_argument("--nodes", type=int, default=None,
                   help="training nodes (default: the config's parallel.nodes, what the Slurm scripts launch; "
                        "when that is 0, one model replica)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the config's parallel.gpus_per_node")
    p.add_argument("--gpu-memory-gib", type=float, default=79.6, help="memory of one GPU (H100 80GB: 79.6)")
    p.add_argument("--reserve-gib", type=float, default=5.0, help="kept free: CUDA context, NCCL, fragmentation")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the training passes")
    p.add_argument("--local-kernels", action="store_true",
                   help="megatron's local layer spec with torch ops (CPU) instead of transformer-engine's")
    p.add_argument("--unfused-optimizer", action="store_true", help="torch AdamW step temporaries (CPU)")
    p.add_argument("--colocated-engine-fraction", type=float, default=0.0,
                   help="GPU share held by colocated SGLang engines (their --mem-fraction-static)")
    p.add_argument("--teacher-prepass", action="store_true",
                   help="at PP > 1, model the teacher pre-pass (every micro-batch's teacher data kept on the last "
                        "stage) instead of the teacher per micro-batch inside the pipeline schedule")
    p.add_argument("--require-fit", action="store_true", help="exit 1 when the layout does not fit")
    return p.parse_args(argv)


def make_plan(cfg, world_size: int, assume) -> dict:
    """Plans a loaded configuration.

    Args:
        cfg: An :class:`~megatron_sdpg.config.schema.SDPGConfig`.
        world_size: Training GPUs (0: one model replica, ``tp*pp*cp``).
        assume: :class:`~megatron_sdpg.planning.assumptions.PlanAssumptions`.

    Returns:
        A dict with the model, layout, workload, per-stage memory, variants and FLOPs.
    """
    from megatron_sdpg.planning.flops import step_flops
    from megatron_sdpg.planning.inputs import planning_model
    from megatron_sdpg.planning.memory import estimate_memory, worst_stage
    from megatron_sdpg.planning.params import total_params
    from megatron_sdpg.planning.workload import workload_from_config
    from megatron_sdpg.platform.layout import ParallelLayout

    assume.validate()
    par = cfg.parallel
    world = world_size or par.tp * par.pp * par.cp
    layout = ParallelLayout.resolve(par, world)
    model, model_source = planning_model(cfg.model)
    model.validate("model", tp=layout.tp, pp=layout.pp, vpp=layout.vpp)
    work = workload_from_config(cfg)
    work.validate()
    stages = estimate_memory(model, layout, work, assume, par.use_distributed_optimizer)
    variants = {}
    for distopt in (True, False):
        for recompute in (True, False):
            alt = estimate_memory(replace(model, recompute=recompute), layout, work, assume, distopt)
            variants[f"distopt={'on' if distopt else 'off'},recompute={'on' if recompute else 'off'}"] = \
                worst_stage(alt).peak / GIB
    return dict(model=model, model_source=model_source, layout=layout, work=work, stages=stages,
                worst=worst_stage(stages), variants=variants, flops=step_flops(model, layout, work, assume),
                params=total_params(model), assume=assume, distopt=par.use_distributed_optimizer)


ROWS = (
    ("weights", "weights"),
    ("gradients (fp32 main_grad)", "gradients"),
    ("optimizer states", "optimizer"),
    ("reference weights", "reference_weights"),
    ("activations", "activations"),
    ("logits and KL buffers", "logits_and_kl"),
    ("teacher logits", "teacher_logits"),
    ("optimizer temporaries", "optimizer_temp"),
)


def _teacher_mode(plan: dict) -> str:
    from megatron_sdpg.planning.memory import teacher_per_microbatch

    if teacher_per_microbatch(plan["work"], plan["layout"].pp, plan["assume"]):
        return "per micro-batch" + (" (in the pipeline schedule)" if plan["layout"].pp > 1 else " (inline)")
    return "pre-pass (every micro-batch kept)"


def format_table(plan: dict) -> str:
    """The human-readable report printed before the JSON line."""
    m, lay, w, a, fl = plan["model"], plan["layout"], plan["work"], plan["assume"], plan["flops"]
    stages = plan["stages"]
    worst = plan["worst"]
    lines = [
        f"model: {m.arch} {plan['params'] / 1e9:.2f} B parameters (layers {m.num_layers}, hidden {m.hidden_size}, "
        f"heads {m.num_attention_heads}/{m.kv_heads} kv, ffn {m.intermediate_size}, vocab {m.vocab_size}), "
        f"{m.params_dtype}, recompute {'on' if m.recompute else 'off'}; from {plan['model_source']}",
        f"layout: {lay.describe()}, distributed optimizer {'on' if plan['distopt'] else 'off'}",
        f"step: {w.sequences_per_step} sequences, {w.microbatches_per_rank(lay.dp)} micro-batches per DP rank of "
        f"{w.sequences_per_microbatch} x {w.student_len} student tokens"
        + (f" / {w.teacher_len} teacher tokens" if w.teacher_forward else "")
        + f"; teacher pass {_teacher_mode(plan) if w.teacher_forward else 'no'}, "
        f"reference copy {'yes' if w.reference_model else 'no'}, vocabulary terms from "
        + ("hidden states (algorithm.fused_output)" if w.fused_output else "logits"),
        "",
        f"{'memory per GPU (GiB)':<30}" + "".join(f"{'stage ' + str(s.stage):>10}" for s in stages),
        f"{'  parameters (millions)':<30}" + "".join(f"{s.params / 1e6:>10.1f}" for s in stages),
    ]
    for label, attr in ROWS:
        lines.append(f"{'  ' + label:<30}" + "".join(f"{getattr(s, attr) / GIB:>10.2f}" for s in stages))
    lines.append(f"{'  peak':<30}" + "".join(f"{s.peak / GIB:>10.2f}" for s in stages))
    usable = a.usable_gib
    margin = usable - worst.peak / GIB
    lines += [
        "",
        f"capacity {a.gpu_memory_gib:.1f} GiB - reserve {a.reserve_gib:.1f} GiB"
        + (f" - colocated engines {a.colocated_engine_fraction:.2f} x capacity" if a.colocated_engine_fraction else "")
        + f" = {usable:.1f} GiB usable; "
        f"worst stage {worst.stage}: {worst.peak / GIB:.2f} GiB -> "
        + (f"FITS with {margin:.2f} GiB to spare" if margin >= 0 else f"DOES NOT FIT by {-margin:.2f} GiB"),
        "peak of the worst stage by variant: "
        + ", ".join(f"{k} {v:.1f} GiB" for k, v in plan["variants"].items()),
        f"step FLOPs: update {fl.update / 1e15:.1f} PF, teacher {fl.teacher / 1e15:.1f} PF, "
        f"reference {fl.reference / 1e15:.1f} PF, old policy {fl.old_policy / 1e15:.1f} PF "
        f"(total {fl.total / 1e15:.1f} PF)",
        f"training passes of one step: {fl.seconds:.1f} s on {fl.gpus} GPUs x {a.peak_tflops:.0f} TFLOP/s "
        f"at MFU {a.mfu:.2f}, pipeline bubble +{fl.bubble * 100:.1f}% (rollout and weight sync not included)",
    ]
    return "\n".join(lines)


def summary_json(plan: dict) -> dict:
    """The machine-readable summary (the last line of the output)."""
    worst, a = plan["worst"], plan["assume"]
    peak = worst.peak / GIB
    return {
        "peak_gib_per_gpu": round(peak, 3),
        "fits": peak <= a.usable_gib,
        "margin_gib": round(a.usable_gib - peak, 3),
        "usable_gib": a.usable_gib,
        "gpu_memory_gib": a.gpu_memory_gib,
        "worst_stage": worst.stage,
        "stage_peaks_gib": [round(s.peak / GIB, 3) for s in plan["stages"]],
        "terms_gib": {attr: round(getattr(worst, attr) / GIB, 3) for _, attr in ROWS},
        "variants_gib": {k: round(v, 3) for k, v in plan["variants"].items()},
        "layout": plan["layout"].describe(),
        "params_b": round(plan["params"] / 1e9, 3),
        "step_pflop": round(plan["flops"].total / 1e15, 3),
        "step_time_s": round(plan["flops"].seconds, 3),
        "mfu": a.mfu,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from megatron_sdpg.config import load_config
    from megatron_sdpg.planning.assumptions import PlanAssumptions

    assume = PlanAssumptions(gpu_memory_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib,
                             peak_tflops=args.peak_tflops, mfu=args.mfu,
                             fused_kernels=not args.local_kernels, fused_optimizer=not args.unfused_optimizer,
                             colocated_engine_fraction=args.colocated_engine_fraction,
                             teacher_in_schedule=not args.teacher_prepass)
    try:
        cfg = load_config(args.config, args.overrides)
        nodes = cfg.parallel.nodes if args.nodes is None else args.nodes
        per_node = cfg.parallel.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
        world = args.world_size or nodes * per_node
        plan = make_plan(cfg, world, assume)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    summary = summary_json(plan)
    print(format_table(plan))
    print(json.dumps(summary), flush=True)
    return 1 if args.require_fit and not summary["fits"] else 0


if __name__ == "__main__":
    sys.exit(main())
