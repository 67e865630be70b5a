"""Thinking models: reasoning split from the answer in run and chat, and --think on|off.

The splitter (llmctl/reasoning.py) is checked on its own against every way a
stream can be cut into pieces; the template variables against the bounded
renderer; and run and chat end to end on the demo model given thinking-style
chat templates (its vocabulary, with a few of its unused special tokens renamed
to reasoning markers, shows what llama.cpp prints of them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.engine import reasoning
from llmctl.engine.reasoning import HARMONY, THINK_TAGS, ReasoningFormat, Splitter, Thought
from llmctl.errors import EXIT_USAGE, UsageError
from tests.support.examples import examples

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


@settings(max_examples=examples(300), deadline=None)
@given(st.data())
def test_reasoning_and_answer_are_the_same_however_the_stream_is_cut(data) -> None:
    pieces = data.draw(cuts(THINKING_REPLY))
    thought, answer, events = split(THINK_TAGS, pieces)
    assert thought == "The user asks for the capital.\nIt is Paris."
    assert answer == "Paris is the capital of France."
    assert shown(events) == (thought, answer)  # what streamed is what the result says


HARMONY_REPLY = "<|channel|>analysis<|message|>User greets. Answer briefly.<|start|>assistant<|channel|>final<|message|>Hello! How can I help?"


@settings(max_examples=examples(300), deadline=None)
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
    from llmctl.engine.base import Result, Timings

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


def test_think_is_checked_before_anything_loads() -> None:
    assert reasoning.check_think(None, "chatml") is None
    assert reasoning.check_think("False", None) == "off"
    with pytest.raises(UsageError, match="not --chat-format chatml"):
        reasoning.check_think("on", "chatml")


def test_a_reply_without_an_answer_after_its_reasoning_is_explained() -> None:
    from llmctl.engine.base import Result, Timings

    cut = Result("", "length", Timings(), reasoning="Still thinking")
    assert "--max-tokens" in reasoning.no_answer(cut) and "/set max_tokens" in reasoning.no_answer(cut, "chat")
    assert "no answer after its reasoning" in reasoning.no_answer(Result(" ", "stop", Timings(), reasoning="Hm"))
    assert reasoning.no_answer(Result("Paris.", "stop", Timings(), reasoning="Hm")) is None
    assert reasoning.no_answer(Result("", "stop", Timings())) is None  # no reasoning: the empty-reply advice applies


def test_template_variables_reach_the_template_and_nothing_changes_without_them() -> None:
    import llmctl.engine.llama  # noqa: F401 - installs the bounded formatter
    from llmctl.engine.chat_template import BoundedChatFormatter

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


# --- with llama.cpp: the demo model under thinking-style templates ----------------------------------

SWITCHABLE = (  # Qwen3-like, opening the block in the prompt unless enable_thinking is false
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}"
)
QUESTION = "What is the capital of France?"
GREEDY = ("--temperature", "0", "--seed", "1")


def with_template(demo: Path, out: Path, template: str, renamed: dict[int, tuple[str, int]]) -> Path:
    """The demo model with another chat template and some of its tokens renamed (same vocabulary size)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(demo)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    for index, (text, kind) in renamed.items():
        tokens[index], types[index] = text, kind
    strings, ints, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32, gguf.GGUFValueType.ARRAY
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents(), endianess=reader.endianess)
    copy_with_new_metadata(
        reader,
        writer,
        {
            gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(strings, template),
            gguf.Keys.Tokenizer.LIST: MetadataDetails(array, tokens, sub_type=strings),
            gguf.Keys.Tokenizer.TOKEN_TYPE: MetadataDetails(array, types, sub_type=ints),
        },
        [],
    )
    return out


USER_DEFINED, CONTROL = 4, 3  # llama.cpp's token types
# Greedy, the demo model answers the question "The capital of France is Paris."; with its " is" token
# renamed to an ordinary "</think>" token, it writes "The capital of France</think> Paris." - a reply
# that thinks, then answers.
CLOSES_AFTER_FRANCE = {314: ("</think>", USER_DEFINED)}


@pytest.fixture(scope="module")
def thinking_models(tmp_path_factory, demo_model: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("thinking")
    return {
        "r1": with_template(demo_model, folder / "r1.gguf", R1, CLOSES_AFTER_FRANCE),
        "switchable": with_template(demo_model, folder / "switchable.gguf", SWITCHABLE, CLOSES_AFTER_FRANCE),
        "unclosed": with_template(demo_model, folder / "unclosed.gguf", R1, {}),  # never writes </think>
    }


@pytest.mark.slow
def test_run_prints_only_the_answer_and_json_carries_the_reasoning(cli, thinking_models: dict[str, Path]) -> None:
    r = cli("run", thinking_models["r1"], QUESTION, *GREEDY, "--max-tokens", "30")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Paris.\n"
    assert "capital" not in r.stderr  # not a terminal: the thinking is not shown
    data = json.loads(cli("run", thinking_models["r1"], QUESTION, *GREEDY, "--max-tokens", "30", "--json").stdout)
    assert (data["reasoning"], data["text"]) == ("The capital of France", "Paris.")
    r = cli("run", thinking_models["r1"], QUESTION, *GREEDY, "--max-tokens", "30", "--json", "--raw", "--think", "off")
    assert r.exit_code == 0 and json.loads(r.stdout)["reasoning"] is None  # --raw: no template, nothing is split
    assert "--think is ignored with --raw" in r.stderr


@pytest.mark.slow
def test_a_reply_that_never_leaves_its_reasoning_says_there_is_no_answer(cli, thinking_models: dict[str, Path]) -> None:
    r = cli("run", thinking_models["unclosed"], QUESTION, *GREEDY, "--max-tokens", "30", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["text"] == "" and data["reasoning"].startswith("The capital of France is Paris")
    r = cli("run", thinking_models["unclosed"], QUESTION, *GREEDY, "--max-tokens", "4")
    assert r.exit_code == 0 and r.stdout.strip() == ""
    assert "no answer" in r.stderr and "--max-tokens" in r.stderr, r.stderr


@pytest.mark.slow
def test_think_off_uses_the_templates_switch(cli, thinking_models: dict[str, Path]) -> None:
    on = json.loads(cli("run", thinking_models["switchable"], QUESTION, *GREEDY, "--max-tokens", "30", "--json").stdout)
    assert on["reasoning"] == "The capital of France" and on["text"] == "Paris."
    off = json.loads(cli("run", thinking_models["switchable"], QUESTION, *GREEDY, "--max-tokens", "30", "--json", "--think", "off").stdout)
    assert off["reasoning"] is None and off["text"]
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]  # the prompt closed an empty block


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, think, said",
    [("r1", "off", "no switch to turn thinking off"), ("demo", "on", "does not think"), ("switchable", "sometimes", "is not one of")],
)
def test_think_a_model_cannot_honour_is_one_usage_error(cli, thinking_models: dict[str, Path], demo_model: Path, model: str, think: str, said: str) -> None:
    path = demo_model if model == "demo" else thinking_models[model]
    for command in (["run", path, "hi"], ["chat", path]):
        r = cli(*command, "--think", think, input="hi\n")
        assert r.exit_code == EXIT_USAGE, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and said in lines[0] and lines[1].startswith("hint: ") and len(lines) == 2, r.stderr


@pytest.mark.slow
def test_chat_shows_only_answers_and_keeps_only_answers_in_its_history(cli, thinking_models: dict[str, Path], tmp_path: Path) -> None:
    """As llama-server and Ollama: earlier turns go back to the model without their reasoning (Qwen3 and R1 ask for that)."""
    saved = tmp_path / "conversation.json"
    script = f"{QUESTION}\n/thinking\n/save {saved}\n"
    r = cli("chat", thinking_models["r1"], *GREEDY, "--max-tokens", "30", input=script)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Paris.\n"
    assert "The capital of France" in r.stderr  # /thinking shows the last reply's reasoning
    conversation = json.loads(saved.read_text())
    assert conversation == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."}]


@pytest.mark.slow
def test_chat_switches_thinking_with_set_think(cli, thinking_models: dict[str, Path]) -> None:
    script = f"/show\n/set think off\n{QUESTION}\n/thinking\n/show\n"
    r = cli("chat", thinking_models["switchable"], *GREEDY, "--max-tokens", "30", input=script)
    assert r.exit_code == 0, r.stderr
    assert "thinking:    marked <think>…</think>; think as the template has it; shown" in r.stderr
    assert "think = off" in r.stderr and "think off; shown" in r.stderr
    assert "the last reply had no reasoning" in r.stderr and r.stdout.strip()  # all answer
    r = cli("chat", thinking_models["r1"], "--max-tokens", "4", input="/set think off\n")
    assert r.exit_code == 1 and "error: this model's chat template has no switch to turn thinking off" in r.stderr, r.stderr


@pytest.mark.slow
def test_chat_says_when_a_reply_had_no_answer_after_its_reasoning(cli, thinking_models: dict[str, Path]) -> None:
    r = cli("chat", thinking_models["unclosed"], *GREEDY, "--max-tokens", "4", input=f"{QUESTION}\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == ""
    assert "warning: the reply ended inside the model's reasoning (finish_reason: length)" in r.stderr, r.stderr
    assert "/set max_tokens" in r.stderr and "reply is empty" not in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
@pytest.mark.parametrize("hide", [False, True])
def test_on_a_terminal_the_thinking_is_shown_dimmed_before_the_answer(thinking_models: dict[str, Path], hide: bool) -> None:
    import pexpect

    argv = ["run", str(thinking_models["r1"]), QUESTION, *GREEDY, "--max-tokens", "30"] + (["--hide-thinking"] if hide else [])
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"} | {"TERM": "xterm"}
    child = pexpect.spawn(EXE, argv, env=env, encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before.replace("\r\n", "\n")
    assert child.exitstatus == 0, screen
    if hide:
        assert "Thinking" not in screen and "capital" not in screen and screen.endswith("Paris.\n"), screen
    else:
        assert "\x1b[2m capital\x1b[0m" in screen, screen  # dimmed, piece by piece
        plain = screen.replace("\x1b[2m", "").replace("\x1b[0m", "")
        assert plain.endswith("Thinking…\nThe capital of France\n…done thinking.\n\nParis.\n"), screen


@pytest.mark.slow
def test_markers_llama_cpp_does_not_print_leave_the_reply_unsplit_with_a_warning(cli, demo_model: Path, tmp_path: Path) -> None:
    """Without it, a prompt that opens [THINK] would make the whole reply 'reasoning' and stdout empty."""
    template = R1.replace("<think>", "[THINK]").replace("</think>", "[/THINK]")
    path = with_template(demo_model, tmp_path / "control.gguf", template, {9: ("[THINK]", CONTROL), 10: ("[/THINK]", CONTROL)})
    r = cli("run", path, QUESTION, *GREEDY, "--max-tokens", "30", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["reasoning"] is None and data["text"].strip(), data
    assert "control tokens llama.cpp does not print ([THINK], [/THINK])" in r.stderr, r.stderr


@pytest.mark.slow
def test_llama_cpp_prints_the_markers_the_splitter_needs(demo_model: Path, tmp_path: Path) -> None:
    """What llama.cpp puts in the text for each kind of marker token, seen through the engine's own stream.

    <think> is an ordinary added token in R1 and Qwen3 (printed); gpt-oss's <|channel|>, <|message|>,
    <|start|> and <|end|> are control tokens llama.cpp prints anyway; a control-token [THINK] would
    never reach the text, and unseen_markers says so.
    """
    import functools

    import numpy as np
    from llama_cpp import LogitsProcessorList

    from llmctl import gguf
    from llmctl.engine import chat_template
    from llmctl.engine.base import Result
    from llmctl.engine.llama import Engine
    from llmctl.engine.sampling import SamplingSettings
    from llmctl.plan import hardware
    from llmctl.plan.fit import Candidate, make_plan

    renamed = {3: ("<think>", USER_DEFINED), 4: ("</think>", USER_DEFINED), 5: ("<|channel|>", CONTROL), 6: ("<|message|>", CONTROL)}
    renamed |= {7: ("<|start|>", CONTROL), 8: ("<|end|>", CONTROL), 9: ("[THINK]", CONTROL), 10: ("[/THINK]", CONTROL)}
    # With <|return|> and <|call|> in the vocabulary (gpt-oss), llama.cpp makes <|end|> an ordinary, printed
    # token that does not end generation; without them <|end|> would end it.
    renamed |= {11: ("<|return|>", CONTROL), 12: ("<|call|>", CONTROL)}
    path = with_template(demo_model, tmp_path / "markers.gguf", GPT_OSS, renamed)
    info = gguf.read_model([path])[1]
    engine = Engine.load("markers", [path], make_plan([Candidate("m", info, 1)], hardware.load_profile("laptop-8gb")), threads=2)
    try:
        llm = engine.llm
        assert reasoning.unseen_markers(llm, HARMONY) == [] and reasoning.unseen_markers(llm, THINK_TAGS) == []
        assert reasoning.unseen_markers(llm, ReasoningFormat("tags", "[THINK]", "[/THINK]")) == ["[THINK]", "[/THINK]"]
        original = llm.create_chat_completion
        for fmt, forced, expected in [
            (HARMONY, "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>Paris", ("Hmm.", "Paris")),
            (THINK_TAGS, "<think>Hmm.</think>Paris", ("Hmm.", "Paris")),
        ]:
            tokens = llm.tokenize(forced.encode(), add_bos=False, special=True) + [llm.token_eos()]
            step = iter(tokens)

            def force(input_ids, scores, step=step):
                chosen = np.full_like(scores, -np.inf)
                chosen[next(step)] = 0.0
                return chosen

            llm.create_chat_completion = functools.partial(original, logits_processor=LogitsProcessorList([force]))
            raw = list(engine.chat([{"role": "user", "content": "hi"}], SamplingSettings(temperature=0)))
            text = raw[-1].text
            assert text == forced, text  # every marker printed
            *pieces, result = reasoning.separate(iter(raw), fmt, lambda: chat_template.last_prompt(llm))
            assert isinstance(result, Result) and (result.reasoning, result.text) == expected, pieces
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
@pytest.mark.parametrize("mode", ["plain", "markdown", "hidden"])
def test_interactive_chat_shows_the_thinking_then_the_answer(thinking_models: dict[str, Path], mode: str) -> None:
    import io
    import re

    import pexpect

    extra = {"plain": [], "markdown": ["--markdown"], "hidden": ["--hide-thinking"]}[mode]
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"} | {"TERM": "xterm", "COLUMNS": "120", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(EXE, ["chat", str(thinking_models["r1"]), *GREEDY, "--max-tokens", "30", *extra], env=env, encoding="utf-8", timeout=120)
    child.logfile_read = screen = io.StringIO()
    child.expect(">>>")
    child.sendline(QUESTION)
    child.expect("tokens/s")
    child.expect(">>>")
    child.sendline("/thinking")
    child.expect(">>>")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    # As a terminal shows it: a line redrawn after a carriage return (a live display refreshed while a
    # slow reply streams) shows its last drawing only.
    text = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in raw.split("\n"))
    assert child.exitstatus == 0, text
    reply = text[text.index(QUESTION) :]
    if mode == "hidden":
        assert "Thinking" not in reply and "thinking hidden (/thinking shows it)" in reply, reply
        assert re.search(r"\nParis\. *\n", reply), reply
    else:
        assert re.search(r"Thinking…\nThe capital of France\n…done thinking\.\n\n+Paris\. *\n", reply), reply
    assert "/thinking\nThe capital of France\n" in reply, reply  # shown again on demand
