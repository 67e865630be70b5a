"""Thinking models: telling a reply's reasoning from its answer, and switching reasoning on or off.

Reasoning models write their thoughts before the answer, marked the way their
chat template says: ``<think>…</think>`` (DeepSeek-R1 and its distills, QwQ,
Qwen3, GLM, SmolLM3, Phi-4-reasoning; a few use other tags, listed in
``TAG_PAIRS``), or gpt-oss's harmony channels
(``<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…``).
``detect`` reads which from the template; ``Splitter`` then splits the streamed
text into reasoning and answer as it arrives, holding back only what could
still be the start of a marker, so a marker cut across pieces is recognised.

Where reasoning starts: a template may open the reasoning block in the prompt
itself (DeepSeek-R1's newer templates, QwQ, Qwen3's thinking mode end the
generation prompt with ``<think>``), so the model's first words are reasoning;
or close an empty block there (Qwen3 with ``enable_thinking`` false), so they
are the answer. The splitter reads this from the end of the rendered prompt.

A reply that ends inside its reasoning (the token limit or the context ran out,
or a model that never closes the block) has no answer: everything stays
reasoning, as llama-server and Ollama have it, and the commands say so. Text
that comes before any marker, or from a model that never opens a block, is the
answer, exactly as generated.

Switching: Qwen3, GLM, SmolLM3 and others read ``enable_thinking`` (DeepSeek-V3.1
and Granite read ``thinking``), gpt-oss reads ``reasoning_effort``
(low/medium/high; it cannot be turned off). ``thinking_setup`` probes which
variables change the template's output, as llama.cpp does, and turns
``--think`` into template variables; nothing is passed unless asked, so
prompts stay byte-identical without the option.

What llama.cpp prints: llama-cpp-python detokenises without special tokens.
``<think>`` and ``</think>`` are ordinary added tokens in these models and are
printed; gpt-oss's ``<|channel|>``, ``<|message|>``, ``<|start|>`` are control
tokens that llama.cpp always prints, and ``<|end|>`` becomes an ordinary token
when the vocabulary has ``<|return|>`` and ``<|call|>`` (which end generation
and are not printed). A new ``<|start|>`` or ``<|channel|>`` also ends a
message here, for builds that drop ``<|end|>``. A model whose markers are
control tokens that are not printed cannot be split: ``unseen_markers`` finds
them, and the commands warn and show the text unsplit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

from llmctl.errors import UsageError

if TYPE_CHECKING:
    from llmctl.engine.base import Result

# (open, close) tags of the reasoning block, as templates write them; the first whose
# close tag the template mentions wins.
TAG_PAIRS: tuple[tuple[str, str], ...] = (
    ("<seed:think>", "</seed:think>"),  # Seed-OSS
    ("<think>", "</think>"),  # DeepSeek-R1, QwQ, Qwen3, GLM-4.5, SmolLM3, Phi-4-reasoning, Hunyuan
    ("[THINK]", "[/THINK]"),  # Magistral
    ("<|START_THINKING|>", "<|END_THINKING|>"),  # Command A Reasoning
    ("◁think▷", "◁/think▷"),  # Kimi
)

# gpt-oss's harmony format.
START, CHANNEL, MESSAGE, END, RETURN, CALL = "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"
REASONING_CHANNEL = "analysis"
HEADER_LIMIT = 1000  # characters; a real header ("assistant to=functions.x<|channel|>commentary <|constrain|>json") is < 100

SWITCH_VARIABLES = ("enable_thinking", "thinking")
EFFORT_VARIABLE = "reasoning_effort"
LEVELS = ("low", "medium", "high")
THINK_VALUES = ("on", "off", *LEVELS)
PROBE = [{"role": "user", "content": "Hello"}]


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model marks its reasoning."""

    style: Literal["tags", "harmony"]
    open_tag: str = "<think>"
    close_tag: str = "</think>"

    @property
    def name(self) -> str:
        return "gpt-oss channels" if self.style == "harmony" else f"{self.open_tag}…{self.close_tag}"

    @property
    def markers(self) -> tuple[str, ...]:
        """The markers that must reach the text for the reply to be split."""
        return (CHANNEL, MESSAGE, START) if self.style == "harmony" else (self.open_tag, self.close_tag)


HARMONY = ReasoningFormat("harmony", CHANNEL, MESSAGE)
THINK_TAGS = ReasoningFormat("tags")


def detect(template: str | None) -> ReasoningFormat | None:
    """The reasoning markers ``template`` uses, or None for a model that does not mark reasoning."""
    if not template:
        return None
    if CHANNEL in template and MESSAGE in template:
        return HARMONY
    for open_tag, close_tag in TAG_PAIRS:
        if close_tag in template:
            return ReasoningFormat("tags", open_tag, close_tag)
    return None


# --- the splitter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thought:
    """A piece of the model's reasoning, as it streams (answer pieces stay plain ``str``)."""

    text: str


class Splitter:
    """Splits a streamed reply into reasoning and answer.

    ``feed(piece)`` returns what can be shown now: ``Thought`` pieces and answer ``str``
    pieces, in order; ``finish()`` returns what was held back. Whitespace around a
    reasoning block is dropped (the newlines after ``<think>`` and before
    ``</think>``), and so is the whitespace that starts the answer after it;
    everything else is kept exactly.
    """

    def __init__(self, fmt: ReasoningFormat, prompt: str | None = None) -> None:
        self.fmt = fmt
        self._buffer = ""
        self._out: list[str | Thought] = []
        self._reasoning: list[str] = []
        self._answer: list[str] = []
        self._held_space = ""  # trailing whitespace of the reasoning, shown only if more reasoning follows
        self._kind: bool | None = None  # what the current block is: True reasoning, False answer, None no block yet
        self._block_fresh = False  # at the start of a block: leading whitespace is dropped
        self._channel = ""
        self.state = "before"
        tail = (prompt or "")[-4 * HEADER_LIMIT :]
        if fmt.style == "tags":
            if tail.rstrip().endswith(fmt.open_tag):
                self._begin(True, "reasoning")
        elif tail.endswith(MESSAGE):  # a prompt that opened a message for the model: its channel is in the prompt
            self._begin(_channel_of(tail[tail.rfind(START) :]) == REASONING_CHANNEL, "body")

    # --- results

    @property
    def reasoning(self) -> str | None:
        """The reasoning so far; None when the model gave none."""
        return "".join(self._reasoning) or None

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    @property
    def in_reasoning(self) -> bool:
        """True while (or, after ``finish``, when the reply ended) inside a reasoning block."""
        return self._kind is True and self.state in ("reasoning", "body")

    def feed(self, piece: str) -> list[str | Thought]:
        self._buffer += piece
        self._run(final=False)
        return self._drain()

    def finish(self) -> list[str | Thought]:
        self._run(final=True)
        return self._drain()

    def _drain(self) -> list[str | Thought]:
        out, self._out = self._out, []
        return out

    # --- emitting

    def _begin(self, reasoning: bool, state: str) -> None:
        self.state = state
        self._held_space = ""  # whitespace that ended the previous block goes with it
        self._kind = reasoning
        self._block_fresh = True

    def _emit(self, text: str) -> None:
        if self._block_fresh:
            text = text.lstrip()
            if not text:
                return
            self._block_fresh = False
            parts = self._reasoning if self._kind else self._answer
            if parts:
                text = "\n\n" + text  # a second block of the same kind (harmony)
        if not text:
            return
        if self._kind:
            text = self._held_space + text
            kept = text.rstrip()
            self._held_space = text[len(kept) :]
            if kept:
                self._reasoning.append(kept)
                self._out.append(Thought(kept))
        else:
            self._answer.append(text)
            self._out.append(text)

    def _emit_exact(self, text: str) -> None:
        """Answer text before any block: kept exactly, leading whitespace included."""
        if text:
            self._kind, self._block_fresh = False, False
            self._answer.append(text)
            self._out.append(text)

    # --- the state machines

    def _run(self, final: bool) -> None:
        if self.fmt.style == "tags":
            self._run_tags(final)
        else:
            self._run_harmony(final)

    def _run_tags(self, final: bool) -> None:
        open_tag, close_tag = self.fmt.open_tag, self.fmt.close_tag
        while self._buffer:
            if self.state == "before":
                text = self._buffer.lstrip()
                if text.startswith(open_tag):
                    self._buffer = text[len(open_tag) :]
                    self._begin(True, "reasoning")
                    continue
                if not final and (not text or open_tag.startswith(text)):
                    return  # whitespace, or the start of the open tag: wait for more
                self.state = "answer"
                self._emit_exact(self._buffer)
                self._buffer = ""
            elif self.state == "reasoning":
                at = self._buffer.find(close_tag)
                if at >= 0:
                    self._emit(self._buffer[:at])
                    self._buffer = self._buffer[at + len(close_tag) :]
                    self._begin(False, "answer")
                    continue
                keep = 0 if final else _partial_suffix(self._buffer, (close_tag,))
                self._emit(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return
            else:  # the answer: the rest is text, tags included
                self._emit(self._buffer)
                self._buffer = ""

    def _run_harmony(self, final: bool) -> None:
        openers = (START, CHANNEL)
        while self._buffer:
            if self.state in ("before", "between"):
                text = self._buffer.lstrip()
                if text.startswith(openers):
                    self._buffer = text
                    self.state = "header"
                    continue
                if not final and (not text or any(m.startswith(text) for m in openers)):
                    return
                if self.state == "before":  # a reply without channels: all answer, exactly
                    self.state, self._channel = "body", "final"
                    self._emit_exact(self._buffer)
                    self._buffer = ""
                    continue
                self._channel = "final"  # text after a message without a new header
                self._begin(False, "body")
            elif self.state == "header":
                at = self._buffer.find(MESSAGE)
                if at >= 0:
                    self._channel = _channel_of(self._buffer[:at])
                    self._buffer = self._buffer[at + len(MESSAGE) :]
                    self._begin(self._channel == REASONING_CHANNEL, "body")
                    continue
                if len(self._buffer) > HEADER_LIMIT:  # not a header after all: show it
                    self._channel = "final"
                    self._begin(False, "body")
                    self._emit(self._buffer)
                    self._buffer = ""
                    continue
                if final:
                    self._buffer = ""  # a header with no message: nothing to show
                return
            else:  # "body"
                ends = (END, RETURN, CALL, START, CHANNEL)
                hits = [(at, marker) for marker in ends if (at := self._buffer.find(marker)) >= 0]
                if hits:
                    at, marker = min(hits)
                    self._emit(self._buffer[:at])
                    if marker in openers:  # <|end|> is not printed: a new header ends the message too
                        self._buffer = self._buffer[at:]
                        self.state = "header"
                    else:
                        self._buffer = self._buffer[at + len(marker) :]
                        self.state = "between"
                    continue
                keep = 0 if final else _partial_suffix(self._buffer, ends)
                self._emit(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return


def _channel_of(header: str) -> str:
    found = re.findall(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)", header)
    return found[-1] if found else "final"


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """The length of the longest end of ``text`` that could be the start of a marker."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def separate(stream: Iterable[Any], fmt: ReasoningFormat, prompt: Callable[[], str | None] = lambda: None) -> Iterator[Any]:
    """An engine stream (``str`` pieces, then a ``Result``) with its reasoning split off.

    Yields ``Thought`` pieces, answer ``str`` pieces and, last, the ``Result`` with
    ``text`` the answer and ``reasoning`` set. ``prompt`` gives the rendered prompt
    (asked when the first piece arrives, once the template has rendered).
    """
    from llmctl.engine.base import Result

    splitter: Splitter | None = None
    try:
        for piece in stream:
            if splitter is None:
                splitter = Splitter(fmt, prompt())
            if isinstance(piece, Result):
                yield from splitter.finish()
                yield finished(piece, splitter)
            else:
                yield from splitter.feed(piece)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stopped early (Ctrl-C, the reader closed us): the engine records its timings now


def finished(result: Result, splitter: Splitter) -> Result:
    return replace(result, text=splitter.answer, reasoning=splitter.reasoning)


# --- switching reasoning on and off --------------------------------------------------------------


@dataclass(frozen=True)
class ThinkingSetup:
    """What the model's template allows, and the variables that ``--think`` passes to it."""

    format: ReasoningFormat | None
    switch: str | None = None  # the template variable that turns reasoning on and off
    levels: bool = False  # the template reads reasoning_effort
    variables: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()


def normalise_think(value: str) -> str:
    aliases = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}
    think = aliases.get(value.strip().lower(), value.strip().lower())
    if think not in THINK_VALUES:
        raise UsageError(f"--think {value!r} is not one of: {', '.join(THINK_VALUES)}", hint="e.g. --think off")
    return think


def probe(template: str, render: Callable[[dict[str, Any]], str]) -> tuple[str | None, bool]:
    """Which variable switches reasoning, and whether effort levels change the prompt (by rendering, as llama.cpp does).

    ``render(variables)`` renders the probe conversation with a generation prompt.
    """
    switch = None
    for name in SWITCH_VARIABLES:
        if re.search(rf"\b{name}\b", template) and render({name: True}) != render({name: False}):
            switch = name
            break
    levels = EFFORT_VARIABLE in template and render({EFFORT_VARIABLE: "low"}) != render({EFFORT_VARIABLE: "high"})
    return switch, levels


def thinking_setup(
    template: str | None,
    think: str | None,
    *,
    chat_format: str | None = None,
    render: Callable[[str, dict[str, Any]], str] | None = None,
) -> ThinkingSetup:
    """The reasoning format of the model, and the template variables for ``--think`` (UsageError if it cannot be done).

    Without ``--think`` nothing is rendered and no variable is passed.
    """
    fmt = detect(template)
    if think is None:
        return ThinkingSetup(fmt)
    think = normalise_think(think)
    if chat_format is not None:
        raise UsageError(
            f"--think needs the model's own chat template, not --chat-format {chat_format}",
            hint="drop --chat-format, or drop --think",
        )
    if template is None or fmt is None:
        raise UsageError(
            "this model does not think: its chat template marks no reasoning",
            hint="drop --think; thinking models include DeepSeek-R1 distills, Qwen3 and gpt-oss",
        )
    try:
        if render is not None:
            switch, levels = probe(template, lambda variables: render(template, variables))
        else:
            switch, levels = _probe_in_worker(template)
    except Exception:  # noqa: BLE001 - a template that fails here fails with its own error when used
        switch, levels = None, False
    variables: dict[str, Any] = {}
    notes: list[str] = []
    if think == "off":
        if switch is None:
            raise UsageError(
                "this model's chat template has no switch to turn thinking off" + (" (gpt-oss reasons at a level: low, medium or high)" if levels else ""),
                hint="--think low gives the least reasoning" if levels else "--hide-thinking hides it; run prints only the answer anyway",
            )
        variables[switch] = False
    elif think in LEVELS and levels:
        variables[EFFORT_VARIABLE] = think
    else:
        if think in LEVELS:
            notes.append(f"this model's template has no reasoning levels: --think {think} means on")
        if switch is not None:
            variables[switch] = True
    return ThinkingSetup(fmt, switch, levels, variables, tuple(notes))


def _probe_in_worker(template: str) -> tuple[str | None, bool]:
    """``probe`` through the bounded renderer (a worker of its own, closed after)."""
    from llmctl.engine.chat_template import BoundedChatFormatter

    formatter = BoundedChatFormatter(template, eos_token="", bos_token="")
    try:
        return probe(template, lambda variables: formatter.render(PROBE, **variables))
    finally:
        formatter.worker.close()


def unseen_markers(llm: Any, fmt: ReasoningFormat) -> list[str]:
    """Markers that are single control tokens llama.cpp does not print (so the text cannot be split)."""
    unseen = []
    for marker in fmt.markers:
        try:
            tokens = llm.tokenize(marker.encode("utf-8"), add_bos=False, special=True)
            if len(tokens) == 1 and not llm.detokenize(tokens):
                unseen.append(marker)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot say: assume printed
            continue
    return unseen


# --- what run and chat share ------------------------------------------------------------------------


def check_think(think: str | None, chat_format: str | None) -> str | None:
    """``--think`` checked before anything loads: its value, and that the model's own template will render."""
    if think is None:
        return None
    think = normalise_think(think)
    if chat_format is not None:
        raise UsageError(
            f"--think needs the model's own chat template, not --chat-format {chat_format}",
            hint="drop --chat-format, or drop --think",
        )
    return think


def setup_for(llm: Any, template: str | None, think: str | None) -> ThinkingSetup:
    """``thinking_setup`` for a loaded model, probing through its own (warm) template renderer."""
    from llmctl.engine import chat_template

    formatter = chat_template.active_formatter(llm)
    if formatter is None:
        return thinking_setup(template, think)  # probes in a renderer of its own

    def render(_template: str, variables: dict[str, Any]) -> str:
        current, formatter.variables = formatter.variables, {}  # probe the template alone
        try:
            return formatter.render(PROBE, **variables)
        finally:
            formatter.variables = current

    return thinking_setup(template, think, render=render)


def apply(llm: Any, setup: ThinkingSetup) -> tuple[ThinkingSetup, list[str]]:
    """Pass ``--think``'s variables to the model's template; the setup to use and the warnings for the user.

    A model whose markers never reach the text is not split (its reply is shown as it comes).
    """
    from llmctl.engine import chat_template

    warnings = list(setup.notes)
    if setup.variables is not None:
        chat_template.set_variables(llm, setup.variables)
    if setup.format is not None:
        unseen = unseen_markers(llm, setup.format)
        if unseen:
            warnings.append(
                f"this model marks its reasoning with control tokens llama.cpp does not print ({', '.join(unseen)}): "
                "its reasoning cannot be told from its answer"
            )
            setup = replace(setup, format=None)
    return setup, warnings


def split(llm: Any, stream: Iterable[Any], fmt: ReasoningFormat | None) -> Iterable[Any]:
    """The engine's stream with the reasoning split off (unchanged for a model that does not think)."""
    if fmt is None:
        return stream
    from llmctl.engine import chat_template

    return separate(stream, fmt, lambda: chat_template.last_prompt(llm))


def no_answer(result: Result, command: str = "run") -> str | None:
    """What to say when a reply had reasoning but no answer (None when it had an answer, or no reasoning)."""
    if not result.reasoning or result.text.strip():
        return None
    if result.finish_reason == "length":
        what = "the reply ended inside the model's reasoning (finish_reason: length): there is no answer"
        todo = (
            "raise --max-tokens (or --ctx): the reasoning used them all"
            if command == "run"
            else "raise max_tokens (/set max_tokens N) or the context (/set ctx N)"
        )
    else:
        what = "the model gave no answer after its reasoning"
        todo = "try again, or --think off where the template allows it" if command == "run" else "/retry, or /set think off where the template allows it"
    where = '; the reasoning is in --json\'s "reasoning"' if command == "run" else "; /thinking shows the reasoning"
    return f"{what}; {todo}{where}"
