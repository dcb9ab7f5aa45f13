"""Prompt builders: chat templating, teacher = student + context, response alignment, truncation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.data.config import DataConfig
from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.prompts import PromptBuilder, PromptTooLongError, build_sequence_pair, encode
from megatron_sdpg.data.tasks import get_task
from megatron_sdpg.data.templates import BUILTIN_TEMPLATES, get_template
from megatron_sdpg.tiny.tokenizer import build_tokenizer

TASK = get_task("synthetic")
PROBLEMS = TASK.problems("heldout", 20)
LONG = Problem(id="long", question="What is 2+3?", answer="5", context=" ".join(f"step {i} add" for i in range(200)))


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [t.render_teacher(p) for t in BUILTIN_TEMPLATES.values() for p in PROBLEMS + [LONG]]
    return build_tokenizer(corpus + [TASK.reference_response(p) for p in PROBLEMS])


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_teacher_prompt_is_student_message_plus_context(tokenizer, name):
    builder = PromptBuilder(tokenizer, get_template(name))
    for p in PROBLEMS:
        student, teacher = builder.student_text(p), builder.teacher_text(p)
        message = get_template(name).render_student(p)
        assert student.startswith("<|user|>" + message) and student.endswith("<|assistant|>")
        assert teacher.startswith("<|user|>" + message) and p.context in teacher
        assert (p.answer in teacher) == (name in ("paper", "compact"))  # opsd: the solution carries it
        assert builder.student_ids(p) == encode(tokenizer, student)


def test_paper_template_text():
    t = get_template("paper")
    text = t.render_teacher(PROBLEMS[0])
    assert "Present your final answer inside \\boxed{}, for example \\boxed{42}." in text
    assert f"[Hint] The correct answer is {PROBLEMS[0].answer}. A common way to solve this is:\n{PROBLEMS[0].context}" in text
    assert "Do NOT state that you were given the answer or reference." in text
    no_ctx = t.render_teacher(Problem("x", "q", "7"))
    assert "[Hint] The correct answer is 7.\n[Instruction]" in no_ctx


def test_response_tokens_identical_in_student_and_teacher_sequences(tokenizer):
    builder = PromptBuilder(tokenizer, get_template("paper"))
    for p in PROBLEMS:
        response = encode(tokenizer, TASK.reference_response(p)) + [tokenizer.eos_token_id]
        pair = build_sequence_pair(builder.student_ids(p), builder.teacher_ids(p), response)
        s0, s1 = pair.student_response
        t0, t1 = pair.teacher_response
        assert pair.student_ids[s0:s1] == pair.teacher_ids[t0:t1] == response
        assert pair.student_ids[:s0] == builder.student_ids(p) and pair.teacher_ids[:t0] == builder.teacher_ids(p)
        assert t0 - s0 == len(builder.teacher_ids(p)) - len(builder.student_ids(p)) > 0
        assert tokenizer.decode(pair.teacher_ids[t0:t1], skip_special_tokens=True) == TASK.reference_response(p)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 500), min_size=1, max_size=40),
    st.lists(st.integers(0, 500), min_size=1, max_size=80),
    st.lists(st.integers(0, 500), min_size=1, max_size=30),
)
def test_sequence_pair_alignment_property(student, teacher, response):
    pair = build_sequence_pair(student, teacher, response)
    assert pair.student_ids[slice(*pair.student_response)] == response
    assert pair.teacher_ids[slice(*pair.teacher_response)] == response
    assert pair.student_response[1] == len(pair.student_ids) and pair.teacher_response[1] == len(pair.teacher_ids)


def test_sequence_pair_rejects_empty():
    with pytest.raises(ValueError, match="empty response"):
        build_sequence_pair([1], [2], [])
    with pytest.raises(ValueError, match="empty prompt"):
        build_sequence_pair([], [2], [3])


@pytest.mark.parametrize("policy", ["head", "tail"])
def test_long_context_is_truncated_to_fit(tokenizer, policy):
    full = PromptBuilder(tokenizer, get_template("paper"))
    limit = len(full.teacher_ids(LONG)) - 300
    builder = PromptBuilder(tokenizer, get_template("paper"), max_teacher_prompt_tokens=limit, context_truncation=policy)
    text = builder.teacher_text(LONG)
    assert len(builder.teacher_ids(LONG)) <= limit
    assert "[...]" in text and "The correct answer is 5" in text and "What is 2+3?" in text
    assert ("step 0 add" in text) == (policy == "head")
    assert ("step 199 add" in text) == (policy == "tail")


def test_truncation_error_policy_and_impossible_limits(tokenizer):
    with pytest.raises(PromptTooLongError, match="long: teacher prompt is .* over"):
        PromptBuilder(tokenizer, get_template("paper"), 200, "error").teacher_text(LONG)
    with pytest.raises(PromptTooLongError, match="even without its context"):
        PromptBuilder(tokenizer, get_template("paper"), 20, "head").teacher_text(LONG)


def test_custom_templates_and_config_validation():
    t = get_template("custom", student="Q: {question}", teacher_block="Ref: {context} => {answer}")
    assert t.render_teacher(Problem("1", "2+2", "4", "two and two")) == "Q: 2+2\nRef: two and two => 4"
    with pytest.raises(ValueError, match="unknown field"):
        get_template("custom", student="{q}", teacher_block="x")
    with pytest.raises(ValueError, match="unknown template"):
        get_template("fancy")
    DataConfig().validate("data")
    cases = [
        (dict(template="custom", student_template="{question}"), r"^data\.teacher_template:"),
        (dict(template="custom", student_template="{nope}", teacher_template="x"), r"^data\.student_template:"),
        (dict(template="fancy"), r"^data\.template:"),
        (dict(task="nope"), r"^data\.task:"),
        (dict(task="files"), r"^data\.train_files:"),
        (dict(task="files", train_files=["a.csv"]), r"^data\.train_files:"),
        (dict(max_prompt_tokens=10, max_teacher_prompt_tokens=5), r"^data\.max_teacher_prompt_tokens:"),
        (dict(context_truncation="middle"), r"^data\.context_truncation:"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            DataConfig(**kwargs).validate("data")


def test_configs_are_omegaconf_structured():
    from omegaconf import OmegaConf

    from megatron_sdpg.rewards.config import RewardConfig

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(["task_options.terms=4"]))
    assert cfg.task_options.terms == 4
    OmegaConf.to_object(cfg).validate("data")
    reward = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), {"wrong_reward": -1.0}))
    reward.validate("reward")
