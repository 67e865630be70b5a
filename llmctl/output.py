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
import sys
import time
import unicodedata
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from llmctl.config import no_color

if TYPE_CHECKING:
    from rich.console import Console


# --- escaping ---------------------------------------------------------------

_KEEP_LAYOUT = {"\n", "\t"}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str, keep_layout: bool = False) -> str:
    """Escape control and format characters (ESC, BEL, bidi overrides, …).

    With ``keep_layout`` newlines and tabs survive, for multi-line text such as
    chat templates.
    """
    if text.isprintable() and not keep_layout:
        return text
    out = []
    for ch in text:
        if keep_layout and ch in _KEEP_LAYOUT:
            out.append(ch)
        elif unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}:
            out.append(_escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


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
    """Print one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
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
    _make_console(stderr=stderr).print(table)



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
    _make_console(stderr=False).print(table)


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

    The plain form prints at most one line per ``every`` seconds, so logs of a
    long copy or download stay short.
    """

    def __init__(self, description: str, total: int | None, every: float = 5.0) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self.every = every
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self._started = 0.0

    def __enter__(self) -> ByteProgress:
        self._started = time.monotonic()
        self._last_line = self._started
        if interactive_stderr():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=_make_console(stderr=True),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(safe(self.description), total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            info(self._plain_line(now))

    def _plain_line(self, now: float) -> str:
        rate = self.done / max(now - self._started, 1e-9)
        if self.total:
            pct = 100.0 * self.done / self.total
            return (
                f"{self.description}: {human_bytes(self.done)} of {human_bytes(self.total)} "
                f"({pct:.0f}%, {human_bytes(rate)}/s)"
            )
        return f"{self.description}: {human_bytes(self.done)} ({human_bytes(rate)}/s)"

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
