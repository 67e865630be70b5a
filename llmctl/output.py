"""The only module that prints.

stdout carries data (tables for people, JSON for programs); stderr carries
everything else (status, progress, warnings, errors). Colour, spinners and live
progress bars appear only when the stream is a terminal and ``NO_COLOR`` is
unset. Text that comes from model files passes through :func:`safe` so that a
hostile name or template cannot drive the terminal.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from llmctl.config import no_color

if TYPE_CHECKING:
    from rich.console import Console


# --- escaping ---------------------------------------------------------------
#
# Text from model files and from models themselves is untrusted: a GGUF name or
# a generated token can hold ESC sequences (colours, cursor moves, OSC 52
# clipboard writes, window titles), C1 controls (U+0080-U+009F, which some
# terminals obey like ESC sequences), bidi overrides (U+202A-U+202E,
# U+2066-U+2069) that reorder what is shown, and U+2028/U+2029. What a terminal
# shows, or a log records, passes through the functions below; data on a pipe
# stays exact (docs/json.md, "Text from models").

# Control (C0, DEL, C1), format (bidi, zero-width), surrogate, private-use,
# line and paragraph separator characters.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_KEEP_LAYOUT = frozenset({"\n", "\t"})
# Zero-width (non-)joiners build emoji and are part of several scripts; they
# move no cursor and reorder nothing, so a model's reply keeps them.
_KEEP_IN_REPLIES = _KEEP_LAYOUT | {"\u200c", "\u200d"}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escape(text: str, keep: frozenset[str]) -> str:
    if text.isprintable():
        return text
    return "".join(_escape_char(ch) if ch not in keep and unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text)


def safe(text: str, keep_layout: bool = False) -> str:
    """Show control and format characters escaped (ESC as ``\\x1b``, U+202E as ``\\u202e``): C0, DEL, C1,
    bidi controls, zero-width characters, U+2028/U+2029, surrogates and private-use characters.

    With ``keep_layout`` newlines and tabs survive, for multi-line text such as
    chat templates.
    """
    return _escape(text, _KEEP_LAYOUT if keep_layout else frozenset())


def safe_reply(text: str) -> str:
    """A model's generated text for a terminal: like ``safe(text, keep_layout=True)``, and emoji joiners kept."""
    return _escape(text, _KEEP_IN_REPLIES)


def json_text(data: Any, indent: int | None = 2) -> str:
    """JSON text that a terminal cannot act on, and that decodes to exactly ``data``.

    ``json.dumps(ensure_ascii=False)`` escapes only C0 controls; here every
    character :func:`safe` would escape is written as a ``\\u`` escape too (DEL,
    C1, bidi controls, U+2028/U+2029, …), while other non-ASCII text stays
    readable.
    """
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    # Only string contents can hold such characters, and a raw "\n" is never inside one.
    return "\n".join(line if line.isprintable() else _json_escape_line(line) for line in text.split("\n"))


def _json_escape_line(line: str) -> str:
    return "".join(json.dumps(ch)[1:-1] if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in line)


class ReplyWriter:
    """A model's reply on stdout, written piece by piece as it streams.

    On a pipe or a file the text is written exactly as generated. On a
    terminal each piece is neutralised with :func:`safe_reply` on its own:
    every character is judged alone, so an ESC at the end of one piece is shown
    as ``\\x1b`` whatever the next piece brings. A carriage return is held back
    until the next piece shows whether it ends a line (``\\r\\n``, written as
    ``\\n``) or would let the text overwrite what the line already shows
    (escaped).
    """

    def __init__(self, terminal: bool | None = None) -> None:
        self.terminal = _is_tty(sys.stdout) if terminal is None else terminal
        self._held_cr = False
        self._last = "\n"

    def filter(self, piece: str) -> str:
        """The text to write for ``piece`` (exact off a terminal)."""
        if not self.terminal or not piece:
            return piece
        if self._held_cr:
            piece = "\r" + piece
            self._held_cr = False
        if piece.endswith("\r"):
            piece = piece[:-1]
            self._held_cr = True
        return safe_reply(piece.replace("\r\n", "\n"))

    def write(self, piece: str) -> None:
        text = self.filter(piece)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self._last = text[-1]

    def finish(self, *, newline: bool = True) -> None:
        """End the reply: a held carriage return is shown escaped; a final newline always, or only if missing."""
        tail = _escape_char("\r") if self._held_cr else ""
        self._held_cr = False
        if newline or not (tail or self._last).endswith("\n"):
            tail += "\n"
        sys.stdout.write(tail)
        sys.stdout.flush()
        self._last = "\n"


class ThinkingWriter:
    """A reasoning model's thinking on stderr as it streams: framed, dimmed, neutralised; only on a terminal.

    Thinking is commentary, not the reply: stdout never carries it (``run --json``
    has it as ``reasoning``). Shown as Ollama shows it: ``Thinking…``, the text
    dimmed, ``…done thinking.``; escape sequences in it are neutralised as in a
    reply on a terminal.
    """

    def __init__(self, show: bool = True) -> None:
        self.show = show and _is_tty(sys.stderr)
        self._filter = ReplyWriter(terminal=True)
        self._on, self._off = ("\x1b[2m", "\x1b[0m") if self.show and not no_color() else ("", "")
        self._last = "\n"
        self.started = False

    def write(self, piece: str) -> None:
        if not self.show:
            return
        if not self.started:
            self.started = True
            self._last = "\n"
            sys.stderr.write(f"{self._on}Thinking…{self._off}\n")
        text = self._filter.filter(piece)
        if text:
            sys.stderr.write(self._on + text + self._off)  # styled per piece: an interruption leaves no style on
            self._last = text[-1]
        sys.stderr.flush()

    def finish(self) -> None:
        """Close the frame (if anything was shown); a later piece opens a new one."""
        if not self.started:
            return
        tail = _escape_char("\r") if self._filter._held_cr else ""
        self._filter._held_cr = False
        if tail or self._last != "\n":
            tail += "\n"
        sys.stderr.write(f"{self._on}{tail}…done thinking.{self._off}\n\n")
        sys.stderr.flush()
        self.started = False


# --- consoles ---------------------------------------------------------------

PIPE_WIDTH = 200


def _make_console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped tables get room instead of Rich's 80-column guess; COLUMNS still wins.
    width = None if _is_tty(stream) or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(
        file=stream,
        width=width,
        highlight=False,
        no_color=no_color(),
        emoji=False,
        markup=False,
        # Messages on stderr stay one line each, whatever the width.
        soft_wrap=stderr,
    )


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def interactive_stderr() -> bool:
    """True when live widgets (spinners, progress bars) may be drawn."""
    return _is_tty(sys.stderr) and not no_color()


# --- data (stdout) ----------------------------------------------------------


def emit_json(data: Any) -> None:
    """Print one JSON document on stdout (see :func:`json_text`)."""
    sys.stdout.write(json_text(data) + "\n")
    sys.stdout.flush()


def emit_text(text: str) -> None:
    """Print raw text on stdout (already escaped by the caller where needed)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def emit_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    right_align: Iterable[str] = (),
    dim_rows: Iterable[int] = (),
    stderr: bool = False,
) -> None:
    """A table of plain cells on stdout (or stderr, as commentary). Cells are escaped; markup is never interpreted."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    right = set(right_align)
    dim = set(dim_rows)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left", overflow="fold")
    for index, row in enumerate(rows):
        style = "dim" if index in dim else ""
        table.add_row(*(Text(safe("" if cell is None else str(cell)), style=style) for cell in row))
    _print_block(table, stderr=stderr)


@dataclass(frozen=True)
class Column:
    """A table column over records: its title, and the cell text drawn from one record."""

    title: str
    cell: Callable[[dict[str, Any]], Any]
    right: bool = False


def emit_records(
    records: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    *,
    json_output: bool,
    document: dict[str, Any] | None = None,
    empty: str | None = None,
    title: str | None = None,
) -> None:
    """One list of records, shown as a table or printed as JSON: the two views of the same data.

    ``document`` is the JSON printed with ``--json`` (the records inside an envelope with whatever
    else the command reports); without it the records are printed as a JSON list. ``empty`` is said
    on stderr instead of an empty table; ``title`` is the table's.
    """
    if json_output:
        emit_json(document if document is not None else list(records))
        return
    if not records:
        if empty:
            info(empty)
        return
    emit_table(
        [c.title for c in columns],
        [["-" if (value := c.cell(record)) is None else value for c in columns] for record in records],
        title=title,
        right_align=[c.title for c in columns if c.right],
    )


def emit_fields(pairs: Iterable[tuple[str, Any]], *, title: str | None = None) -> None:
    """A two-column key/value listing on stdout."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, box=box.SIMPLE, show_header=False, show_edge=False, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in pairs:
        table.add_row(Text(key), Text(safe("" if value is None else str(value))))
    _print_block(table, stderr=False)


_TRAILING_BLANKS = re.compile(r"[ \t]+((?:\x1b\[[0-9;]*m)*)$", re.MULTILINE)


def _print_block(renderable: Any, *, stderr: bool) -> None:
    """Print a table; off a terminal without the blanks Rich pads each line with to the table's width."""
    console = _make_console(stderr=stderr)
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    stream = sys.stderr if stderr else sys.stdout
    stream.write(_TRAILING_BLANKS.sub(r"\1", captured.get()))
    stream.flush()


# --- everything else (stderr) -----------------------------------------------


def info(message: str, *, multiline: bool = False) -> None:
    from rich.text import Text

    _make_console(stderr=True).print(Text(safe(message, keep_layout=multiline)))


def dim(message: str) -> None:
    """A quiet status line (per-reply stats in chat)."""
    from rich.text import Text

    _make_console(stderr=True).print(Text(safe(message), style="dim"))


def warn(message: str) -> None:
    from rich.text import Text

    _make_console(stderr=True).print(Text("warning: ", style="yellow bold") + Text(safe(message)))


def error(message: str, hint: str | None = None) -> None:
    from rich.text import Text

    console = _make_console(stderr=True)
    console.print(Text("error: ", style="red bold") + Text(safe(message)))
    if hint:
        console.print(Text("hint: ", style="cyan") + Text(safe(hint)))


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on a terminal; silent otherwise."""
    if not interactive_stderr():
        yield
        return
    with _make_console(stderr=True).status(message):
        yield


def human_bytes(n: int | float | None) -> str:
    """1536 → '1.5 KiB'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


class ByteProgress:
    """Progress over a byte count: a Rich bar on a terminal, plain lines otherwise.

    Sizes and rates are in binary units (KiB, MiB/s), like every size llmctl
    prints. Bytes that were already there (a resumed download's partial file)
    go to :meth:`resumed`: they count towards the total shown, never towards
    the rate, which is the bytes moved by this run over the time it took.

    The plain form prints at most one line per ``every`` seconds, so logs of a
    long copy or download stay short.
    """

    def __init__(self, description: str, total: int | None, every: float = 5.0) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self.moved = 0  # by this run: what the rate is made of
        self.every = every
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self._started = 0.0

    def __enter__(self) -> ByteProgress:
        self._started = time.monotonic()
        self._last_line = self._started
        if interactive_stderr():
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[eta]}"),
                console=_make_console(stderr=True),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(safe(self.description), total=self.total, rate="", eta="")
        return self

    def resumed(self, n: int) -> None:
        """Count ``n`` bytes that were already on disk: shown as done, not part of the rate."""
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def advance(self, n: int) -> None:
        """Count ``n`` bytes moved (downloaded, copied, hashed) by this run."""
        self.done += n
        self.moved += n
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self.rate_text(now), eta=self.eta_text(now))
            return
        if now - self._last_line >= self.every:
            self._last_line = now
            info(self._plain_line(now))

    def rate(self, now: float | None = None) -> float:
        """Bytes per second moved by this run since it began."""
        elapsed = (time.monotonic() if now is None else now) - self._started
        return self.moved / max(elapsed, 1e-9)

    def rate_text(self, now: float | None = None) -> str:
        return f"{human_bytes(self.rate(now))}/s"

    def eta_text(self, now: float | None = None) -> str:
        """Time left at the rate so far, as H:MM:SS; empty while unknown."""
        rate = self.rate(now)
        if not self.total or rate <= 0 or self.done >= self.total:
            return ""
        left = int((self.total - self.done) / rate)
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left"

    def _plain_line(self, now: float) -> str:
        if self.total:
            pct = 100.0 * self.done / self.total
            return f"{self.description}: {human_bytes(self.done)} of {human_bytes(self.total)} ({pct:.0f}%, {self.rate_text(now)})"
        return f"{self.description}: {human_bytes(self.done)} ({self.rate_text(now)})"

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def human_count(n: int | None) -> str:
    """134515008 → '134.5M'; parameter counts as people say them."""
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    return str(n)


def relative_time(iso: str | None) -> str:
    """An ISO timestamp as '3 days ago'; 'never' for None."""
    if not iso:
        return "never"
    from datetime import datetime, timezone

    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    seconds = (datetime.now(timezone.utc) - then).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"
