"""Converter faults: overlapping input/output, ``--overwrite`` of what no conversion wrote, bad input files.

Each case runs the real CLI in a subprocess and expects exit status 2, one line on
stderr naming the flag or file, and the input left byte for byte as it was.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from megatron_sdpg.testing.tiny_hf import build_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TO_MEGATRON = os.path.join(ROOT, "tools", "convert_hf_to_megatron.py")
TO_HF = os.path.join(ROOT, "tools", "convert_megatron_to_hf.py")


def _run(tool, *args):
    proc = subprocess.run([sys.executable, tool, "--no-progress", *args], capture_output=True, text=True,
                          timeout=180, env=ENV, cwd=ROOT)
    return proc.returncode, proc.stderr.strip()


def _digest(path) -> dict:
    """``{relative path: sha256}`` of every file under ``path``."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """``(hf, megatron)``: a tiny Llama and its conversion (made once; tests copy before touching)."""
    base = tmp_path_factory.mktemp("conv")
    hf = build_tiny_llama(str(base / "hf"), vocab_size=64, hidden=32)
    meg = str(base / "meg")
    rc, err = _run(TO_MEGATRON, "--hf-dir", hf, "--megatron-dir", meg)
    assert rc == 0, err
    return hf, meg


def _one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("case", ["hf_same", "hf_out_encloses", "hf_out_inside", "meg_same", "meg_out_encloses"])
def test_overlapping_input_and_output_with_overwrite_leave_the_input_untouched(dirs, tmp_path, case):
    hf, meg = dirs
    src = str(tmp_path / "in")
    shutil.copytree(hf if case.startswith("hf") else meg, src)
    before = _digest(src)
    out = {"same": src, "out_encloses": str(tmp_path), "out_inside": os.path.join(src, "sub")}[case.split("_", 1)[1]]
    if case.startswith("hf"):
        rc, err = _run(TO_MEGATRON, "--hf-dir", src, "--megatron-dir", out, "--overwrite")
        flag = "--megatron-dir"
    else:
        rc, err = _run(TO_HF, "--megatron-dir", src, "--hf-dir", out, "--overwrite")
        flag = "--hf-dir"
    assert rc == 2
    _one_line(err, flag, "overlaps the input")
    assert _digest(src) == before
    assert not os.path.exists(out + ".incomplete")


def test_overwrite_replaces_only_a_previous_conversion(dirs, tmp_path):
    hf, meg = dirs
    # Someone's own model directory (e.g. the original HF model given as the output by mistake).
    theirs = str(tmp_path / "theirs")
    shutil.copytree(hf, theirs)
    before = _digest(theirs)
    rc, err = _run(TO_HF, "--megatron-dir", meg, "--hf-dir", theirs, "--overwrite")
    assert rc == 2
    _one_line(err, "--hf-dir", "not written by a conversion")
    assert _digest(theirs) == before
    # A previous conversion's output is replaced.
    out = str(tmp_path / "out")
    assert _run(TO_HF, "--megatron-dir", meg, "--hf-dir", out)[0] == 0
    rc, err = _run(TO_HF, "--megatron-dir", meg, "--hf-dir", out, "--overwrite")
    assert rc == 0, err
    assert os.path.isfile(os.path.join(out, "config.json"))


def _truncated_safetensors(hf, meg, tmp):
    d = str(tmp / "hf_trunc")
    shutil.copytree(hf, d)
    path = os.path.join(d, "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    return TO_MEGATRON, ["--hf-dir", d, "--megatron-dir", str(tmp / "o")], "model.safetensors"


def _truncated_distcp(hf, meg, tmp):
    d = str(tmp / "meg_trunc")
    shutil.copytree(meg, d)
    path = os.path.join(d, "__0_0.distcp")
    os.truncate(path, os.path.getsize(path) // 2)
    return TO_HF, ["--megatron-dir", d, "--hf-dir", str(tmp / "o")], "__0_0.distcp: truncated"


def _deleted_shard(hf, meg, tmp):
    d = str(tmp / "meg_del")
    shutil.copytree(meg, d)
    os.remove(os.path.join(d, "__0_0.distcp"))
    return TO_HF, ["--megatron-dir", d, "--hf-dir", str(tmp / "o")], "__0_0.distcp: missing"


def _tp_zero(hf, meg, tmp):
    return TO_MEGATRON, ["--hf-dir", hf, "--megatron-dir", str(tmp / "o"), "--tp", "0"], "--tp: must be >= 1"


def _output_is_a_file(hf, meg, tmp):
    path = tmp / "a_file"
    path.write_text("keep me")
    return TO_MEGATRON, ["--hf-dir", hf, "--megatron-dir", str(path), "--overwrite"], "is an existing file"


def _bad_model_json(hf, meg, tmp):
    d = str(tmp / "meg_badjson")
    shutil.copytree(meg, d)
    with open(os.path.join(d, "megatron_sdpg_model.json"), "w") as f:
        f.write("{not json")
    return TO_HF, ["--megatron-dir", d, "--hf-dir", str(tmp / "o")], "megatron_sdpg_model.json: not valid JSON"


@pytest.mark.parametrize("make", [_truncated_safetensors, _truncated_distcp, _deleted_shard, _tp_zero,
                                  _output_is_a_file, _bad_model_json], ids=lambda f: f.__name__.strip("_"))
def test_bad_converter_input_is_one_line(dirs, tmp_path, make):
    tool, args, needle = make(*dirs, tmp_path)
    rc, err = _run(tool, *args)
    assert rc == 2
    _one_line(err, needle)
    if make is _output_is_a_file:
        assert (tmp_path / "a_file").read_text() == "keep me"
