"""A chat session, without any UI: history, context trimming, slash commands, save and load.

The terminal front end (commands/chat_cmd.py) only reads lines and prints;
everything a conversation does is here, so it can be tested without a
terminal and reused by other front ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable

from llmctl.engine import chat_template, reasoning
from llmctl.engine.base import Engine, ReloadError, Result, Timings
from llmctl.errors import LlmctlError, UsageError

if TYPE_CHECKING:
    from llmctl.engine.sampling import SamplingSettings  # pydantic: not at the CLI's startup

MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators a chat template adds per message
MIN_CONTEXT = 256  # as --ctx
LOAD_LIMITS = {"ctx": (MIN_CONTEXT, 10_000_000), "threads": (1, 4096)}
LOAD_ALIASES = {"ctx": "ctx", "context": "ctx", "n_ctx": "ctx", "threads": "threads", "n_threads": "threads"}

HELP = """\
/help                 this help
/exit, /bye           leave (also Ctrl-D, or Ctrl-C twice on an empty prompt)
/clear                forget the conversation (keeps the system prompt)
/system TEXT          set the system prompt (empty: remove it)
/set PARAM VALUE      temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop;
                      threads; ctx (reloads the model, keeps the conversation that fits)
                      think on|off (reasoning models; low, medium, high for gpt-oss); hide-thinking on|off
/show                 model, parameters, threads, context used
/thinking             the last reply's reasoning (thinking models)
/retry                regenerate the last reply
/save FILE            save the conversation (OpenAI messages JSON)
/load FILE            load a conversation saved with /save
/stats                timings of the last reply and of the session
Multi-line input: start and end with \"\"\" on their own, or press Esc then Enter (Alt-Enter) for a new line."""


class ContextError(LlmctlError):
    """A single message that cannot fit the context at all."""


@dataclass
class Command:
    """What the UI should do after a slash command."""

    action: str  # "continue" | "exit" | "reply"
    message: str = ""


@dataclass
class ChatSession:
    engine: Engine
    sampling: SamplingSettings
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    history: list[Timings] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # for the UI: turns dropped, etc.
    failed_turn: bool = False  # set by the UI when the last line's command or message failed
    # Loads the same model with another context size, freeing the current one (None: /set ctx is refused).
    reload: Callable[[int], Engine] | None = None
    # A thinking model: how it marks reasoning and what --think / /set think passes to its template.
    thinking: reasoning.ThinkingSetup | None = None
    think: str | None = None
    hide_thinking: bool = False  # for the UI
    last_reasoning: str | None = None

    # --- the conversation ---

    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def tokens_of(self, message: dict[str, str]) -> int:
        return self.engine.count_tokens(message["content"]) + MESSAGE_OVERHEAD_TOKENS

    def reply_budget(self) -> int:
        n_ctx = self.engine.n_ctx
        return self.sampling.max_tokens or max(min(1024, n_ctx // 4), 16)

    def context_used(self) -> int:
        return sum(self.tokens_of(m) for m in self.conversation())

    def _trim(self) -> None:
        """Drop the oldest turns (never the system prompt or the newest message) until a reply fits."""
        limit = self.engine.n_ctx - self.reply_budget()
        newest = self.messages[-1]
        fixed = self.tokens_of(newest) + (self.tokens_of({"content": self.system}) if self.system else 0)
        if fixed > limit:
            self.messages.pop()
            raise ContextError(
                f"that message is {self.tokens_of(newest)} tokens; with the system prompt and room for a reply "
                f"it cannot fit the {self.engine.n_ctx}-token context",
                hint="shorten it, or restart chat with a larger --ctx",
            )
        dropped = self._drop_oldest(limit, keep=1)
        if dropped:
            self.notices.append(f"context nearly full: dropped the {dropped} oldest message(s)")

    def _drop_oldest(self, limit: int, *, keep: int) -> int:
        """Drop the oldest messages, keeping the newest ``keep``, until the conversation fits ``limit`` tokens."""
        dropped = 0
        while self.context_used() > limit and len(self.messages) > keep:
            # Drop a whole exchange (user, then its reply), so the conversation still starts with
            # a user turn: some templates insist that roles alternate.
            self.messages.pop(0)
            dropped += 1
            if len(self.messages) > keep and self.messages[0]["role"] == "assistant":
                self.messages.pop(0)
                dropped += 1
        return dropped

    def send(self, text: str, *, grammar: Any = None) -> Generator[str | Result, None, None]:
        """Add a user message and stream the reply (constrained by ``grammar``, from ``engine.grammar_for``, if
        given); the reply joins the history as it was shown."""
        self.messages.append({"role": "user", "content": text})
        return self._generate(grammar)

    def retry(self) -> Generator[str | Result, None, None]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise UsageError("nothing to retry yet")
        return self._generate(None)

    def _generate(self, grammar: Any) -> Generator[str | Result, None, None]:
        self._trim()
        pieces: list[str] = []
        thoughts: list[str] = []
        earlier = self.engine.last_timings
        thinking = self.thinking or reasoning.ThinkingSetup(None)
        if thinking.variables is not None:
            chat_template.set_variables(self.engine.llm, thinking.variables)  # again after a reload
        stream: Iterable[Any] = self.engine.chat(self.conversation(), self.sampling, grammar=grammar)
        if thinking.format is not None:
            stream = reasoning.split(self.engine.llm, stream, thinking.format)
        finished = False
        try:
            for piece in stream:
                if isinstance(piece, Result):
                    finished = True
                    self.history.append(piece.timings)
                    # The answer only: earlier turns go back without their reasoning (llama-server, Ollama,
                    # and Qwen3's and R1's templates strip it anyway).
                    self.messages.append({"role": "assistant", "content": piece.text})
                    self.last_reasoning = piece.reasoning
                    no_answer = reasoning.no_answer(piece, "chat")
                    if no_answer:
                        self.notices.append(no_answer)
                    elif piece.finish_reason == "stop" and not piece.text.strip():
                        self.notices.append(self.engine.empty_reply_advice(command="chat"))
                elif isinstance(piece, reasoning.Thought):
                    thoughts.append(piece.text)
                else:
                    pieces.append(piece)
                yield piece
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C, or the UI stopped reading (closed us)
            if not finished:
                self.last_reasoning = "".join(thoughts) or None
                # Keep what was shown, so the conversation matches the screen, and its timings for /stats.
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
                close = getattr(stream, "close", None)
                if close is not None:
                    close()  # the engine records the stopped reply's timings as it closes
                timings = self.engine.last_timings
                if timings is not None and timings is not earlier:
                    self.history.append(timings)
            raise
        except LlmctlError:
            # The turn failed: forget its message, so the next one does not follow an unanswered turn.
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            raise

    # --- slash commands ---

    def command(self, line: str) -> Command:
        name, _, arg = line.strip().partition(" ")
        name = name.lower()
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return Command("exit")
        if name in ("/help", "/?"):
            return Command("continue", HELP)
        if name == "/clear":
            self.messages.clear()
            return Command("continue", "conversation cleared")
        if name == "/system":
            self.system = arg or None
            return Command("continue", "system prompt set" if arg else "system prompt removed")
        if name == "/set":
            param, _, value = arg.partition(" ")
            if not param:
                raise UsageError("usage: /set PARAM VALUE", hint="e.g. /set temperature 0.2")
            name = param.lower().replace("-", "_")
            if name == "think":
                return Command("continue", self.set_think(value.strip()))
            if name == "hide_thinking":
                self.hide_thinking = _on_off(value.strip(), "/set hide-thinking")
                return Command("continue", f"hide-thinking = {'on' if self.hide_thinking else 'off'}")
            key = LOAD_ALIASES.get(name)
            if key is not None:
                return Command("continue", self.set_load(key, value.strip()))
            self.sampling = self.sampling.with_setting(param, value.strip())
            return Command("continue", f"{param} = {value.strip()}")
        if name == "/show":
            return Command("continue", self.describe())
        if name == "/retry":
            return Command("reply")
        if name == "/save":
            return Command("continue", self.save(Path(_need(arg, "/save FILE")).expanduser()))
        if name == "/load":
            return Command("continue", self.load(Path(_need(arg, "/load FILE")).expanduser()))
        if name == "/stats":
            return Command("continue", self.stats())
        if name == "/thinking":
            return Command("continue", self.last_reasoning or "the last reply had no reasoning")
        raise UsageError(f"unknown command {name}", hint="/help lists the commands")

    def set_load(self, key: str, raw: str) -> str:
        """``/set threads N`` (at once) and ``/set ctx N`` (reloads the model, keeps what of the conversation fits)."""
        low, high = LOAD_LIMITS[key]
        try:
            value = int(raw)
        except ValueError:
            raise UsageError(f"{key} needs a whole number, not {raw!r}", hint=f"e.g. /set {key} {low * 16 if key == 'ctx' else 4}") from None
        if not low <= value <= high:
            raise UsageError(f"{key} {value} is out of range", hint=f"{key} must be between {low} and {high}")
        if key == "threads":
            self.engine.set_threads(value)
            return f"threads = {value}"
        if value == self.engine.n_ctx:
            return f"the context is already {value} tokens"
        if self.reload is None:
            raise UsageError("this session cannot change its context size", hint="restart chat with --ctx")
        try:
            self.engine = self.reload(value)  # the KV cache starts empty: the next turn evaluates the whole conversation
        except ReloadError as exc:
            if exc.engine is not None:
                self.engine = exc.engine  # the previous size, loaded again
            raise
        used = self.context_used()
        dropped = self._drop_oldest(self.engine.n_ctx - self.reply_budget(), keep=0)
        said = f"context = {self.engine.n_ctx} tokens (model reloaded); "
        if dropped:
            return said + f"dropped the {dropped} oldest message(s) that no longer fit, kept {len(self.messages)}"
        return said + (f"the conversation ({used} tokens) was kept" if self.messages else "no conversation yet")

    def set_think(self, value: str) -> str:
        """``/set think on|off|low|medium|high``: from the next reply (UsageError where the template has no such switch)."""
        think = reasoning.check_think(value, self.engine.chat_format)
        template = (self.engine.llm.metadata or {}).get("tokenizer.chat_template")
        setup, said = reasoning.apply(self.engine.llm, reasoning.setup_for(self.engine.llm, template, think))
        self.notices.extend(said)
        self.thinking, self.think = setup, think
        return f"think = {think}"

    def describe(self) -> str:
        s = self.sampling
        cfg = self.engine.config
        threads = self.engine.threads
        return "\n".join(
            [
                f"model:       {self.engine.name}",
                f"context:     {self.context_used()} of {self.engine.n_ctx} tokens used",
                f"load:        {cfg.n_gpu_layers} GPU layers, KV cache {cfg.type_k}/{cfg.type_v}"
                + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""),
                f"system:      {self.system or '(none)'}",
                *self._describe_thinking(),
                f"sampling:    temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, min_p {s.min_p}, "
                f"repeat_penalty {s.repeat_penalty}, seed {'random' if s.seed is None else s.seed}, "
                f"max_tokens {'unlimited' if s.max_tokens is None else s.max_tokens}, "
                f"stop {json.dumps(s.stop, ensure_ascii=False) if s.stop else '(none)'}",
            ]
        )

    def _describe_thinking(self) -> list[str]:
        fmt = self.thinking.format if self.thinking else None
        if fmt is None:
            return []
        shown = "hidden" if self.hide_thinking else "shown"
        return [f"thinking:    marked {fmt.name}; think {self.think or 'as the template has it'}; {shown}"]

    def stats(self) -> str:
        if not self.history:
            return "no replies yet"
        last = self.history[-1]
        total_tokens = sum(t.generated_tokens for t in self.history)
        total_time = sum(t.generation_s for t in self.history)
        rate = last.generation_tokens_per_second
        return "\n".join(
            [
                f"last reply:  {last.generated_tokens} tokens, {rate:.1f} tokens/s" if rate else f"last reply:  {last.generated_tokens} tokens",
                f"             first token after {last.ttft_s:.3f}s; prompt {last.prompt_eval_tokens} of "
                f"{last.prompt_tokens} tokens evaluated (the rest reused from the cache)",
                f"session:     {len(self.history)} replies, {total_tokens} tokens in {total_time:.1f}s of generation",
            ]
        )

    def save(self, path: Path) -> str:
        try:
            path.write_text(json.dumps(self.conversation(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise LlmctlError(f"cannot save to {path}: {exc.strerror}") from None
        return f"saved {len(self.conversation())} messages to {path}"

    def load(self, path: Path) -> str:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise LlmctlError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"{path} is not JSON: {exc}") from None
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str) for m in data
        ):
            raise UsageError(f"{path} is not a list of {{role, content}} messages", hint="load a file written by /save")
        self.system = next((m["content"] for m in data if m["role"] == "system"), None)
        self.messages = [{"role": m["role"], "content": m["content"]} for m in data if m["role"] != "system"]
        return f"loaded {len(data)} messages from {path}"


def _on_off(value: str, usage: str) -> bool:
    answer = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}.get(value.lower())
    if answer is None:
        raise UsageError(f"usage: {usage} on|off")
    return answer


def _need(arg: str, usage: str) -> str:
    if not arg:
        raise UsageError(f"usage: {usage}")
    return arg
