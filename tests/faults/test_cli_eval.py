"""``python -m megatron_sdpg.eval`` faults: each is one line on stderr and exit status 2 (in process)."""

import os
import shutil

import pytest

from megatron_sdpg.testing.tiny_hf import build_tiny_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has a chat template (the prompts need one)."""
    path = build_tiny_llama(str(tmp_path_factory.mktemp("eval") / "tiny"), vocab_size=64, hidden=32)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return path


def _no_chat_template(hf, tmp):
    d = str(tmp / "nochat")
    shutil.copytree(hf, d)
    os.remove(os.path.join(d, "chat_template.jinja"))
    return ["--hf-dir", d, "--task", "synthetic", "--n", "1"], "--hf-dir: cannot build prompts"


def _bad_metadata(hf, tmp):
    d = str(tmp / "meta")
    shutil.copytree(hf, d)
    with open(os.path.join(d, "sdpg_task.json"), "w") as f:
        f.write("{truncated")
    return ["--hf-dir", d, "--task", "synthetic"], "sdpg_task.json: not valid JSON"


def _bad_config(hf, tmp):
    d = str(tmp / "conf")
    shutil.copytree(hf, d)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{bad")
    return ["--hf-dir", d, "--task", "synthetic", "--n", "1"], "config.json' is not a valid JSON file"


def _no_weights(hf, tmp):
    d = str(tmp / "noweights")
    shutil.copytree(hf, d)
    os.remove(os.path.join(d, "model.safetensors"))
    return ["--hf-dir", d, "--task", "synthetic", "--n", "1"], "--hf-dir: cannot load the model"


CASES = {
    "missing_dir": lambda hf, tmp: (["--hf-dir", str(tmp / "none"), "--task", "synthetic"], "--hf-dir: "),
    "unknown_task": lambda hf, tmp: (["--hf-dir", hf, "--task", "nope"], "unknown generated task"),
    "bad_option_value": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--task-option", "terms=99"],
                                         "terms=99 must be in [2, 8]"),
    "option_type": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--task-option", "terms=abc"],
                                    "must be an integer"),
    "unknown_option": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--task-option", "bogus=1"],
                                       "unknown option(s) ['bogus']"),
    "option_syntax": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--task-option", "terms"],
                                      "expected KEY=VALUE"),
    "unknown_template": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--template", "nope"],
                                         "--template: unknown template"),
    "n_zero": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--n", "0"], "--n: must be >= 1"),
    "n_too_large": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--n", "100000000"],
                                    "--n: synthetic task: split 'heldout' has fewer than"),
    "samples_zero": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--samples", "0"], "--samples: must be >= 1"),
    "temperature_nan": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--temperature", "nan"],
                                        "--temperature: must be a finite number"),
    "batch_zero": lambda hf, tmp: (["--hf-dir", hf, "--task", "synthetic", "--batch-size", "0"],
                                   "--batch-size: must be >= 1"),
    "bad_metadata": _bad_metadata,
    "bad_config": _bad_config,
    "no_weights": _no_weights,
    "no_chat_template": _no_chat_template,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_error_is_one_line_rc_2(hf_dir, tmp_path, capsys, case):
    from megatron_sdpg.eval import main

    argv, needle = CASES[case](hf_dir, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
