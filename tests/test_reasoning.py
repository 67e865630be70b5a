"""Thinking models: reasoning split from the answer in run and chat, and --think on|off.

The splitter (llmctl/reasoning.py) is checked on its own against every way a
stream can be cut into pieces; the template variables against the bounded
renderer; and run and chat end to end on the demo model given thinking-style
chat templates (its vocabulary, with a few of its unused special tokens renamed
to reasoning markers, shows what llama.cpp prints of them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl import reasoning
from llmctl.errors import EXIT_USAGE, UsageError
from llmctl.reasoning import HARMONY, THINK_TAGS, ReasoningFormat, Splitter, Thought

EXE = str(Path(sys.executable).with_name("llmctl"))

# Templates in the shape of the real ones, cut down to what matters here.
QWEN3 = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and '</think>' in m.content %}{{ m.content.split('</think>')[-1].lstrip('\\n') }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
R1 = (  # DeepSeek-R1 distills: no switch; the generation prompt opens the reasoning block
    "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "{% else %}{% set c = m.content %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>assistant\n{{ c }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
GPT_OSS = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{% for m in messages %}{% if m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def split(fmt: ReasoningFormat, pieces: list[str], prompt: str | None = None) -> tuple[str | None, str, list]:
    splitter = Splitter(fmt, prompt)
    events = [event for piece in pieces for event in splitter.feed(piece)] + splitter.finish()
    return splitter.reasoning, splitter.answer, events


def shown(events: list) -> tuple[str, str]:
    """What the UI received: reasoning pieces joined, answer pieces joined."""
    return "".join(e.text for e in events if isinstance(e, Thought)), "".join(e for e in events if isinstance(e, str))


def cuts(text: str) -> st.SearchStrategy[list[str]]:
    """Every way of cutting ``text`` into pieces (markers split anywhere, one character at a time included)."""
    return st.sets(st.integers(1, max(len(text) - 1, 1)), max_size=len(text)).map(
        lambda points: [text[a:b] for a, b in zip([0, *sorted(points)], [*sorted(points), len(text)]) if a < b]
    )


# --- which markers a template uses ----------------------------------------------------------------


@pytest.mark.parametrize(
    "template, expected",
    [
        (QWEN3, THINK_TAGS),
        (R1, THINK_TAGS),
        (GPT_OSS, HARMONY),
        ("{{ '<seed:think>' }}{{ x.split('</seed:think>') }}", ReasoningFormat("tags", "<seed:think>", "</seed:think>")),
        ("[THINK]{{ m }}[/THINK]", ReasoningFormat("tags", "[THINK]", "[/THINK]")),
        ("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}", None),  # SmolLM2: no reasoning
        (None, None),
    ],
)
def test_the_template_tells_which_markers_a_model_uses(template: str | None, expected: ReasoningFormat | None) -> None:
    assert reasoning.detect(template) == expected


# --- the splitter -----------------------------------------------------------------------------------

THINKING_REPLY = "<think>\nThe user asks for the capital.\nIt is Paris.\n</think>\n\nParis is the capital of France."


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_reasoning_and_answer_are_the_same_however_the_stream_is_cut(data) -> None:
    pieces = data.draw(cuts(THINKING_REPLY))
    thought, answer, events = split(THINK_TAGS, pieces)
    assert thought == "The user asks for the capital.\nIt is Paris."
    assert answer == "Paris is the capital of France."
    assert shown(events) == (thought, answer)  # what streamed is what the result says


HARMONY_REPLY = (
    "<|channel|>analysis<|message|>User greets. Answer briefly.<|start|>assistant<|channel|>final<|message|>Hello! How can I help?"
)


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(["", "<|end|>"]))
def test_gpt_oss_channels_split_however_the_stream_is_cut(data, end: str) -> None:
    """llama.cpp does not print <|end|> (a control token): the next <|start|> ends the analysis too."""
    pieces = data.draw(cuts(HARMONY_REPLY.replace("<|start|>", end + "<|start|>")))
    thought, answer, events = split(HARMONY, pieces)
    assert (thought, answer) == ("User greets. Answer briefly.", "Hello! How can I help?")
    assert shown(events) == (thought, answer)


def test_reasoning_streams_as_it_comes_not_at_the_end() -> None:
    splitter = Splitter(THINK_TAGS)
    assert splitter.feed("<thi") == []  # could be the open tag: held
    assert splitter.feed("nk>\nLet me see") == [Thought("Let me see")]
    assert splitter.feed(" more</th") == [Thought(" more")]  # the start of the close tag is held
    assert splitter.feed("ink>\n\nYes") == ["Yes"]
    assert splitter.finish() == []


def test_a_prompt_that_opens_the_block_makes_the_first_words_reasoning() -> None:
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert split(THINK_TAGS, ["Hmm, a greeting.", "\n</think>", "\n\nHello!"], prompt)[:2] == ("Hmm, a greeting.", "Hello!")


def test_a_prompt_that_closes_an_empty_block_makes_everything_the_answer() -> None:
    """Qwen3 with enable_thinking false ends the prompt with an empty block."""
    prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert split(THINK_TAGS, ["Hello", " there"], prompt)[:2] == (None, "Hello there")


def test_a_reply_without_reasoning_is_kept_exactly() -> None:
    for pieces in (["  Hello\n", "world <think> is a tag"], ["\n"], []):
        assert split(THINK_TAGS, pieces)[:2] == (None, "".join(pieces))
    assert split(HARMONY, [" plain ", "text"])[:2] == (None, " plain text")


def test_a_reply_that_ends_inside_its_reasoning_has_no_answer() -> None:
    """As llama-server and Ollama: the unfinished reasoning stays reasoning; the commands say so."""
    splitter = Splitter(THINK_TAGS, "<|im_start|>assistant\n<think>\n")
    splitter.feed("Still thinking about it</thi")
    splitter.finish()
    assert (splitter.reasoning, splitter.answer, splitter.in_reasoning) == ("Still thinking about it</thi", "", True)
    splitter = Splitter(HARMONY)
    splitter.feed("<|channel|>analysis<|message|>Long thought")
    splitter.finish()
    assert (splitter.reasoning, splitter.answer, splitter.in_reasoning) == ("Long thought", "", True)


def test_a_harmony_header_that_never_ends_is_shown_not_swallowed() -> None:
    text = "<|channel|>" + "x" * (reasoning.HEADER_LIMIT + 10)
    assert split(HARMONY, [text[:500], text[500:]])[:2] == (None, text)


def test_harmony_prompts_that_open_a_message_set_the_channel() -> None:
    prompt = "<|start|>assistant<|channel|>analysis<|message|>"
    assert split(HARMONY, ["Thinking.<|end|><|start|>assistant<|channel|>final<|message|>Done."], prompt)[:2] == ("Thinking.", "Done.")


def test_several_blocks_are_joined_by_a_blank_line() -> None:
    text = "<|channel|>analysis<|message|>One.<|end|><|start|>assistant<|channel|>analysis<|message|>Two.<|end|>"
    text += "<|start|>assistant<|channel|>final<|message|>Answer."
    assert split(HARMONY, [text])[:2] == ("One.\n\nTwo.", "Answer.")


def test_the_engine_stream_keeps_its_result_last_with_the_reasoning() -> None:
    from llmctl.engine import Result, Timings

    stream = ["<think>a", "</think>b", Result("<think>a</think>b", "stop", Timings())]
    out = list(reasoning.separate(stream, THINK_TAGS))
    assert out[:-1] == [Thought("a"), "b"]
    assert (out[-1].text, out[-1].reasoning, out[-1].finish_reason) == ("b", "a", "stop")


# --- --think: the template's switch ------------------------------------------------------------------


def test_think_off_sets_the_templates_own_switch() -> None:
    setup = reasoning.thinking_setup(QWEN3, "off")
    assert (setup.format, setup.switch, setup.variables) == (THINK_TAGS, "enable_thinking", {"enable_thinking": False})
    assert reasoning.thinking_setup(QWEN3, "on").variables == {"enable_thinking": True}
    assert reasoning.thinking_setup(QWEN3, None).variables is None  # nothing passed unless asked


def test_gpt_oss_takes_levels_and_cannot_be_turned_off() -> None:
    assert reasoning.thinking_setup(GPT_OSS, "high").variables == {"reasoning_effort": "high"}
    with pytest.raises(UsageError, match="no switch to turn thinking off") as raised:
        reasoning.thinking_setup(GPT_OSS, "off")
    assert "--think low" in (raised.value.hint or "")


@pytest.mark.parametrize(
    "template, think, problem",
    [
        (R1, "off", "no switch to turn thinking off"),
        ("{{ messages[0].content }}", "on", "does not think"),
        (QWEN3, "maybe", "is not one of"),
    ],
)
def test_think_values_a_template_cannot_honour_are_usage_errors(template: str, think: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        reasoning.thinking_setup(template, think)


def test_think_with_a_builtin_chat_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--chat-format"):
        reasoning.thinking_setup(QWEN3, "off", chat_format="chatml")


def test_template_variables_reach_the_template_and_nothing_changes_without_them() -> None:
    import llmctl.engine  # noqa: F401 - installs the bounded formatter
    from llmctl.chat_template import BoundedChatFormatter

    formatter = BoundedChatFormatter(QWEN3, "<|im_end|>", "")
    try:
        messages = [{"role": "user", "content": "hi"}]
        plain = formatter(messages=messages).prompt
        assert plain.endswith("<|im_start|>assistant\n") and formatter.last_prompt == plain
        formatter.variables = {"enable_thinking": False}
        assert formatter(messages=messages).prompt == plain + "<think>\n\n</think>\n\n"
        formatter.variables = {}
        assert formatter(messages=messages).prompt == plain
    finally:
        formatter.worker.close()
