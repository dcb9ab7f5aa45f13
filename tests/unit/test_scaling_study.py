"""tools/scaling_study.py without training: aggregation of synthetic metrics.jsonl files,
efficiency, CSV and PNG outputs, and the sbatch command lines of --slurm (a fake `sbatch` on PATH
records its arguments)."""

import csv
import json
import os
import stat

import importlib.util

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("scaling_study", os.path.join(REPO, "tools", "scaling_study.py"))
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def step_record(step, step_s, prompt_tok, completion_tok, gen=1.0, logprob=0.5, update=2.0, sync=0.25):
    return {"step": step, "step_s": step_s, "rollout/prompt_tokens": prompt_tok,
            "rollout/completion_tokens": completion_tok, "rollout/gen_time_s": gen,
            "time/logprob_passes_s": logprob, "time/update_s": update, "time/sync_s": sync, "reward": 0.5}


def write_run(run_dir, records, world=None):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    if world is not None:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"layout": f"tp1 pp1 cp1 ep1 dp{world} (world {world})"}, f)


def test_collect_run_drops_warmup_final_and_resumed_duplicates(tmp_path):
    records = [step_record(0, 100.0, 1, 1, gen=50.0),  # warm-up: would dominate every figure
               step_record(1, 8.0, 300, 500, gen=2.0),
               step_record(2, 999.0, 1, 1),  # superseded by the resumed step 2 below
               step_record(3, 10.0, 300, 700, gen=3.0, update=2.5),
               step_record(2, 9.0, 200, 600, gen=1.0, update=3.0),
               {"step": 4, "final": True, "eval/accuracy": 0.5}]
    write_run(tmp_path / "r", records, world=2)
    row = study.collect_run(str(tmp_path / "r"), None, warmup=1)
    assert row["count"] == 2 and row["ranks"] == 2 and row["steps_timed"] == 3
    # tokens: (800 + 800 + 1000) / (8 + 9 + 10) s; rollout: (500 + 600 + 700) / (2 + 1 + 3) s
    assert row["tokens_per_s"] == pytest.approx(2600 / 27)
    assert row["rollout_tokens_per_s"] == pytest.approx(1800 / 6)
    assert row["gen_s"] == pytest.approx(2.0)
    assert row["update_s"] == pytest.approx((2.0 + 3.0 + 2.5) / 3)
    assert row["step_s"] == pytest.approx(9.0)
    assert row["other_s"] == pytest.approx(9.0 - 2.0 - 0.5 - 7.5 / 3 - 0.25)


def test_collect_run_errors_name_the_run(tmp_path):
    write_run(tmp_path / "a", [step_record(0, 1.0, 1, 1)], world=1)
    with pytest.raises(study.StudyError, match="no step records left after dropping 1"):
        study.collect_run(str(tmp_path / "a"), 1, warmup=1)
    bad = step_record(1, 1.0, 1, 1)
    del bad["time/sync_s"]
    write_run(tmp_path / "b", [step_record(0, 1.0, 1, 1), bad])
    with pytest.raises(study.StudyError, match=r"b: step 1 has no numeric 'time/sync_s'"):
        study.collect_run(str(tmp_path / "b"), 1, warmup=1)
    with pytest.raises(study.StudyError, match="no summary.json with the world size"):
        study.collect_run(str(tmp_path / "b"), None, warmup=0)
    with pytest.raises(study.StudyError, match="run directory not found"):
        study.collect_run(str(tmp_path / "missing"), 1, warmup=0)


def test_efficiency_against_the_smallest_count():
    rows = study.add_efficiency([{"count": 4, "tokens_per_s": 250.0}, {"count": 1, "tokens_per_s": 100.0},
                                 {"count": 2, "tokens_per_s": 180.0}])
    assert [r["count"] for r in rows] == [1, 2, 4]
    assert [r["ideal_tokens_per_s"] for r in rows] == [100.0, 200.0, 400.0]
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 0.625])
    with pytest.raises(study.StudyError, match="two runs share a count"):
        study.add_efficiency([{"count": 2, "tokens_per_s": 1.0}, {"count": 2, "tokens_per_s": 2.0}])


def test_finish_writes_csv_and_pngs(tmp_path):
    for n, step_s in ((1, 4.0), (2, 2.5), (4, 2.0)):
        write_run(tmp_path / f"ranks{n}", [step_record(s, step_s, 100, 300) for s in range(3)], world=n)
    rc = study.main(["--collect", *(str(tmp_path / f"ranks{n}") for n in (4, 1, 2)), "--out", str(tmp_path / "o")])
    assert rc == 0
    with open(tmp_path / "o" / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == study.COLUMNS
    assert [int(r["count"]) for r in table] == [1, 2, 4]
    assert [float(r["tokens_per_s"]) for r in table] == pytest.approx([100.0, 160.0, 200.0])
    assert [float(r["efficiency"]) for r in table] == pytest.approx([1.0, 0.8, 0.5])
    for name in ("throughput.png", "step_split.png"):
        with Image.open(tmp_path / "o" / name) as img:
            assert img.format == "PNG" and img.size[0] > 100


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` on PATH that appends its argv (JSON) to a log and prints a growing job id."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    script = bindir / "sbatch"
    script.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                      f"log = {str(log)!r}\n"
                      "with open(log, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      "n = sum(1 for _ in open(log))\n"
                      "print(f'Submitted batch job {122 + n}')\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    def calls():
        return [json.loads(line) for line in open(log)]

    return calls


def _export(argv):
    (flag,) = [a for a in argv if a.startswith("--export=")]
    items = flag[len("--export="):].split(",")
    assert items[0] == "ALL"
    return dict(i.split("=", 1) for i in items[1:])


def test_slurm_submits_one_job_per_node_count(tmp_path, fake_sbatch):
    out = tmp_path / "study"
    assert study.main(["--slurm", "--nodes", "4", "2", "8", "--script", "examples/run_sdpg_70b.sh",
                       "--out", str(out), "--steps", "10", "--env", "HF_DIR=/m/llama", "algorithm.alpha=0.01"]) == 0
    calls = fake_sbatch()
    assert len(calls) == 3
    script = os.path.join(REPO, "examples", "run_sdpg_70b.sh")
    for argv, n in zip(calls, (2, 4, 8)):
        # the 70B script's ROLLOUT_NODES default (4) is added to the allocation
        assert argv[0] == f"--nodes={n + 4}"
        assert _export(argv) == {"TRAIN_NODES": str(n), "RUN_DIR": str(out / f"nodes{n}"), "ROLLOUT_NODES": "4",
                                 "HF_DIR": "/m/llama"}
        assert argv[argv.index(script) + 1:] == ["train.steps=10", "algorithm.alpha=0.01"]
    manifest = json.load(open(out / "manifest.json"))
    assert [(j["nodes"], j["job_id"], j["run_dir"]) for j in manifest["jobs"]] == [
        (2, "123", str(out / "nodes2")), (4, "124", str(out / "nodes4")), (8, "125", str(out / "nodes8"))]
    assert manifest["jobs"][0]["argv"] == ["sbatch", *calls[0]]


def test_slurm_weak_scaling_and_colocation(tmp_path, fake_sbatch):
    assert study.main(["--slurm", "--weak", "--colocate", "--nodes", "1", "2", "4", "--prompts-per-step", "64",
                       "--script", "examples/run_sdpg_8b.sh", "--out", str(tmp_path / "s")]) == 0
    calls = fake_sbatch()
    assert [a[0] for a in calls] == ["--nodes=1", "--nodes=2", "--nodes=4"]
    assert [_export(a)["COLOCATE"] for a in calls] == ["1"] * 3
    assert all("ROLLOUT_NODES" not in _export(a) for a in calls)
    assert [a[-1] for a in calls] == ["train.prompts_per_step=64", "train.prompts_per_step=128",
                                      "train.prompts_per_step=256"]


def test_slurm_failures_are_one_line(tmp_path, fake_sbatch, capsys):
    assert study.main(["--slurm", "--nodes", "2", "--script", "no/such.sh", "--out", str(tmp_path)]) == 2
    assert "--script: no such file: no/such.sh" in capsys.readouterr().err
    assert study.main(["--slurm", "--nodes", "2", "--script", "examples/run_sdpg_70b.sh", "--out", str(tmp_path),
                       "--env", "HF_DIR=/a,b"]) == 2
    assert "cannot carry a comma" in capsys.readouterr().err
    assert not (tmp_path / "sbatch.log").exists()  # validation comes before any submission


def test_manifest_collection(tmp_path):
    for n, step_s in ((2, 10.0), (4, 6.0)):
        write_run(tmp_path / f"nodes{n}", [step_record(s, step_s, 500, 1500) for s in range(4)], world=8 * n)
    manifest = {"jobs": [{"nodes": n, "job_id": str(n), "run_dir": str(tmp_path / f"nodes{n}")} for n in (2, 4)]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rows = study.add_efficiency(study.collect_manifest(str(tmp_path / "manifest.json"), warmup=1))
    assert [(r["count"], r["ranks"]) for r in rows] == [(2, 16), (4, 32)]
    assert rows[1]["efficiency"] == pytest.approx((2000 / 6) / (2 * 2000 / 10))


def test_local_command_layout():
    cmd = study.local_command(4, 2, "/r", "c.yaml", ["train.steps=6"], 1111, 2222)
    assert "--nproc_per_node=4" in cmd and "parallel.tp=2" in cmd and cmd[-1] == "train.steps=6"
    with pytest.raises(study.StudyError, match="--tp 2 does not divide --ranks 3"):
        study.local_command(3, 2, "/r", "c.yaml", [], 1, 2)
