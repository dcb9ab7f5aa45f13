"""Student / teacher prompts through a Qwen3-style chat template (thinking on / off), built here.

The tokenizer is a ``tokenizers`` WordLevel model with Qwen3's special tokens, saved
and reloaded as a model directory; its jinja template ends like Qwen3's: with
``enable_thinking=False`` the assistant header is followed by an empty think block.
"""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.data.build import build_prompt_builder
from megatron_sdpg.data.config import DataConfig
from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.prompts import encode
from megatron_sdpg.data.templates import BUILTIN_TEMPLATES
from megatron_sdpg.tiny.tokenizer import build_tokenizer

QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
PROBLEM = Problem("p0", "Find $x$ if $2x = 6$.", "3", "Divide both sides by 2 to get x = 3.")
LONG = Problem("p1", "What is 2+3?", "5", " ".join(f"step {i} add" for i in range(150)))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    corpus = [t.render_teacher(p) for t in BUILTIN_TEMPLATES.values() for p in (PROBLEM, LONG)]
    corpus += ["user\nassistant\nsystem\n [...]"]
    pieces = {p for text in corpus for p, _ in pre_tokenizers.Split(
        Regex(r"\\[A-Za-z]+| ?[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"), behavior="isolated").pre_tokenize_str(text)}
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["<unk>"] + sorted(pieces))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\[A-Za-z]+| ?[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token="<unk>")
    hf.chat_template = QWEN3_LIKE_TEMPLATE
    out = tmp_path_factory.mktemp("qwen3_like")
    hf.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(qwen3_dir):
    return AutoTokenizer.from_pretrained(qwen3_dir)


def test_thinking_modes_wrap_the_papers_prompts(tokenizer):
    student_msg = BUILTIN_TEMPLATES["paper"].render_student(PROBLEM)
    teacher_msg = BUILTIN_TEMPLATES["paper"].render_teacher(PROBLEM)
    head = "<|im_start|>user\n"
    for mode, tail in (("model", "<|im_start|>assistant\n"), ("thinking", "<|im_start|>assistant\n"),
                       ("no_thinking", "<|im_start|>assistant\n<think>\n\n</think>\n\n")):
        builder = build_prompt_builder(tokenizer, DataConfig(chat_template=mode))
        assert builder.student_text(PROBLEM) == head + student_msg + "<|im_end|>\n" + tail
        assert builder.teacher_text(PROBLEM) == head + teacher_msg + "<|im_end|>\n" + tail
        ids = builder.student_ids(PROBLEM)
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert tokenizer.decode(ids) == builder.student_text(PROBLEM)
    assert "Solve the following math problem step by step" in student_msg
    assert teacher_msg.startswith(student_msg + "\n[Hint] The correct answer is 3. A common way to solve this is:\n")


def test_thinking_mode_needs_a_template_that_reads_it():
    tiny = build_tokenizer(["1+2"])
    with pytest.raises(ValueError, match=r"^data\.chat_template: 'no_thinking' needs a chat template"):
        build_prompt_builder(tiny, DataConfig(chat_template="no_thinking"))
    build_prompt_builder(tiny, DataConfig(chat_template="model"))
    with pytest.raises(ConfigError, match=r"^data\.chat_template:"):
        DataConfig(chat_template="on").validate("data")


@pytest.mark.parametrize("mode", ["thinking", "no_thinking"])
def test_long_context_is_cut_first_and_counted(tokenizer, mode):
    full = build_prompt_builder(tokenizer, DataConfig(chat_template=mode, max_teacher_prompt_tokens=100_000))
    limit = len(full.teacher_ids(LONG)) - 200
    builder = build_prompt_builder(tokenizer, DataConfig(chat_template=mode, max_prompt_tokens=limit // 2,
                                                         max_teacher_prompt_tokens=limit))
    assert builder.truncations == 0
    builder.teacher_ids(PROBLEM)
    assert builder.truncations == 0
    ids = builder.teacher_ids(LONG)
    text = builder.teacher_text(LONG)
    assert builder.truncations == 2  # two teacher prompts of a long problem were built
    assert len(ids) <= limit and encode(tokenizer, text) == ids
    assert "What is 2+3?" in text and "The correct answer is 5" in text and "Do NOT state" in text
    assert "step 0 add" in text and "step 149 add" not in text and "[...]" in text
    assert text.endswith(full.teacher_text(LONG)[-30:])  # the same chat tail (thinking mode kept)


def test_chat_endpoint_prompt_passes_template_kwargs(tokenizer):
    from megatron_sdpg.rollout.server.openai_chat import chat_prompt_ids
    from megatron_sdpg.rollout.server.requests import BadRequest

    body = {"messages": [{"role": "user", "content": "What is 2+3?"}]}
    on = chat_prompt_ids(tokenizer, body)
    off = chat_prompt_ids(tokenizer, {**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert tokenizer.decode(on) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(off) == tokenizer.decode(on) + "<think>\n\n</think>\n\n"
    with pytest.raises(BadRequest, match="^chat_template_kwargs:"):
        chat_prompt_ids(tokenizer, {**body, "chat_template_kwargs": [1]})
