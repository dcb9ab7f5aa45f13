"""The pure parts of benchmarks/reproduce_paper_mini.py: method overrides and aggregation."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics

import pytest

from megatron_sdpg.algo.config import apply_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("reproduce_paper_mini",
                                               os.path.join(ROOT, "benchmarks", "reproduce_paper_mini.py"))
rpm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rpm)

# The fields examples/configs/tiny_cpu.yaml sets: every method must override each of them.
YAML_ALGO_FIELDS = {"preset", "beta_base", "beta_warmup_steps", "beta_decay_steps", "distill_gate", "alpha"}


def _parse(overrides: list[str]) -> dict:
    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        assert key.startswith("algorithm."), item
        out[key.removeprefix("algorithm.")] = value
    return out


def _typed(fields: dict) -> dict:
    conv = {"True": True, "False": False}

    def one(key, value):
        if value in conv:
            return conv[value]
        try:
            return int(value) if key.endswith("_steps") else float(value)
        except ValueError:
            return value  # preset, ref_kl_mode, teacher_source, distill_divergence

    return {k: one(k, v) for k, v in fields.items()}


def _resolved(method: str) -> dict:
    """The AlgorithmConfig a method's overrides resolve to (preset defaults included), as a dict."""
    import dataclasses

    typed = _typed(_parse(rpm.method_overrides(method, steps=120)))
    return dataclasses.asdict(apply_preset(typed.pop("preset"), **typed))


@pytest.mark.parametrize("method", sorted(rpm.METHODS))
def test_every_method_overrides_every_yaml_field_and_validates(method):
    fields = _parse(rpm.method_overrides(method, steps=120))
    assert YAML_ALGO_FIELDS <= set(fields), f"{method} leaves {YAML_ALGO_FIELDS - set(fields)} to the YAML"
    typed = _typed(fields)
    apply_preset(typed.pop("preset"), **typed)  # a valid AlgorithmConfig


def test_method_semantics():
    f = {m: _typed(_parse(rpm.method_overrides(m, steps=120))) for m in rpm.METHODS}
    assert f["grpo"]["beta_base"] == 0 and f["grpo"]["alpha"] == f["sdpg-urkl"]["alpha"] == 1e-3
    assert f["opsd"]["preset"] == "opsd" and f["opsd"]["alpha"] == 0 and f["opsd"]["beta_base"] > 0
    assert f["sdpg-urkl"]["ref_kl_mode"] == "urkl" and f["sdpg-ufkl"]["ref_kl_mode"] == "ufkl"
    assert f["sdpg-urkl"]["distill_gate"] is False and f["sdpg-gated"]["distill_gate"] is True
    assert f["sdpg-beta0"]["beta_base"] == 0 and f["sdpg-alpha0"]["alpha"] == 0
    # Each ablation differs from sdpg-urkl in exactly the fields it names.
    base = f["sdpg-urkl"]
    diffs = {m: {k for k in base if f[m].get(k) != base[k]} for m in ("sdpg-beta0", "sdpg-alpha0", "sdpg-gated",
                                                                         "sdpg-schedule", "sdpg-ufkl",
                                                                         "sdpg-maskwrong")}
    assert diffs == {"sdpg-beta0": {"beta_base"}, "sdpg-alpha0": {"alpha"}, "sdpg-gated": {"distill_gate"},
                     "sdpg-schedule": {"beta_warmup_steps", "beta_decay_steps"}, "sdpg-ufkl": {"ref_kl_mode"},
                     "sdpg-maskwrong": {"distill_mask_after_divergence"}}
    # The paper's windows (50 and 350 of 400) scaled to the run length.
    assert (f["sdpg-schedule"]["beta_warmup_steps"], f["sdpg-schedule"]["beta_decay_steps"]) == (15, 105)
    with pytest.raises(KeyError, match="unknown method"):
        rpm.method_overrides("ppo", 10)


def test_decomposition_variants_change_exactly_one_difference_between_sdpg_and_opsd():
    """Resolved configs (presets included): each variant differs from its base in one named field."""
    sdpg, opsd = _resolved("sdpg-urkl"), _resolved("opsd")
    between = {k for k in sdpg if sdpg[k] != opsd[k]} - {"preset"}
    assert {"teacher_source", "distill_divergence", "objective", "beta_base"} <= between

    def diff(method, base):
        other = _resolved(method)
        return {k for k in base if other[k] != base[k]}

    assert diff("sdpg-initial", sdpg) == {"teacher_source"} and _resolved("sdpg-initial")["teacher_source"] == "initial"
    assert diff("sdpg-jsd", sdpg) == {"distill_divergence"} and _resolved("sdpg-jsd")["jsd_beta"] == 0.5
    assert diff("sdpg-nopg", sdpg) == {"policy_gradient_term"}
    assert diff("sdpg-beta1", sdpg) == {"beta_base"}
    assert diff("opsd-current", opsd) == {"teacher_source"} and _resolved("opsd-current")["teacher_source"] == "current"
    assert diff("opsd-rkl", opsd) == {"distill_divergence"}
    assert set(rpm.DECOMPOSITION_METHODS) <= set(rpm.METHODS)


def test_run_overrides_share_everything_but_the_method(tmp_path):
    a = rpm.run_overrides("grpo", 2, 40, 3e-5, "/r/a", str(tmp_path), "dp2", 16, 8, 20, 500)
    b = rpm.run_overrides("sdpg-urkl", 2, 40, 3e-5, "/r/b", str(tmp_path), "dp2", 16, 8, 20, 500)
    shared = lambda o: [x for x in o if not x.startswith(("algorithm.", "train.run_dir="))]  # noqa: E731
    assert shared(a) == shared(b)
    assert {"optimizer.lr=3e-05", "train.seed=2", "train.steps=40", "parallel.tp=1",
            "rollout.sync_strategy=disk"} <= set(a)


def _write_run(run_dir, accs, ctx, before, meank=None, final_acc=None):
    os.makedirs(run_dir)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(len(accs) * 2):
            rec = {"step": step, "reward": 0.1 * step, "entropy": 0.5, "response_length": 24.0, "distill_kl": 0.4}
            if step % 2 == 1 and step // 2 < len(accs) - 1:
                rec["eval/accuracy"] = accs[step // 2]
                rec["eval/accuracy_with_context"] = ctx
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"step": len(accs) * 2, "final": True, "eval/accuracy": accs[-1],
                            "eval/accuracy_with_context": ctx}) + "\n")
    with open(run_dir / "summary.json", "w") as f:
        json.dump({"accuracy_before": before, "accuracy_with_context_before": 0.96}, f)
    if meank is not None:
        with open(run_dir / "meank.json", "w") as f:
            json.dump({"mean@4": meank}, f)


def test_summarize_and_aggregate(tmp_path):
    _write_run(tmp_path / "s1", [0.30, 0.40, 0.35], 0.90, 0.26, meank=0.20)
    _write_run(tmp_path / "s2", [0.28, 0.32, 0.38], 0.80, 0.26, meank=0.24)
    r1, r2 = rpm.summarize_run(str(tmp_path / "s1")), rpm.summarize_run(str(tmp_path / "s2"))
    assert (r1["last"], r1["best"], r1["with_context"], r1["before"], r1["mean@4"]) == (0.35, 0.40, 0.90, 0.26, 0.20)
    assert r2["best"] == 0.38  # the final evaluation counts towards best
    # Curves: the before-evaluation at step 0, evaluations after step index s at s + 1, final at its step.
    assert r1["curves"]["eval/accuracy"] == [[0, 0.26], [2, 0.30], [4, 0.40], [6, 0.35]]
    assert r1["curves"]["reward"][0] == [1, 0.0]
    table = rpm.aggregate({"grpo": [r1, r2]})
    last = table["grpo"]["last"]
    assert last["n"] == 2 and last["mean"] == pytest.approx(0.365)
    assert last["sd"] == pytest.approx(statistics.stdev([0.35, 0.38]))
    md = rpm.markdown_table(table)
    row = [line for line in md.splitlines() if line.startswith("| GRPO")][0]
    assert "| 2 |" in row and "36.5 ± 2.1" in row and "39.0 ± 1.4" in row and "22.0 ± 2.8" in row
    assert rpm.mean_curve([r1["curves"]["eval/accuracy"], r2["curves"]["eval/accuracy"]])[-1] == [6, 0.365]
    by_step = rpm.accuracy_by_step_table({"grpo": [r1, r2]}).splitlines()
    assert by_step[0] == "| method | step 0 | step 2 | step 4 | step 6 |"
    assert by_step[2] == "| GRPO | 26.0 ± 0.0 | 29.0 ± 1.4 | 36.0 ± 5.7 | 36.5 ± 2.1 |"


def test_single_seed_and_missing_meank(tmp_path):
    _write_run(tmp_path / "s1", [0.30, 0.40], 0.90, 0.26)
    table = rpm.aggregate({"opsd": [rpm.summarize_run(str(tmp_path / "s1"))]})
    assert table["opsd"]["last"]["sd"] is None and table["opsd"]["mean@4"]["mean"] is None
    row = rpm.markdown_table(table).splitlines()[-1]
    assert row.startswith("| OPSD | 1 | 26.0 | 40.0 | 40.0 | 90.0 | n/a |")


def test_unfinished_run_and_bad_line_are_named(tmp_path):
    run = tmp_path / "r"
    os.makedirs(run)
    (run / "metrics.jsonl").write_text('{"step": 0, "reward": 0.1}\n')
    with pytest.raises(ValueError, match="no final record"):
        rpm.summarize_run(str(run))
    (run / "metrics.jsonl").write_text('{"step": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        rpm.summarize_run(str(run))


def test_latest_hf_weights_skips_incomplete(tmp_path):
    for v, files in (("v3", ["config.json", "model.safetensors"]), ("v12", ["config.json"]),
                     ("v10", ["config.json", "model-00001-of-00001.safetensors"]), ("tmp_v13", ["config.json"])):
        os.makedirs(tmp_path / "weight_sync" / v)
        for name in files:
            (tmp_path / "weight_sync" / v / name).write_text("x")
    assert rpm.latest_hf_weights(str(tmp_path)) == str(tmp_path / "weight_sync" / "v10")
    assert rpm.latest_hf_weights(str(tmp_path / "none")) is None


def test_write_plots(tmp_path):
    _write_run(tmp_path / "s1", [0.30, 0.40], 0.90, 0.26)
    paths = rpm.write_plots({"grpo": [rpm.summarize_run(str(tmp_path / "s1"))]}, str(tmp_path / "plots"))
    assert len(paths) == len(rpm.CURVES) + 1 and all(os.path.getsize(p) > 1000 for p in paths)


def test_task_synthetic_long_plumbing(tmp_path):
    """--task synthetic-long: its config validates with a run's overrides, its default methods and variant slot."""
    from megatron_sdpg.config.loader import load_config
    from megatron_sdpg.data.tasks import get_task
    from megatron_sdpg.tiny.tokenizer import build_tokenizer

    assert rpm.TASKS["synthetic-long"]["model_dir"].endswith(os.path.join("artifacts", "tiny_model_long"))
    overrides = rpm.run_overrides("sdpg-gated", 1, 10, 3e-5, str(tmp_path / "r"), str(tmp_path), "dp2", 16, 8, 5, 500)
    cfg = load_config(rpm.TASKS["synthetic-long"]["config"], overrides, world_size=2)
    assert (cfg.data.task, cfg.data.template, cfg.algorithm.distill_gate) == ("synthetic-long", "context_only", True)
    task = get_task(cfg.data.task, **dict(cfg.data.task_options))
    problems = task.problems("heldout", 50)
    tok = build_tokenizer([task.reference_response(p) for p in problems])
    longest = max(len(tok(task.reference_response(p), add_special_tokens=False)["input_ids"]) for p in problems)
    assert 60 <= longest and longest + 1 <= cfg.rollout.sampling.max_new_tokens  # + EOS, never truncated

    model_dir = tmp_path / "model"
    os.makedirs(model_dir)
    (model_dir / "config.json").write_text("{}")
    methods = list(rpm.LONG_METHODS) + ["sdpg-beta1"]
    for method in methods:
        _write_run(tmp_path / "out" / "runs" / f"{method}_seed1", [0.2, 0.3], 0.7, 0.2, meank=0.1)
    result = rpm.main(["--task", "synthetic-long", "--aggregate-only", "--out", str(tmp_path / "out"),
                       "--model-dir", str(model_dir), "--variant", "sdpg-beta1", "--steps", "6", "--quick"])
    assert result["settings"]["task"] == "synthetic-long" and result["settings"]["methods"] == methods
    assert list(result["table"]) == methods
    assert "Task synthetic-long" in (tmp_path / "out" / "results.md").read_text()


def test_signals_and_with_context_tables(tmp_path):
    _write_run(tmp_path / "s1", [0.30, 0.40, 0.35], 0.90, 0.26)
    _write_run(tmp_path / "s2", [0.28, 0.32, 0.38], 0.80, 0.26)
    r1, r2 = rpm.summarize_run(str(tmp_path / "s1")), rpm.summarize_run(str(tmp_path / "s2"))
    # _write_run: 6 training steps with reward 0.1 * step, entropy 0.5, length 24; all of them are "the last 10".
    assert (r1["reward"], r1["entropy"], r1["response_length"]) == (pytest.approx(0.25), 0.5, 24.0)
    long = tmp_path / "long"
    _write_run(long, [0.1] * 8, 0.9, 0.1)  # 16 training steps: the last 10 are steps 6..15
    assert rpm.summarize_run(str(long))["reward"] == pytest.approx(statistics.fmean(0.1 * s for s in range(6, 16)))
    rows = rpm.signals_table({"grpo": [r1, r2]}).splitlines()
    assert rows[0] == "| method | reward (%) | entropy | response length |" and rows[2].startswith("| GRPO | ")
    with_context = rpm.accuracy_by_step_table({"grpo": [r1, r2]}, "eval/accuracy_with_context").splitlines()
    assert with_context[2].endswith("| 85.0 ± 7.1 |")  # the final evaluations, 0.90 and 0.80


def test_meank_temperature_comes_from_the_task_config_and_a_stale_meank_is_redone(tmp_path):
    assert rpm.rollout_temperature(rpm.TASKS["synthetic"]["config"]) == 1.0
    assert rpm.rollout_temperature(rpm.TASKS["synthetic-long"]["config"]) == 0.7
    (tmp_path / "c.yaml").write_text("train: {steps: 3}\n")
    assert rpm.rollout_temperature(str(tmp_path / "c.yaml")) == 1.0
    assert not rpm.meank_done(str(tmp_path), 0.7)
    (tmp_path / "meank.json").write_text("[0.1]")  # not an object: redone, not a traceback
    assert not rpm.meank_done(str(tmp_path), 1.0)
    (tmp_path / "meank.json").write_text(json.dumps({"mean@4": 0.1, "temperature": 1.0}))
    assert rpm.meank_done(str(tmp_path), 1.0) and not rpm.meank_done(str(tmp_path), 0.7)
    md = rpm.markdown_table(rpm.aggregate({"grpo": []}), temperature=0.7)
    assert "mean@4 T=0.7" in md.splitlines()[0]


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_bad_meank_temperature_is_refused_with_rc_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        rpm.main(["--aggregate-only", "--meank-temperature", bad])
    assert e.value.code == 2 and "--meank-temperature: must be a finite number >= 0" in capsys.readouterr().err


def test_task_synthetic_long_alone_is_its_full_comparison(tmp_path):
    """``--task synthetic-long`` without a mode reproduces docs/results.md's long table: 3 seeds, 50 steps."""
    model_dir = tmp_path / "model"
    os.makedirs(model_dir)
    (model_dir / "config.json").write_text("{}")
    for method in rpm.LONG_METHODS:
        for seed in (1, 2, 3):
            _write_run(tmp_path / "out" / "runs" / f"{method}_seed{seed}", [0.2, 0.3], 0.7, 0.2, meank=0.1)
    settings = rpm.main(["--task", "synthetic-long", "--aggregate-only", "--out", str(tmp_path / "out"),
                         "--model-dir", str(model_dir)])["settings"]
    assert (settings["full"], settings["steps"], settings["seeds"], settings["eval_every"]) == (
        True, rpm.LONG_FULL_STEPS, [1, 2, 3], rpm.LONG_EVAL_EVERY)
    assert settings["methods"] == list(rpm.LONG_METHODS) and settings["meank_temperature"] == 0.7
    quick = rpm.main(["--task", "synthetic-long", "--quick", "--aggregate-only", "--out", str(tmp_path / "out"),
                      "--model-dir", str(model_dir)])["settings"]
    assert (quick["full"], quick["steps"], quick["seeds"]) == (False, 40, [1])


def test_plot_colours_are_distinct_per_method_and_a_lone_method_plots_without_warnings(tmp_path):
    for methods in (list(rpm.DECOMPOSITION_METHODS), list(rpm.LONG_METHODS), list(rpm.METHODS)):
        colours = rpm.method_colors(methods)
        assert len({str(c) for c in colours.values()}) == len(methods), methods
    _write_run(tmp_path / "s1", [0.30, 0.40], 0.90, 0.26)
    run = rpm.summarize_run(str(tmp_path / "s1"))
    del run["curves"]["distill_kl"]  # GRPO logs no divergence: that panel is empty
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend with no lines
        rpm.write_plots({"grpo": [run]}, str(tmp_path / "plots"))


def test_aggregating_runs_that_do_not_exist_is_one_line_rc_2(tmp_path, capsys):
    model_dir = tmp_path / "model"
    os.makedirs(model_dir)
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        rpm.main(["--aggregate-only", "--out", str(tmp_path / "out"), "--model-dir", str(model_dir)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert err.startswith("error: ") and "grpo_seed1/metrics.jsonl: missing" in err
