"""Configuration: YAML + overrides, one-line errors naming the field, resolved output."""

import os
import subprocess
import sys

import pytest

from megatron_sdpg.config import ConfigError, load_config, save_resolved
from megatron_sdpg.platform.layout import ParallelConfig, ParallelLayout


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 96\n  num_attention_heads: 4\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.steps=9", "parallel.tp=2"], world_size=4)
    assert cfg.model.hidden_size == 96
    assert cfg.train.steps == 9
    assert cfg.parallel.tp == 2


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        (["parallel.tp=3"], "parallel.tp", "tp*pp*cp=3"),
        (["parallel.tp=2", "parallel.pp=3"], "parallel.tp", "does not divide world size 4"),
        (["model.hidden_size=abc"], "model.hidden_size", "could not be converted to Integer"),
        (["model.no_such_key=1"], "model.no_such_key", "unknown key"),
        (["optimizer.lr=0"], "optimizer.lr", "must be > 0"),
        (["model.num_key_value_heads=3"], "model.num_key_value_heads", "do not divide"),
        (["model.arch=gpt9"], "model.arch", "unsupported architecture"),
        (["train.steps=0"], "train.steps", "must be >= 1"),
        (["parallel.cp=2"], "parallel.cp", "context parallelism (cp=2) is not implemented"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last", "must be >= 1"),
        (["checkpoint.save_every=-1"], "checkpoint.save_every", "must be >= 0"),
        (["rollout.engine=sglang", "rollout.colocate=true", "rollout.sync_strategy=distributed"],
         "rollout.sync_strategy", "NCCL cannot join two ranks on one GPU"),
    ],
)
def test_bad_values_name_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, world_size=4)
    assert err.value.field == field
    assert fragment in str(err.value)
    assert str(err.value).startswith(field + ":")
    assert "\n" not in str(err.value)


def test_trainer_refuses_context_parallelism_at_start_up_with_one_line():
    """cp > 1 is not implemented (sequences are not split per CP rank): rc 2 before any model is built."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "megatron_sdpg.train", "parallel.cp=2"], capture_output=True,
                          text=True, timeout=120, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "config error: parallel.cp: context parallelism (cp=2) is not implemented: sequences are not split per "
        "CP rank; set parallel.cp=1"]


def test_unknown_key_in_yaml_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"^train\.stepz: unknown key \(.*bad\.yaml\)"):
        load_config(str(path))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=5", "model.hidden_size=32"])
    written = save_resolved(cfg, str(tmp_path / "run"))
    again = load_config(written)
    assert again == cfg


def test_layout_infers_dp_and_names_mismatch():
    layout = ParallelLayout.resolve(ParallelConfig(tp=2, pp=1), 4)
    assert (layout.tp, layout.pp, layout.dp) == (2, 1, 2)
    with pytest.raises(ConfigError, match=r"^parallel\.tp: tp\*pp\*cp=6 .* does not divide world size 4$"):
        ParallelLayout.resolve(ParallelConfig(tp=2, pp=3), 4)
    with pytest.raises(ConfigError, match=r"^parallel\.vpp:"):
        ParallelLayout.resolve(ParallelConfig(pp=1, vpp=2), 1)


def test_package_imports_without_cuda_extras():
    code = (
        "import sys, megatron_sdpg, megatron_sdpg.config, megatron_sdpg.platform;"
        "bad = [m for m in ('transformer_engine', 'apex', 'sglang') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_off_policy_steps_defaults_to_on_policy_and_one_step_gets_a_tis_cap():
    """rollout.off_policy_steps: 0 by default (tis_cap untouched); 1 fills a null algorithm.tis_cap with 2.0
    (the staleness correction) and keeps an explicit one; the resolved file round-trips."""
    assert load_config(None).rollout.off_policy_steps == 0
    assert load_config(None).algorithm.tis_cap is None
    assert load_config(None, ["rollout.off_policy_steps=1"]).algorithm.tis_cap == 2.0
    assert load_config(None, ["rollout.off_policy_steps=1", "algorithm.tis_cap=3.5"]).algorithm.tis_cap == 3.5
    for value in ("2", "-1"):
        with pytest.raises(ConfigError, match=r"^rollout\.off_policy_steps: must be 0 \(on-policy\) or 1"):
            load_config(None, [f"rollout.off_policy_steps={value}"])
