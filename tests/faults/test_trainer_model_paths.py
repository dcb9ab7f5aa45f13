"""Model-path faults: a malformed or missing ``config.json`` / ``megatron_dir``, another model's ``megatron_dir``.

Each is a one-line ``ConfigError`` naming ``model.hf_dir`` or ``model.megatron_dir``
before any load; under torchrun with 2 ranks the trainer prints that line once (not
a traceback from every rank) and every rank exits 2.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.models.architecture import ModelConfig, resolve_model_config
from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.testing.tiny_hf import build_tiny_llama
from megatron_sdpg.weights.checkpoint import check_megatron_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _convert(hf, out):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_megatron.py"), "--no-progress",
                           "--hf-dir", hf, "--megatron-dir", out], capture_output=True, text=True, timeout=180,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def models(tiny_task_model, tmp_path_factory):
    """``(task model hf dir, its conversion, another model's conversion)``."""
    base = tmp_path_factory.mktemp("paths")
    hf = tiny_task_model[0]
    other = build_tiny_llama(str(base / "other"), vocab_size=64, hidden=32)
    return hf, _convert(hf, str(base / "meg")), _convert(other, str(base / "other_meg"))


def _model_cfg(hf) -> ModelConfig:
    return resolve_model_config(ModelConfig(hf_dir=hf))


@pytest.mark.parametrize("content, needle", [("{bad", "is not valid JSON"), ("[1]", "must hold a JSON object"),
                                             ('{"model_type": "llama"}', "config.json has no 'vocab_size'"),
                                             ('{"model_type": "llama", "vocab_size": "x"}', "bad value")])
def test_malformed_config_json(models, tmp_path, content, needle):
    hf = str(tmp_path / "hf")
    shutil.copytree(models[0], hf)
    with open(os.path.join(hf, "config.json"), "w") as f:
        f.write(content)
    with pytest.raises(ConfigError, match=rf"^model\.hf_dir: .*{needle}"):
        _model_cfg(hf)


def test_megatron_dir_faults_name_the_field(models, tmp_path):
    hf, meg, other = models
    cfg = _model_cfg(hf)
    check_megatron_dir(meg, cfg)
    cases = {str(tmp_path / "missing"): "is not a directory", hf: "not a megatron_sdpg checkpoint",
             other: "holds another model than model.hf_dir"}
    trunc = str(tmp_path / "trunc")
    shutil.copytree(meg, trunc)
    shard = [n for n in os.listdir(trunc) if n.endswith(".distcp")][0]
    os.truncate(os.path.join(trunc, shard), 10)
    cases[trunc] = f"{shard}: truncated"
    bad_json = str(tmp_path / "bad_json")
    shutil.copytree(meg, bad_json)
    with open(os.path.join(bad_json, "megatron_sdpg_model.json"), "w") as f:
        json.dump([1], f)
    cases[bad_json] = "expected a JSON object"
    for path, needle in cases.items():
        with pytest.raises(ConfigError) as err:
            check_megatron_dir(path, cfg)
        assert str(err.value).startswith("model.megatron_dir: ") and needle in str(err.value), str(err.value)


def test_two_ranks_print_one_line_for_another_models_megatron_dir(models, tmp_path):
    hf, _, other = models
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megatron_sdpg.train", "--config", os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"),
           f"model.hf_dir={hf}", f"model.megatron_dir={other}", f"train.run_dir={tmp_path / 'run'}",
           "parallel.tp=1", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert proc.returncode != 0  # each rank exits 2; torchrun reports 1
    assert "exitcode: 2" in proc.stderr or "exit code: 2" in proc.stderr.lower(), proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and "model.megatron_dir:" in lines[0] and "another model" in lines[0], proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank")], proc.stderr[-3000:]
