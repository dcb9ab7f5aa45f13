"""The tiny-model builder at test size, the HF directory it writes, and evaluation on it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_sdpg.data.prompts import PromptBuilder
from megatron_sdpg.data.tasks import get_task
from megatron_sdpg.data.templates import get_template
from megatron_sdpg.eval import evaluate, generate_responses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf_dir(tiny_task_model):
    path, summary = tiny_task_model
    assert summary["heldout_n"] == 8 and 0 <= summary["heldout_accuracy"] <= 1
    return path


def test_directory_is_a_loadable_hf_model(hf_dir):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "sdpg_task.json"):
        assert os.path.isfile(os.path.join(hf_dir, name)), name
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.vocab_size == len(tok) and model.config.vocab_size % 16 == 0
    ids = tok.apply_chat_template([{"role": "user", "content": "12+34+56"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")
    assert tok.unk_token_id not in ids["input_ids"][0].tolist()
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids["input_ids"].shape[1] + 5) or tok.eos_token_id in out[0].tolist()
    meta = json.load(open(os.path.join(hf_dir, "sdpg_task.json")))
    assert meta["task"] == "synthetic" and meta["template"] == "compact" and meta["history"]


def test_tokenizer_round_trips_responses(hf_dir):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    task = get_task("synthetic")
    for p in task.problems("heldout", 20):
        text = task.reference_response(p)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids and len(ids) + 1 <= 48


def test_batched_left_padded_greedy_matches_one_by_one(hf_dir):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    builder = PromptBuilder(tok, get_template("compact"))
    problems = get_task("synthetic", terms=4, min_digits=1).problems("heldout", 6)
    prompts = [builder.teacher_text(p) if i % 2 else builder.student_text(p) for i, p in enumerate(problems)]
    batched = generate_responses(model, tok, prompts, 1, 0.0, 12, batch_size=6)
    single = [generate_responses(model, tok, [p], 1, 0.0, 12, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_evaluate_metrics_and_cli(hf_dir):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    task = get_task("synthetic")
    res = evaluate(model, tok, task, n=6, samples=3, temperature=1.0, with_context=True,
                   builder=PromptBuilder(tok, get_template("compact")), max_new_tokens=16)
    for prefix in ("", "context/"):
        assert 0 <= res[f"{prefix}mean@3"] <= res[f"{prefix}pass@3"] <= 1
        assert 1 <= res[f"{prefix}mean_response_tokens"] <= 16
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_sdpg.eval", "--hf-dir", hf_dir, "--task", "synthetic", "--n", "5",
         "--with-context", "--max-new-tokens", "16"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["n"] == 5 and line["template"] == "compact" and "mean@1" in line and "context/pass@1" in line
    torch.testing.assert_close(torch.tensor(line["mean@1"]), torch.tensor(line["pass@1"]))
