"""Configuration faults through the real CLIs (in process: they fail before any process group).

Every case must exit 2 with one line naming the field; none may raise. Covers a
YAML whose top level is a list, ``algorithm.preset=[a]``, template placeholders,
non-finite or absurd optimizer and algorithm numbers, synthetic-task options,
the files task without held-out files, and ``plan parallel.tp=0``. Also: a preset
named on the command line outranks the file's algorithm values for the fields it
sets (``run_tiny_cpu.sh``'s own header example, ``algorithm.preset=grpo``).
"""

import os
import re

import pytest

from megatron_sdpg.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")


def _one_line(capsys, field: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"config error: {field}: "), err
    return err


CASES = [
    # (extra argv, field named)
    (["algorithm.preset=[a]"], "algorithm.preset"),
    (["data.template=custom", "data.student_template={question[0]}", 'data.teacher_template="[Hint] {answer}"'],
     "data.student_template"),
    (["data.template=custom", "data.student_template=[Hint] {answer}", 'data.teacher_template="{answer}"'],
     "data.student_template"),
    (["data.template=custom", 'data.student_template="{__class__}"', 'data.teacher_template="{answer}"'],
     "data.student_template"),
    (["data.template=custom", 'data.student_template="{question!x}"', 'data.teacher_template="{answer}"'],
     "data.student_template"),
    (["optimizer.lr=inf"], "optimizer.lr"),
    (["optimizer.lr=1000"], "optimizer.lr"),
    (["optimizer.weight_decay=nan"], "optimizer.weight_decay"),
    (["optimizer.clip_grad=nan"], "optimizer.clip_grad"),
    (["optimizer.clip_grad=inf"], "optimizer.clip_grad"),
    (["optimizer.adam_eps=0"], "optimizer.adam_eps"),
    (["optimizer.adam_eps=-1e-8"], "optimizer.adam_eps"),
    (["algorithm.beta_base=inf"], "algorithm.beta_base"),
    (["algorithm.alpha=nan"], "algorithm.alpha"),
    (["data.task_options.terms=abc"], "data.task_options"),
    (["data.task_options.bogus=1"], "data.task_options"),
    (["data.task_options.terms=99"], "data.task_options"),
    (["data.task=files", "data.train_files=[a.jsonl]"], "data.eval_files"),
    (["rollout.off_policy_steps=2"], "rollout.off_policy_steps"),
    (["rollout.off_policy_steps=-1"], "rollout.off_policy_steps"),
    (["rollout.off_policy_steps=true"], "rollout.off_policy_steps"),
    (["rollout.off_policy_steps=1", "rollout.colocate=true"], "rollout.off_policy_steps"),
]


@pytest.mark.parametrize("extra, field", CASES, ids=[c[1] + f"-{i}" for i, c in enumerate(CASES)])
def test_train_cli_config_faults_are_one_line(capsys, extra, field):
    from megatron_sdpg.train.cli import main

    assert main(["--config", CONFIG, "parallel.tp=1", *extra]) == 2
    _one_line(capsys, field)


@pytest.mark.parametrize("text, field, needle", [("- train\n- model\n", "--config", "top level must be a mapping"),
                                                 ("algorithm: [1]\n", "algorithm", "must be a mapping of fields")])
def test_yaml_of_the_wrong_shape(tmp_path, capsys, text, field, needle):
    from megatron_sdpg.train.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    assert needle in _one_line(capsys, field)


@pytest.mark.parametrize("override, field", [("parallel.tp=0", "parallel.tp"), ("parallel.pp=0", "parallel.pp")])
def test_plan_with_a_zero_parallel_degree(capsys, override, field):
    from megatron_sdpg.plan import main

    assert main(["--config", CONFIG, override]) == 2
    _one_line(capsys, field)


def test_preset_named_on_the_command_line_outranks_the_file():
    file_only = load_config(CONFIG, ["parallel.tp=1"])
    assert file_only.algorithm.preset == "sdpg" and file_only.algorithm.beta_base == 0.1
    grpo = load_config(CONFIG, ["parallel.tp=1", "algorithm.preset=grpo"])
    assert grpo.algorithm.preset == "grpo"
    assert grpo.algorithm.beta_base == 0.0 and grpo.algorithm.ref_kl_mode == "k3"  # no distillation under grpo
    assert grpo.algorithm.alpha == file_only.algorithm.alpha  # a field grpo does not set keeps the file's value
    # Any other command-line value still wins over the preset.
    assert load_config(CONFIG, ["parallel.tp=1", "algorithm.preset=grpo", "algorithm.beta_base=0.05"]
                       ).algorithm.beta_base == 0.05


def test_a_preset_in_the_file_stays_under_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  preset: grpo\n  beta_base: 0.2\n")
    cfg = load_config(str(path))
    assert cfg.algorithm.preset == "grpo" and cfg.algorithm.beta_base == 0.2 and cfg.algorithm.ref_kl_mode == "k3"


def test_run_tiny_cpu_header_example_trains_grpo():
    """``bash examples/run_tiny_cpu.sh algorithm.preset=grpo``: the overrides the script passes, then the example's."""
    script = open(os.path.join(ROOT, "examples", "run_tiny_cpu.sh")).read()
    example = re.search(r"`bash examples/run_tiny_cpu\.sh ([^`]*)`", script).group(1).split()
    assert example == ["algorithm.preset=grpo"]
    fixed = ["model.hf_dir=m", "model.megatron_dir=m.megatron", "train.run_dir=r", "train.steps=120"]
    assert "model.hf_dir=\"$MODEL_DIR\" model.megatron_dir=\"$MEGATRON_DIR\"" in script
    cfg = load_config(CONFIG, fixed + example, world_size=2)
    assert cfg.algorithm.preset == "grpo" and cfg.algorithm.beta_base == 0.0


@pytest.mark.parametrize("option, needle", [("terms=99", "terms=99 must be in [2, 8]"),
                                            ("bogus=1", "unknown option(s) ['bogus']"),
                                            ("terms=abc", "terms='abc' must be an integer")])
def test_make_tiny_model_synthetic_task_options(tmp_path, capsys, option, needle):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", os.path.join(ROOT, "tools", "make_tiny_model.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--out", str(tmp_path / "m"), "--task-option", option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --task synthetic / --task-option: ") and needle in err
    assert not (tmp_path / "m").exists()
